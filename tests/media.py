"""Test videos made from the committed photos: MP4 for OpenCV, Y4M for Chromium's fake camera."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from tests.conftest import all_photos

SIZE = 350  # the photos are 350x350


def photo_frames(repeat: int = 2) -> list[np.ndarray]:
    """BGR frames: each photo `repeat` times in a row, so a face stays put for a while."""
    frames = []
    for path in all_photos():
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        image = cv2.resize(image, (SIZE, SIZE))
        frames.extend([image] * repeat)
    return frames


def write_video(path: Path, fps: float = 10, repeat: int = 2) -> int:
    """An MP4 (mp4v) of the photos; returns its frame count."""
    frames = photo_frames(repeat)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (SIZE, SIZE))
    assert writer.isOpened(), "OpenCV cannot write mp4v"
    for frame in frames:
        writer.write(frame)
    writer.release()
    return len(frames)


def read_video(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def write_y4m(path: Path, fps: int = 10, repeat: int = 10) -> int:
    """A raw I420 Y4M file (what `--use-file-for-fake-video-capture` plays, looped)."""
    frames = photo_frames(repeat)
    with path.open("wb") as out:
        out.write(f"YUV4MPEG2 W{SIZE} H{SIZE} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            out.write(b"FRAME\n")
            out.write(cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420).tobytes())
    return len(frames)
