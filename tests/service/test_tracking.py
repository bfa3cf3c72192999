"""IoU tracking and probability smoothing across a stream's frames."""

from __future__ import annotations

import numpy as np
import pytest

from service.tracking import Tracker, iou

HAPPY = [0, 0, 0, 1, 0, 0, 0]
SAD = [0, 0, 0, 0, 1, 0, 0]


def test_iou() -> None:
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1
    assert iou((0, 0, 10, 10), (20, 20, 10, 10)) == 0
    assert iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)


def test_a_moving_face_keeps_its_id_and_a_new_one_gets_another() -> None:
    tracker = Tracker()
    (first,) = tracker.update([(100, 100, 50, 50)], [HAPPY])
    moved, new = tracker.update([(105, 102, 50, 50), (300, 100, 50, 50)], [HAPPY, SAD])
    assert moved.id == first.id and new.id != first.id
    # Order of the boxes does not matter: matching is by overlap.
    again_new, again_moved = tracker.update([(300, 101, 50, 50), (108, 103, 50, 50)], [SAD, HAPPY])
    assert (again_moved.id, again_new.id) == (first.id, new.id)


def test_probabilities_are_an_exponential_moving_average() -> None:
    tracker = Tracker(alpha=0.5)
    tracker.update([(0, 0, 50, 50)], [HAPPY])
    (track,) = tracker.update([(0, 0, 50, 50)], [SAD])
    np.testing.assert_allclose(track.smoothed, [0, 0, 0, 0.5, 0.5, 0, 0])
    (track,) = tracker.update([(0, 0, 50, 50)], [SAD])
    np.testing.assert_allclose(track.smoothed, [0, 0, 0, 0.25, 0.75, 0, 0])
    (unsmoothed,) = Tracker(alpha=1).update([(0, 0, 50, 50)], [SAD])
    np.testing.assert_allclose(unsmoothed.smoothed, SAD)


def test_a_lost_track_is_forgotten_after_max_missed() -> None:
    tracker = Tracker(max_missed=2)
    (track,) = tracker.update([(0, 0, 50, 50)], [HAPPY])
    tracker.update([], [])
    tracker.update([], [])
    (back,) = tracker.update([(0, 0, 50, 50)], [HAPPY])
    assert back.id == track.id  # missed twice: still known
    for _ in range(3):
        tracker.update([], [])
    (later,) = tracker.update([(0, 0, 50, 50)], [HAPPY])
    assert later.id != track.id
    assert len(tracker.tracks) == 1


def test_reset_forgets_tracks_and_alpha_is_checked() -> None:
    tracker = Tracker()
    (track,) = tracker.update([(0, 0, 50, 50)], [HAPPY])
    tracker.reset()
    (fresh,) = tracker.update([(0, 0, 50, 50)], [SAD])
    assert fresh.id != track.id
    np.testing.assert_allclose(fresh.smoothed, SAD)
    with pytest.raises(ValueError):
        Tracker(alpha=0)
