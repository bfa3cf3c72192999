"""Faces followed across a stream's frames: a stable id per face, smoothed probabilities.

Each frame's boxes are matched to the live tracks greedily by box overlap (IoU, best
pair first). A matched track keeps its id and folds the new probabilities into an
exponential moving average; an unmatched box starts a new track; a track unseen for
`max_missed` frames in a row is forgotten. Pure numpy: one tracker per stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BoxTuple = tuple[int, int, int, int]  # x, y, width, height


def iou(a: BoxTuple, b: BoxTuple) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    overlap_w = min(ax + aw, bx + bw) - max(ax, bx)
    overlap_h = min(ay + ah, by + bh) - max(ay, by)
    if overlap_w <= 0 or overlap_h <= 0:
        return 0.0
    inter = overlap_w * overlap_h
    return inter / float(aw * ah + bw * bh - inter)


@dataclass
class Track:
    id: int
    box: BoxTuple
    smoothed: np.ndarray
    missed: int = 0


class Tracker:
    def __init__(self, alpha: float = 0.5, min_iou: float = 0.3, max_missed: int = 10) -> None:
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self.min_iou = min_iou
        self.max_missed = max_missed
        self.tracks: list[Track] = []
        self._next_id = 1

    def reset(self) -> None:
        """Forget every track (e.g. when the stream switches model); ids keep counting up."""
        self.tracks = []

    def update(
        self, boxes: Sequence[BoxTuple], probabilities: Sequence[Sequence[float]]
    ) -> list[Track]:
        """The track of each box, in the order of `boxes`, with its smoothed probabilities."""
        pairs = sorted(
            (
                (overlap, t, d)
                for t, track in enumerate(self.tracks)
                for d, box in enumerate(boxes)
                if (overlap := iou(track.box, box)) >= self.min_iou
            ),
            reverse=True,
        )
        assigned: dict[int, Track] = {}
        taken: set[int] = set()
        for _, t, d in pairs:
            if t in taken or d in assigned:
                continue
            taken.add(t)
            track = self.tracks[t]
            new = np.asarray(probabilities[d], dtype=np.float64)
            track.smoothed = self.alpha * new + (1 - self.alpha) * track.smoothed
            track.box = tuple(boxes[d])  # type: ignore[assignment]
            track.missed = 0
            assigned[d] = track
        survivors = []
        for t, track in enumerate(self.tracks):
            if t not in taken:
                track.missed += 1
            if track.missed <= self.max_missed:
                survivors.append(track)
        for d, box in enumerate(boxes):
            if d not in assigned:
                track = Track(self._next_id, tuple(box),  # type: ignore[arg-type]
                              np.asarray(probabilities[d], dtype=np.float64))
                self._next_id += 1
                assigned[d] = track
                survivors.append(track)
        self.tracks = survivors
        return [assigned[d] for d in range(len(boxes))]
