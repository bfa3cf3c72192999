"""A bounded load generator for the rollout test: a few clients POST /predict in a loop
(keep-alive, as a load balancer's connections are) and record every request's fate."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx


@dataclass
class Outcome:
    sent: float  # time.monotonic() just before the request was written
    done: float  # and when its answer (or error) came
    status: int | None  # None: no answer (refused, reset, cut off)
    retry_after: str | None = None
    version: int | None = None
    error: str | None = None


@dataclass
class Load:
    url: str
    body: bytes
    clients: int = 4
    max_requests: int = 2000
    max_seconds: float = 300
    outcomes: list[Outcome] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        self._deadline = time.monotonic() + self.max_seconds
        self._threads = [threading.Thread(target=self._client, daemon=True)
                         for _ in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def answered(self, version: int | None = None) -> int:
        with self._lock:
            return sum(o.status == 200 and version in (None, o.version) for o in self.outcomes)

    def _record(self, outcome: Outcome) -> bool:
        """Keep `outcome`; False once the bound on requests is reached."""
        with self._lock:
            self.outcomes.append(outcome)
            return len(self.outcomes) < self.max_requests

    def _client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                sent = time.monotonic()
                try:
                    response = client.post(
                        "/predict", content=self.body, headers={"content-type": "image/jpeg"}
                    )
                except httpx.TransportError as error:
                    more = self._record(
                        Outcome(sent, time.monotonic(), None, error=type(error).__name__)
                    )
                    if not more or isinstance(error, httpx.ConnectError):
                        return  # refused: the server has stopped listening
                    continue
                outcome = Outcome(
                    sent, time.monotonic(), response.status_code,
                    response.headers.get("retry-after"),
                    response.json().get("version") if response.status_code == 200 else None,
                )
                if not self._record(outcome):
                    return


def summary(outcomes: list[Outcome]) -> str:
    def fate(o: Outcome) -> str:
        if o.status is None:
            return o.error or "no answer"
        version = f" v{o.version}" if o.version is not None else ""
        return f"{o.status}{version}" + (" +Retry-After" if o.retry_after else "")

    counts = Counter(fate(o) for o in outcomes)
    return ", ".join(f"{what}: {n}" for what, n in sorted(counts.items())) or "none"
