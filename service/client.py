"""Command-line client: `fer-client` or `python -m service.client`.

    fer-client predict IMAGE... [--url URL] [--model M]        one JSON line per image
    fer-client stream --video FILE | --camera N [--fps F]      one JSON line per answered frame
    fer-client annotate --video IN --out OUT.mp4 [--jsonl OUT.jsonl] [--chart OUT.png]

`stream` sends one frame per reply by default (nothing is dropped); with `--fps` it
sends at that rate whatever the replies, and the server answers the newest frame and
reports the ones it skipped in `dropped`. `annotate` sends every frame over the stream,
one at a time, and draws the boxes, labels and probability bars into a new MP4. It
needs only the standard library, OpenCV and `websockets` (installed by uvicorn[standard]);
`--chart` also needs matplotlib.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from service.card import CLASSES
from service.imaging import sniff_format

DEFAULT_URL = os.environ.get("FER_URL", "http://127.0.0.1:8000")
JPEG_QUALITY = 85
REPLY_TIMEOUT_S = 60.0
# BGR, one colour per expression (the demo page uses the same hues).
COLORS = {
    "angry": (77, 72, 229), "disgust": (198, 78, 142), "fear": (207, 86, 110),
    "happy": (108, 164, 48), "sad": (221, 99, 62), "surprise": (35, 166, 245),
    "neutral": (152, 141, 139),
}


class ClientError(Exception):
    """Something the user can fix (bad path, server unreachable, stream refused)."""


# -- HTTP /predict ----------------------------------------------------------------------
def query_string(model: str | None, version: int | None, detect: bool) -> str:
    params: dict[str, str] = {"detect": "true" if detect else "false"}
    if model:
        params["model"] = model
    if version:
        params["version"] = str(version)
    return urllib.parse.urlencode(params)


def predict(url: str, data: bytes, model: str | None = None, version: int | None = None,
            detect: bool = True, timeout: float = 60.0) -> dict[str, Any]:
    """POST one image to /predict; the JSON body, error or not, with `status` on errors."""
    fmt = sniff_format(data) or "octet-stream"
    content_type = "application/octet-stream" if fmt == "octet-stream" else f"image/{fmt}"
    request = urllib.request.Request(
        f"{url.rstrip('/')}/predict?{query_string(model, version, detect)}",
        data=data, method="POST", headers={"Content-Type": content_type},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        try:
            body = json.loads(error.read())
        except ValueError:
            body = {"error": "http_error", "detail": error.reason}
        return {"status": error.code, **body}
    except (urllib.error.URLError, OSError) as error:
        raise ClientError(f"cannot reach {url}: {getattr(error, 'reason', error)}") from None


# -- WebSocket /v1/stream ---------------------------------------------------------------
def stream_url(url: str, model: str | None, version: int | None, detect: bool) -> str:
    parts = urllib.parse.urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/") + "/v1/stream"
    query = query_string(model, version, detect)
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, query, ""))


@contextlib.contextmanager
def connect(url: str, model: str | None, version: int | None, detect: bool) -> Iterator[Any]:
    """An open /v1/stream connection (a `websockets` sync client), closed on exit."""
    from websockets.exceptions import ConnectionClosed, InvalidHandshake
    from websockets.sync.client import connect as ws_connect

    try:
        ws = ws_connect(stream_url(url, model, version, detect), open_timeout=30,
                        max_size=16 * 1024 * 1024)
    except (OSError, InvalidHandshake) as error:
        raise ClientError(f"cannot open the stream at {url}: {error}") from None
    try:
        yield ws
    finally:
        with contextlib.suppress(ConnectionClosed, OSError):  # closed by the server already
            ws.close()


def receive_frame_reply(ws: Any, timeout: float | None = None) -> dict[str, Any]:
    """The next reply that answers a frame (command replies are skipped).

    Without `timeout`, waits up to REPLY_TIMEOUT_S and then fails; with it, raises
    TimeoutError when nothing came in time.
    """
    from websockets.exceptions import ConnectionClosed

    while True:
        try:
            reply = json.loads(ws.recv(timeout=timeout or REPLY_TIMEOUT_S))
        except ConnectionClosed as closed:
            reason = closed.rcvd.reason if closed.rcvd else ""
            code = closed.rcvd.code if closed.rcvd else 1006
            raise ClientError(f"the stream was closed: {code} {reason}".strip()) from None
        except TimeoutError:
            if timeout:
                raise
            raise ClientError(f"no reply within {REPLY_TIMEOUT_S:g} s") from None
        if "frame" in reply:
            return reply
        if "command" not in reply:  # refused at connect: the close follows
            error, detail = reply.get("error"), reply.get("detail")
            raise ClientError(f"the stream was refused: {error}: {detail}")


def send_frame(ws: Any, data: bytes) -> None:
    from websockets.exceptions import ConnectionClosed

    try:
        ws.send(data)
    except ConnectionClosed:  # the server closed first: its last message says why
        receive_frame_reply(ws)
        raise ClientError("the stream was closed by the server") from None


def encode(frame: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ClientError("OpenCV could not encode a frame as JPEG")
    return data.tobytes()


def open_capture(video: str | None, camera: int | None) -> cv2.VideoCapture:
    source: str | int
    if video is not None:
        if not Path(video).is_file():
            raise ClientError(f"no such video: {video}")
        source = video
    else:
        source = camera if camera is not None else 0
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        raise ClientError(f"OpenCV cannot open {source!r}")
    return capture


def read_frames(capture: cv2.VideoCapture, limit: int | None = None) -> Iterator[np.ndarray]:
    count = 0
    while limit is None or count < limit:
        ok, frame = capture.read()
        if not ok:
            return
        count += 1
        yield frame


def stream_frames(
    ws: Any, frames: Iterator[np.ndarray], fps: float | None
) -> Iterator[dict[str, Any]]:
    """Send the frames and yield each frame reply. Without `fps`: one frame per reply."""
    if not fps:
        for frame in frames:
            send_frame(ws, encode(frame))
            yield receive_frame_reply(ws)
        return
    sent = {"count": 0, "done": False}
    failure: list[BaseException] = []

    def sender() -> None:
        try:
            next_at = time.monotonic()
            for frame in frames:
                time.sleep(max(0.0, next_at - time.monotonic()))
                next_at += 1 / fps
                ws.send(encode(frame))
                sent["count"] += 1
        except Exception as error:  # the connection closed under us
            failure.append(error)
        finally:
            sent["done"] = True

    thread = threading.Thread(target=sender, name="fer-sender", daemon=True)
    thread.start()
    answered_up_to, last_reply = -1, time.monotonic()
    while not (sent["done"] and answered_up_to >= sent["count"] - 1):
        try:
            reply = receive_frame_reply(ws, timeout=0.25)
        except TimeoutError:
            if time.monotonic() - last_reply > REPLY_TIMEOUT_S:
                raise ClientError(f"no reply within {REPLY_TIMEOUT_S:g} s") from None
            continue
        answered_up_to, last_reply = reply["frame"], time.monotonic()
        yield reply
    thread.join()
    if failure:
        raise ClientError(f"sending failed: {failure[0]}")


# -- drawing ----------------------------------------------------------------------------
def draw_faces(frame: np.ndarray, faces: Sequence[dict[str, Any]], smoothed: bool = True) -> None:
    """Boxes, a label and one probability bar per expression, drawn in place (BGR)."""
    height, width = frame.shape[:2]
    for face in faces:
        probabilities = (smoothed and face.get("smoothed")) or face["probabilities"]
        label = max(CLASSES, key=lambda c: probabilities[c])
        color = COLORS[label]
        box = face["box"]
        x, y, w, h = box["x"], box["y"], box["width"], box["height"]
        cv2.rectangle(frame, (x, y), (x + w, y + h), color, 2)
        title = f"{label} {probabilities[label]:.0%}"
        if face.get("track_id") is not None:
            title += f" #{face['track_id']}"
        (text_w, text_h), _ = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        top = y - text_h - 8 if y - text_h - 8 >= 0 else y  # above the box, or inside it
        cv2.rectangle(frame, (x, top), (x + text_w + 8, top + text_h + 8), color, -1)
        cv2.putText(frame, title, (x + 4, top + text_h + 3), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (255, 255, 255), 1, cv2.LINE_AA)
        row, bar, name_w = 12, 60, 58
        panel_w, panel_h = name_w + bar + 6, row * len(CLASSES) + 4
        # Right of the box, else left of it, else inside its bottom-left corner.
        px, py = x + w + 4, y
        if px + panel_w > width:
            px = x - panel_w - 4
        if px < 0:
            px, py = x + 4, y + h - panel_h - 4
        py = min(max(0, py), max(0, height - panel_h))
        overlay = frame.copy()
        cv2.rectangle(overlay, (px, py), (px + panel_w, py + panel_h), (0, 0, 0), -1)
        cv2.addWeighted(overlay, 0.55, frame, 0.45, 0, dst=frame)
        for i, name in enumerate(CLASSES):
            ry = py + 2 + i * row
            cv2.putText(frame, name, (px + 3, ry + 9), cv2.FONT_HERSHEY_SIMPLEX, 0.33,
                        (255, 255, 255), 1, cv2.LINE_AA)
            length = max(1, round(bar * float(probabilities[name])))
            cv2.rectangle(frame, (px + name_w, ry + 2), (px + name_w + length, ry + row - 2),
                          COLORS[name], -1)


def write_chart(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Stacked areas: the mean probability of each expression over the faces, per frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [r["time_s"] for r in records]
    mix = np.zeros((len(CLASSES), len(records)))
    for j, record in enumerate(records):
        faces = record.get("faces") or []
        for face in faces:
            probabilities = face.get("smoothed") or face["probabilities"]
            mix[:, j] += [probabilities[c] / len(faces) for c in CLASSES]
    figure, axes = plt.subplots(figsize=(10, 3.5), dpi=100)
    colors = [tuple(c / 255 for c in reversed(COLORS[name])) for name in CLASSES]
    axes.stackplot(times, mix, labels=CLASSES, colors=colors, alpha=0.9)
    axes.set(xlabel="time (s)", ylabel="mean probability", ylim=(0, 1),
             xlim=(times[0], times[-1]) if len(times) > 1 else None,
             title="Expression mix over time (frames without a face are empty)")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


# -- commands ---------------------------------------------------------------------------
def print_json(body: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(body, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def run_predict(args: argparse.Namespace) -> int:
    failed = 0
    for name in args.images:
        path = Path(name)
        if not path.is_file():
            print_json({"file": name, "error": "not_found", "detail": f"no such file: {name}"})
            failed += 1
            continue
        body = predict(args.url, path.read_bytes(), args.model, args.version, args.detect)
        failed += "error" in body
        print_json({"file": name, **body})
    return 1 if failed else 0


def run_stream(args: argparse.Namespace) -> int:
    capture = open_capture(args.video, args.camera)
    started = time.monotonic()
    answered = dropped = errors = 0
    latencies = []
    try:
        with connect(args.url, args.model, args.version, args.detect) as ws:
            for reply in stream_frames(ws, read_frames(capture, args.max_frames), args.fps):
                dropped += reply["dropped"]
                if "error" in reply:
                    errors += 1
                else:
                    answered += 1
                    latencies.append(reply["timings"]["latency_ms"])
                print_json(reply)
    except KeyboardInterrupt:
        pass
    finally:
        capture.release()
    elapsed = max(time.monotonic() - started, 1e-9)
    summary = {"answered": answered, "dropped": dropped, "errors": errors,
               "fps": round(answered / elapsed, 2),
               "mean_latency_ms": round(float(np.mean(latencies)), 1) if latencies else None}
    sys.stderr.write(f"summary: {json.dumps(summary)}\n")
    return 1 if errors else 0


def run_annotate(args: argparse.Namespace) -> int:
    if args.chart:  # fail before the work, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ClientError("--chart needs matplotlib: pip install matplotlib "
                              "(or the 'train' extra: pip install 'fer-service[train]')") from None
    capture = open_capture(args.video, None)
    fps = capture.get(cv2.CAP_PROP_FPS) or 0
    fps = fps if 0 < fps <= 1000 else 25.0
    records: list[dict[str, Any]] = []
    writer = None
    jsonl = open(args.jsonl, "w") if args.jsonl else None  # noqa: SIM115
    try:
        with connect(args.url, args.model, args.version, args.detect) as ws:
            for index, frame in enumerate(read_frames(capture)):
                if writer is None:
                    size = (frame.shape[1], frame.shape[0])
                    fourcc = cv2.VideoWriter_fourcc(*"mp4v")
                    writer = cv2.VideoWriter(str(args.out), fourcc, fps, size)
                    if not writer.isOpened():
                        raise ClientError(f"OpenCV cannot write {args.out}")
                send_frame(ws, encode(frame))
                reply = receive_frame_reply(ws)
                record: dict[str, Any] = {"frame": index, "time_s": round(index / fps, 4)}
                if "error" in reply:
                    record.update(error=reply["error"], detail=reply["detail"], faces=[])
                else:
                    record.update(model=reply["model"], version=reply["version"], faces=[
                        {k: face[k] for k in ("track_id", "box", "label", "score", "probabilities",
                                              "smoothed") if k in face}
                        for face in reply["faces"]
                    ])
                    draw_faces(frame, reply["faces"], smoothed=not args.raw)
                writer.write(frame)
                records.append(record)
                if jsonl:
                    jsonl.write(json.dumps(record, separators=(",", ":")) + "\n")
    finally:
        capture.release()
        if writer is not None:
            writer.release()
        if jsonl:
            jsonl.close()
    if not records:
        raise ClientError(f"no frame could be read from {args.video}")
    if args.chart:
        write_chart(Path(args.chart), records)
    errors = sum("error" in r for r in records)
    sys.stderr.write(f"annotated {len(records)} frames ({errors} errors) -> {args.out}\n")
    return 1 if errors else 0


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=DEFAULT_URL,
                        help=f"service URL (default {DEFAULT_URL}; env FER_URL)")
    common.add_argument("--model", help="model name (default: the server's default)")
    common.add_argument("--version", type=int, help="model version (default: latest)")
    common.add_argument("--no-detect", dest="detect", action="store_false",
                        help="treat each image or frame as one face crop")
    root = argparse.ArgumentParser(prog="fer-client", description=__doc__.split("\n\n")[0])
    commands = root.add_subparsers(dest="command", required=True)

    p = commands.add_parser("predict", parents=[common], help="POST images to /predict")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(run=run_predict)

    s = commands.add_parser("stream", parents=[common], help="stream a video or camera")
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument("--video", help="video file")
    source.add_argument("--camera", type=int, help="camera index (0 = the first)")
    s.add_argument("--fps", type=float, help="send at this rate (default: one frame per reply)")
    s.add_argument("--max-frames", type=int, help="stop after this many frames")
    s.set_defaults(run=run_stream)

    a = commands.add_parser("annotate", parents=[common], help="draw the results into a video")
    a.add_argument("--video", required=True, help="input video")
    a.add_argument("--out", required=True, type=Path, help="annotated MP4 to write (mp4v)")
    a.add_argument("--jsonl", type=Path, help="also write one JSON line per frame")
    a.add_argument("--chart", type=Path, help="also write a PNG of the expression mix over time")
    a.add_argument("--raw", action="store_true", help="draw raw, not smoothed, probabilities")
    a.set_defaults(run=run_annotate)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except ClientError as error:
        sys.stderr.write(f"fer-client: {error}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
