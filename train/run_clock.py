"""A clock for a run's time budget that leaves out the time the process was stopped.

Long runs get paused (`kill -STOP` while a benchmark needs idle cores, a suspended laptop)
and a `--time-budget` cosine should not decay while nothing trains. A stopped process
cannot see the stop, but all its threads stop with it: a watchdog thread that wakes every
`interval` seconds sees a gap far longer than its sleep and books the excess as paused.
A thread merely starved of CPU wakes late by milliseconds, not by `threshold` seconds.
"""

from __future__ import annotations

import threading
import time


class RunClock:
    def __init__(self, interval: float = 0.5, threshold: float = 2.0) -> None:
        self.interval = interval
        self.threshold = threshold
        self._paused = 0.0
        self._last_wake = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="run-clock", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                now = time.perf_counter()
                self._paused += self._pause_in(now - self._last_wake)
                self._last_wake = now

    def _pause_in(self, gap: float) -> float:
        return gap - self.interval if gap > self.interval + self.threshold else 0.0

    def _read(self) -> tuple[float, float]:
        with self._lock:
            now = time.perf_counter()
            # A pause the watchdog has not woken up to book yet (the moments after SIGCONT).
            return now, self._paused + self._pause_in(now - self._last_wake)

    @property
    def paused_seconds(self) -> float:
        return self._read()[1]

    def now(self) -> float:
        """Seconds on a monotonic clock that stands still while the process is stopped
        (to within the watchdog's interval)."""
        now, paused = self._read()
        return now - paused

    def close(self) -> None:
        self._stop.set()
        self._watchdog.join()
