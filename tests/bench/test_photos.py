"""The benchmark's camera frames keep the photo, its label, and the frame size."""

import argparse

import cv2
import numpy as np
import pytest

from bench.photos import camera_frame, frame_size, write_frames
from tests.conftest import FACES


def test_camera_frame_centres_the_photo_scaled_to_the_frame_height():
    photo = np.zeros((100, 50, 3), np.uint8)
    photo[:] = 255
    frame = camera_frame(photo, 320, 180)
    assert frame.shape == (180, 320, 3)
    assert (frame[:, 115:205] == 255).all()  # 50x100 scaled to 90x180, centred
    assert (frame[:, :110] == 128).all() and (frame[:, 210:] == 128).all()


def test_frames_keep_the_label_folders(tmp_path):
    write_frames(FACES, tmp_path, 640, 360)
    sources = sorted(p.relative_to(FACES) for p in FACES.glob("*/*.jpg"))
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.glob("*/*.jpg"))
    assert written == sources
    assert cv2.imread(str(tmp_path / written[0])).shape == (360, 640, 3)


def test_frame_size_parses_width_x_height_and_refuses_anything_else():
    assert frame_size("1280x720") == (1280, 720)
    for bad in ("abc", "1280", "0x720", "1280x-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="WIDTHxHEIGHT"):
            frame_size(bad)
