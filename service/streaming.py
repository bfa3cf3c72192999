"""WebSocket /v1/stream: real-time video, one encoded frame per binary message.

Latest frame wins. A receiver task reads every message as it arrives; a frame that
comes while another is still waiting replaces it, and the replaced one is *dropped*.
So a stream holds at most one waiting frame besides the one being processed, however
fast the client sends. A processor task takes the waiting frame whenever it is free,
runs it through the same pipeline and dynamic batcher as /predict, and answers with
one JSON text message. Every binary message gets an index (0, 1, ...) and is accounted
for exactly once: answered (`frame`), dropped (counted in the next frame reply's
`dropped`), or answered with an `error`. The newest frame is never dropped, so the
last frame a client sends is always answered.

Frame reply: `frame`, `dropped`, `model`, `version`, `members`, `image`, `faces`
(as /predict's, plus `track_id` and `smoothed` probabilities per face, see
`service.tracking`), `timings` (as /predict's plus `wait_ms`, the time the frame
waited for the processor, and `latency_ms`, received to answered).
Error reply: `error` (a code), `detail`, and `frame` + `dropped` when it answers a frame.

Text messages are JSON commands, each answered with `command` echoed (or an error):
    {"command": "ping"}
    {"command": "set_model", "model": "cnn10", "version": null}   (null = default / latest)
    {"command": "set_detect", "detect": false}

Errors are those of /predict, with the same codes (`service.errors` maps them once):
an error reply carries `error` and `detail` as /predict's JSON does, plus `retry_after_s`
where /predict would send `Retry-After`. The query is checked by /predict's own model
(`PredictQuery`), and so is a `set_model` command.

Close codes (a JSON error message is sent first when the server closes on an error):
    1000  no message for `stream_idle_timeout_s`
    1008  what /predict answers with a 4xx: invalid query parameter, unknown model or
          version at connect, or (with FER_API_KEYS set) no valid API key: headers as
          /predict's, or ?api_key=<key>
    1009  message over the server's own WebSocket limit (uvicorn --ws-max-size, 16 MiB);
          a message over `stream_max_message_bytes` but under it gets an error reply
    1011  unexpected server error
    1013  what /predict answers with 429 or 503 (the error message carries
          `retry_after_s`): `stream_max_streams` already open, the model configured but
          not loaded yet, or the client's rate limit reached: try again later
The server accepts the connection before refusing it, so that browsers see the code and
the reason (a refusal during the handshake reaches them as a bare HTTP 403).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import APIRouter, FastAPI, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from service import metrics
from service.auth import websocket_credentials
from service.card import CLASSES
from service.errors import (
    INTERNAL_DETAIL,
    INTERNAL_ERROR,
    Overloaded,
    Problem,
    ServiceError,
    problem,
    validation_detail,
)
from service.model_store import Target
from service.routes.predict import MAX_NAME_LENGTH, PredictQuery
from service.runtime import Runtime
from service.schemas import PredictResponse
from service.tracking import Tracker

log = logging.getLogger("service.streaming")

NORMAL = 1000
COMMANDS = ("ping", "set_model", "set_detect")
_SEND_FAILED = (WebSocketDisconnect, RuntimeError, OSError)
# What reading raises once the server side is torn down (a receiver that outlives the
# connection's handler, e.g. when the handler is cancelled while frames are still queued).
_RECEIVE_CLOSED = (anyio.ClosedResourceError, anyio.EndOfStream)

router = APIRouter(tags=["stream"])


class StreamRegistry:
    """The streams open in one app: enforces the limit; `live` lets tests see leaks."""

    def __init__(self) -> None:
        self.open = 0
        self.live: weakref.WeakSet[Stream] = weakref.WeakSet()


def registry(app: FastAPI) -> StreamRegistry:
    found = getattr(app.state, "streams", None)
    if found is None:
        found = app.state.streams = StreamRegistry()
    return found


class BadCommand(ServiceError):
    status = 400
    code = "bad_command"


class UnknownCommand(BadCommand):
    code = "unknown_command"


class TooManyStreams(Overloaded):
    code = "too_many_streams"


@dataclass
class Frame:
    index: int
    data: bytes
    received: float


class Stream:
    def __init__(self, websocket: WebSocket, runtime: Runtime, model: str | None,
                 version: int | None, detect: bool) -> None:
        self.websocket = websocket
        self.runtime = runtime
        self.limit = runtime.settings.stream_max_message_bytes
        self.idle_timeout = runtime.settings.stream_idle_timeout_s
        self.model, self.version, self.detect = model, version, detect
        self.tracker = Tracker(alpha=runtime.settings.stream_smoothing)
        self.tracked: tuple[str, int] | None = None
        self.pending: Frame | None = None
        self.wake = asyncio.Event()
        self.received = 0  # binary messages so far: the next frame's index
        self.dropped = 0  # frames dropped since the last frame reply
        self.processing: Frame | None = None
        self.outcomes = dict.fromkeys(("answered", "dropped", "error"), 0)
        self.send_lock = asyncio.Lock()

    # -- lifecycle ----------------------------------------------------------------------
    async def run(self) -> None:
        name = f"stream-{id(self):x}"
        receiver = asyncio.create_task(self._receive(), name=f"{name}-receiver")
        processor = asyncio.create_task(self._process(), name=f"{name}-processor")
        for task in (receiver, processor):
            task.add_done_callback(_log_failure)
        log.info("stream opened (model %s, version %s, detect %s)",
                 self.model or "default", self.version or "latest", self.detect)
        try:
            await asyncio.wait((receiver, processor), return_when=asyncio.FIRST_COMPLETED)
        finally:
            receiver.cancel()
            processor.cancel()
            for frame in (self.pending, self.processing):  # never to be answered
                if frame is not None:
                    self._count("dropped")
            self.pending = self.processing = None
            log.info("stream closed after %d frames: %s", self.received, self.outcomes)
            await asyncio.wait((receiver, processor))
        close: tuple[int, str] | None = None
        for task in (receiver, processor):
            if task.cancelled():
                continue
            if task.exception() is not None:  # logged by _log_failure
                close = (INTERNAL_ERROR, INTERNAL_DETAIL)
                break
            close = close or task.result()
        if close is not None:
            with contextlib.suppress(*_SEND_FAILED):
                await self.websocket.close(close[0], reason=close[1])

    # -- receiving ----------------------------------------------------------------------
    async def _receive(self) -> tuple[int, str] | None:
        """Read messages until the client leaves (None) or goes idle (a close code)."""
        while True:
            try:
                message = await asyncio.wait_for(self.websocket.receive(), self.idle_timeout)
            except TimeoutError:
                return NORMAL, f"idle timeout: no message for {self.idle_timeout:g} s"
            except _RECEIVE_CLOSED:
                return None
            if message["type"] == "websocket.disconnect":
                return None
            if message.get("bytes") is not None:
                await self._on_frame(message["bytes"])
            elif message.get("text") is not None:
                await self._on_command(message["text"])

    async def _on_frame(self, data: bytes) -> None:
        index = self.received
        self.received += 1
        if len(data) > self.limit:
            sent = await self._send_frame_error(index, Problem(
                413, "frame_too_large",
                f"the frame is {len(data)} bytes; the limit is {self.limit}"))
            if not sent:
                self._count("dropped")
            return
        if self.pending is not None:
            self.dropped += 1
            self._count("dropped")
        self.pending = Frame(index, data, time.perf_counter())
        self.wake.set()

    async def _on_command(self, text: str) -> None:
        name = None
        try:
            if len(text) > self.limit:
                raise BadCommand(f"the message is over the limit of {self.limit} bytes")
            try:
                command = json.loads(text)
            except ValueError as error:
                raise BadCommand(f"not JSON: {error}") from None
            if not isinstance(command, dict) or not isinstance(command.get("command"), str):
                raise BadCommand('expected a JSON object such as {"command": "ping"}')
            name = command["command"][:MAX_NAME_LENGTH]
            reply = self._run_command(name, command)
        except ServiceError as error:
            await self._send({"command": name, **problem(error).body()})
        else:
            await self._send({"command": name, **reply})

    def _run_command(self, name: str, command: dict[str, Any]) -> dict[str, Any]:
        if name == "ping":
            return {"pong": True, "time": time.time()}
        if name == "set_model":
            try:
                query = PredictQuery(model=command.get("model"), version=command.get("version"))
            except ValidationError as error:
                raise BadCommand(validation_detail(error.errors())) from None
            target = self.runtime.resolve(query.model, query.version)
            self.model, self.version = query.model, query.version
            return {"model": target.name, "version": target.version}
        if name == "set_detect":
            detect = command.get("detect")
            if not isinstance(detect, bool):
                raise BadCommand("'detect' must be true or false")
            self.detect = detect
            return {"detect": detect}
        raise UnknownCommand(f"unknown command {name!r}; known: {', '.join(COMMANDS)}")

    # -- processing ---------------------------------------------------------------------
    async def _process(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            frame, self.pending = self.pending, None
            if frame is None:
                continue
            self.processing = frame
            if not await self._answer(frame):
                return  # the client is gone (the frame counts as dropped); the receiver sees it
            self.processing = None

    async def _answer(self, frame: Frame) -> bool:
        started = time.perf_counter()
        try:
            target = self.runtime.resolve(self.model, self.version)
            result = await self.runtime.pipeline.predict(frame.data, target, self.detect)
        except Exception as error:  # answered as /predict would be; the stream goes on
            answer = problem(error)
            if answer.code == "internal_error":
                log.exception("frame %d failed", frame.index)
            return await self._send_frame_error(frame.index, answer)
        body = result.model_dump()
        body["faces"] = self._track(target, result)
        body["timings"]["wait_ms"] = round((started - frame.received) * 1000, 2)
        async with self.send_lock:
            latency = time.perf_counter() - frame.received
            body["timings"]["latency_ms"] = round(latency * 1000, 2)
            reply = {"frame": frame.index, "dropped": self._take_dropped(), **body}
            if not await self._send_locked(reply):
                return False
        self._count("answered")
        metrics.FRAME_LATENCY.observe(latency)
        return True

    def _track(self, target: Target, result: PredictResponse) -> list[dict[str, Any]]:
        if self.tracked != (target.name, target.version):
            self.tracker.reset()  # probabilities of different models don't mix
            self.tracked = (target.name, target.version)
        boxes = [(f.box.x, f.box.y, f.box.width, f.box.height) for f in result.faces]
        probabilities = [[getattr(f.probabilities, c) for c in CLASSES] for f in result.faces]
        tracks = self.tracker.update(boxes, probabilities)
        return [
            {**face.model_dump(), "track_id": track.id, "smoothed": rounded(track.smoothed)}
            for face, track in zip(result.faces, tracks, strict=True)
        ]

    # -- sending ------------------------------------------------------------------------
    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        metrics.STREAM_FRAMES.labels(outcome=outcome).inc()

    def _take_dropped(self) -> int:
        dropped, self.dropped = self.dropped, 0
        return dropped

    async def _send_frame_error(self, index: int, answer: Problem) -> bool:
        async with self.send_lock:
            reply = {"frame": index, "dropped": self._take_dropped(), **answer.body()}
            if not await self._send_locked(reply):
                return False
        self._count("error")
        return True

    async def _send(self, reply: dict[str, Any]) -> bool:
        async with self.send_lock:
            return await self._send_locked(reply)

    async def _send_locked(self, reply: dict[str, Any]) -> bool:
        try:
            await self.websocket.send_text(json.dumps(reply, separators=(",", ":")))
        except _SEND_FAILED:
            return False
        return True


def _log_failure(task: asyncio.Task[Any]) -> None:
    """Log a stream task's error even when `Stream.run` was cancelled before it could.

    Retrieving it here also keeps asyncio from logging "exception was never retrieved"
    whenever the task is collected.
    """
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("stream task %s failed", task.get_name(), exc_info=error)


def rounded(probabilities: Sequence[float]) -> dict[str, float]:
    return {c: round(float(p), 6) for c, p in zip(CLASSES, probabilities, strict=True)}


async def refuse(websocket: WebSocket, error: Exception) -> None:
    answer = problem(error)
    with contextlib.suppress(*_SEND_FAILED):
        await websocket.send_text(json.dumps(answer.body()))
        # A close reason is at most 123 bytes of UTF-8.
        reason = answer.detail.encode()[:120].decode(errors="ignore")
        await websocket.close(answer.close_code, reason=reason)


@router.websocket("/v1/stream")
async def stream(websocket: WebSocket) -> None:
    """Query parameters as /predict: `model`, `version`, `detect`; and `api_key`."""
    runtime: Runtime = websocket.app.state.runtime
    streams = registry(websocket.app)
    await websocket.accept()
    try:
        runtime.guard.admit(websocket_credentials(websocket.headers, websocket.query_params),
                            websocket.client.host if websocket.client else None)
    except ServiceError as error:  # no valid API key (1008), rate limited (1013)
        await refuse(websocket, error)
        return
    limit = runtime.settings.stream_max_streams
    if streams.open >= limit:
        metrics.REJECTED.labels(reason="too_many_streams").inc()
        await refuse(websocket, TooManyStreams(
            f"{streams.open} streams are open (limit {limit}); try again later"))
        return
    streams.open += 1
    metrics.STREAMS_OPEN.inc()
    try:
        try:
            fields = PredictQuery.model_fields
            query = PredictQuery.model_validate(
                {key: value for key, value in websocket.query_params.items() if key in fields})
            runtime.resolve(query.model, query.version)
        except (ServiceError, ValidationError) as error:
            await refuse(websocket, error)
            return
        session = Stream(websocket, runtime, query.model, query.version, query.detect)
        streams.live.add(session)
        await session.run()
    finally:
        streams.open -= 1
        metrics.STREAMS_OPEN.dec()

