"""WebSocket /v1/stream with each detector: same replies, tracks, and landmarks from RetinaFace."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.card import CLASSES
from tests.conftest import running_app
from tests.media import jpeg, photo_frames
from tests.service.stream_helpers import replies_in_lockstep


@pytest.mark.parametrize("detector", ["haar", "retinaface"])
def test_a_stream_is_answered_alike_with_either_detector(model_store: Path, detector: str):
    frames = [jpeg(frame) for frame in photo_frames(repeat=2)]
    with running_app(model_store, detector=detector) as client:
        with client.websocket_connect("/v1/stream?model=cnn10") as ws:
            replies = replies_in_lockstep(ws, frames)
    with_faces = [r for r in replies if r["faces"]]
    assert len(with_faces) >= (len(frames) // 2 if detector == "haar" else len(frames))
    for reply in with_faces:
        assert reply["image"] == {"width": 350, "height": 350}
        for face in reply["faces"]:
            assert face["label"] in CLASSES and isinstance(face["track_id"], int)
            assert set(face["smoothed"]) == set(CLASSES)
            if detector == "haar":
                assert "landmarks" not in face
            else:
                box = face["box"]
                for point in face["landmarks"].values():
                    assert box["x"] <= point["x"] <= box["x"] + box["width"]
                    assert box["y"] <= point["y"] <= box["y"] + box["height"]
    # Each photo is sent twice in a row: its face keeps its track across the pair.
    for first, second in zip(replies[::2], replies[1::2], strict=True):
        if first["faces"] and second["faces"]:
            assert first["faces"][0]["track_id"] == second["faces"][0]["track_id"]
