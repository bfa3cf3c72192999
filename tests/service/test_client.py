"""fer-client against a real uvicorn server: predict, stream, annotate."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from service import client
from service.card import CLASSES
from tests.conftest import ROOT, all_photos, live_server
from tests.media import read_video, write_video


@pytest.fixture(scope="module")
def server(model_store: Path) -> Iterator[str]:
    with live_server(model_store) as url:
        yield url


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    path = tmp_path_factory.mktemp("client") / "faces.mp4"
    return path, write_video(path, repeat=2)


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_predict_prints_one_json_line_per_image(
    server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    images = [str(p) for p in all_photos()[:2]]
    assert client.main(["predict", *images, "--url", server, "--model", "cnn10"]) == 0
    out = lines(capsys.readouterr().out)
    assert [o["file"] for o in out] == images
    assert all(o["model"] == "cnn10" and o["faces"] for o in out)


def test_predict_reports_errors_per_image(server: str, capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image")
    code = client.main(["predict", str(junk), str(tmp_path / "missing.jpg"), str(all_photos()[0]),
                        "--url", server])
    assert code == 1
    junk_out, missing_out, good_out = lines(capsys.readouterr().out)
    assert (junk_out["status"], junk_out["error"]) == (415, "unsupported_media_type")
    assert missing_out["error"] == "not_found"
    assert "faces" in good_out
    assert client.main(["predict", str(all_photos()[0]), "--url", server, "--model", "nope"]) == 1
    assert lines(capsys.readouterr().out)[0]["status"] == 404


def test_stream_answers_every_frame_one_at_a_time(
    server: str, video: tuple[Path, int], capsys: pytest.CaptureFixture[str]
) -> None:
    path, count = video
    assert client.main(["stream", "--video", str(path), "--url", server, "--model", "cnn10"]) == 0
    captured = capsys.readouterr()
    replies = lines(captured.out)
    assert [r["frame"] for r in replies] == list(range(count))
    assert all(r["dropped"] == 0 for r in replies)
    assert sum(bool(r["faces"]) for r in replies) >= count // 2
    assert f'"answered": {count}' in captured.err


def test_stream_at_a_fixed_rate_accounts_for_every_frame(
    server: str, video: tuple[Path, int], capsys: pytest.CaptureFixture[str]
) -> None:
    path, count = video
    assert client.main(["stream", "--video", str(path), "--url", server, "--fps", "500"]) == 0
    replies = lines(capsys.readouterr().out)
    assert replies[-1]["frame"] == count - 1  # the newest frame is always answered
    assert sum(1 + r["dropped"] for r in replies) == count


def test_annotate_writes_video_jsonl_and_chart(
    server: str, video: tuple[Path, int], tmp_path: Path
) -> None:
    path, count = video
    out, jsonl, chart = tmp_path / "out.mp4", tmp_path / "out.jsonl", tmp_path / "mix.png"
    code = client.main(["annotate", "--video", str(path), "--out", str(out), "--jsonl", str(jsonl),
                        "--chart", str(chart), "--url", server, "--model", "cnn10"])
    assert code == 0
    annotated, original = read_video(out), read_video(path)
    assert len(annotated) == count and annotated[0].shape == original[0].shape
    records = lines(jsonl.read_text())
    assert [r["frame"] for r in records] == list(range(count))
    with_faces = [r for r in records if r["faces"]]
    assert len(with_faces) >= count // 2
    assert set(with_faces[0]["faces"][0]["probabilities"]) == set(CLASSES)
    # Boxes and bars were drawn into the frames that have faces.
    frame = with_faces[0]["frame"]
    assert np.abs(annotated[frame].astype(int) - original[frame].astype(int)).mean() > 2
    image = cv2.imread(str(chart))
    assert image is not None and image.shape[1] > 500


def test_annotate_chart_without_matplotlib_fails_before_work(
    server: str, video: tuple[Path, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "out.mp4"
    code = client.main(["annotate", "--video", str(video[0]), "--out", str(out), "--chart",
                        str(tmp_path / "c.png"), "--url", server])
    assert code == 2 and "needs matplotlib" in capsys.readouterr().err
    assert not out.exists()


def test_clear_errors_for_bad_server_model_or_file(
    server: str, video: tuple[Path, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert client.main(["predict", str(all_photos()[0]), "--url", "http://127.0.0.1:9"]) == 2
    assert "cannot reach" in capsys.readouterr().err
    code = client.main(["stream", "--video", str(video[0]), "--url", server, "--model", "nope"])
    assert code == 2
    assert "refused: unknown_model" in capsys.readouterr().err
    assert client.main(["stream", "--video", str(tmp_path / "none.mp4"), "--url", server]) == 2
    assert "no such video" in capsys.readouterr().err


def test_draw_faces_handles_faces_at_the_edges() -> None:
    frame = np.zeros((240, 320, 3), np.uint8)
    probabilities = dict.fromkeys(CLASSES, 0.0) | {"sad": 1.0}
    faces = [
        {"box": {"x": 0, "y": 0, "width": 40, "height": 40}, "probabilities": probabilities},
        {"box": {"x": 290, "y": 210, "width": 30, "height": 30}, "probabilities": probabilities,
         "track_id": 3, "smoothed": probabilities},
    ]
    client.draw_faces(frame, faces)
    assert frame.any()
    assert tuple(frame[0, 0]) == client.COLORS["sad"]  # the box's corner


def test_stream_url() -> None:
    assert client.stream_url("https://fer.example/api/", "cnn10", 2, False) == (
        "wss://fer.example/api/v1/stream?detect=false&model=cnn10&version=2"
    )


def test_module_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "service.client", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "annotate" in result.stdout
