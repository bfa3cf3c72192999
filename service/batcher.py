"""Dynamic batching, as in Triton: faces from concurrent requests run as one batch.

A batch closes when it holds `max_batch_size` faces or its first face has waited
`max_delay` seconds. While one batch runs on the inference thread, the next one
fills up, so batches grow with load by themselves. The queue is bounded
(`max_queue_faces`) and a face that waited longer than `queue_timeout` is failed
rather than run late: both surface as `Overloaded` (HTTP 503 + Retry-After).

Every request ends. When a version is unloaded or replaced, `close()` lets the batch
already on the inference thread finish (answered by the retiring version, for up to
`queue_timeout`) and fails every other face still here with `ModelUnloaded` (503 +
Retry-After): queued, carried over to the next batch, or collected into one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service import metrics
from service.errors import Overloaded, ServiceError
from service.onnx_model import OnnxModel

__all__ = ["BatcherPool", "DynamicBatcher", "InferenceError", "ModelUnloaded", "Overloaded"]

log = logging.getLogger("service.batcher")

Clock = Callable[[], float]


class ModelUnloaded(Overloaded):
    """The model version was unloaded before this request's faces ran: retry (the next
    attempt gets the version that is loaded now)."""

    code = "model_unloaded"


class InferenceError(ServiceError):
    """The model raised while running a batch; `str()` is the model's own message."""

    status = 500
    code = "inference_failed"

    def __init__(self, message: str) -> None:
        super().__init__(f"the model failed: {message}")
        self.args = (message,)


@dataclass
class _Item:
    inputs: np.ndarray
    future: asyncio.Future[np.ndarray]
    enqueued: float


class DynamicBatcher:
    def __init__(
        self,
        model: OnnxModel,
        max_batch_size: int = 32,
        max_delay_s: float = 0.002,
        max_queue_faces: int = 512,
        queue_timeout_s: float = 5.0,
        clock: Clock = time.perf_counter,
    ) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_faces = max_queue_faces
        self.queue_timeout_s = queue_timeout_s
        self._clock = clock
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._carry: _Item | None = None
        self._taken: list[_Item] = []  # out of the queue, not answered yet: the next batch
        self._queued_faces = 0
        self._idle = asyncio.Event()  # no batch on the inference thread
        self._idle.set()
        self._closing = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{model.name}")
        self._task: asyncio.Task[None] | None = None
        labels = {"model": model.name, "version": str(model.version)}
        self._batch_size = metrics.BATCH_SIZE.labels(**labels)
        self._queue_wait = metrics.QUEUE_WAIT.labels(**labels)
        self._queue_depth = metrics.QUEUE_DEPTH.labels(**labels)
        self._inference = metrics.INFERENCE_LATENCY.labels(**labels)

    @property
    def label(self) -> str:
        return f"{self.model.name}/{self.model.version}"

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"batcher-{self.label}")

    async def close(self, grace_s: float | None = None) -> None:
        """Stop, and end every request still here (see the module's docstring).

        `grace_s` bounds the wait for the batch on the inference thread (default:
        `queue_timeout_s`); past it, that batch's requests fail too.
        """
        if self._closing:
            return
        self._closing = True
        self._fail(self._waiting())  # never started: fail them now rather than after the wait
        grace = self.queue_timeout_s if grace_s is None else grace_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._fail([*self._taken, *self._waiting()])
        self._taken = []
        self._queued_faces = 0
        self._queue_depth.set(0)
        self._executor.shutdown(wait=False)

    def _waiting(self) -> list[_Item]:
        """Take every item not yet collected into a batch (queued or carried over)."""
        items = [] if self._carry is None else [self._carry]
        self._carry = None
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        return items

    def _fail(self, items: list[_Item]) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(ModelUnloaded(
                    f"{self.label} was unloaded before this request's faces ran; retry"))

    @property
    def queued_faces(self) -> int:
        return self._queued_faces

    async def infer(self, inputs: np.ndarray) -> np.ndarray:
        """Probabilities [N, 7] for normalised faces [N, 1, S, S]; N may exceed a batch."""
        if len(inputs) == 0:
            return np.zeros((0, 7), dtype=np.float32)
        if self._closing:
            raise ModelUnloaded(f"{self.label} is being unloaded; retry")
        if self._queued_faces + len(inputs) > self.max_queue_faces:
            metrics.REJECTED.labels(reason="queue_full").inc()
            raise Overloaded(
                f"{self.model.name} has {self._queued_faces} faces queued "
                f"(limit {self.max_queue_faces})"
            )
        loop = asyncio.get_running_loop()
        items = []
        now = self._clock()
        for start in range(0, len(inputs), self.max_batch_size):
            item = _Item(inputs[start : start + self.max_batch_size], loop.create_future(), now)
            items.append(item)
            self._queued_faces += len(item.inputs)
            self._queue.put_nowait(item)
        self._queue_depth.set(self._queued_faces)
        try:
            results = await asyncio.gather(*(item.future for item in items))
        except BaseException:
            for item in items:
                item.future.cancel()  # still queued: the batcher skips cancelled items
            raise
        return np.concatenate(results)

    async def _next_item(self, timeout: float | None) -> _Item | None:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        if not self._queue.empty():  # no wait_for (a task, a loop turn) for what is here
            return self._queue.get_nowait()
        if timeout is None:
            return await self._queue.get()
        try:
            return await asyncio.wait_for(self._queue.get(), timeout=max(timeout, 0))
        except TimeoutError:
            return None

    def _take(self, item: _Item) -> bool:
        """Account for a dequeued item; False if it should not run."""
        self._queued_faces -= len(item.inputs)
        if item.future.done():  # the client went away
            return False
        waited = self._clock() - item.enqueued
        self._queue_wait.observe(waited)  # refused ones too: they are the longest waits
        if waited > self.queue_timeout_s:
            metrics.REJECTED.labels(reason="queue_timeout").inc()
            item.future.set_exception(
                Overloaded(f"waited {waited:.1f}s in the queue (limit {self.queue_timeout_s}s)")
            )
            return False
        return True

    async def _collect(self) -> None:
        """Fill `_taken` with the next batch."""
        size = 0
        deadline: float | None = None
        while size < self.max_batch_size:
            timeout = None if deadline is None else deadline - self._clock()
            item = await self._next_item(timeout)
            if item is None:
                break
            if size + len(item.inputs) > self.max_batch_size:
                self._carry = item  # starts the next batch
                break
            if not self._take(item):
                continue
            self._taken.append(item)
            size += len(item.inputs)
            if deadline is None:
                deadline = self._clock() + self.max_delay_s
        self._queue_depth.set(self._queued_faces)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._collect()
            batch = self._taken
            if not batch:
                continue
            inputs = np.concatenate([item.inputs for item in batch])
            started = time.perf_counter()
            self._idle.clear()
            try:
                probabilities = await loop.run_in_executor(self._executor, self.model.infer, inputs)
            except Exception as error:  # a model failing at run time fails its requests only
                log.exception("inference failed on %s", self.label)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(InferenceError(str(error)))
            else:
                self._inference.observe(time.perf_counter() - started)
                self._batch_size.observe(len(inputs))
                offset = 0
                for item in batch:
                    count = len(item.inputs)
                    if not item.future.done():
                        item.future.set_result(probabilities[offset : offset + count])
                    offset += count
            self._taken = []
            self._idle.set()


class BatcherPool:
    """One running batcher per loaded model version, created on first use."""

    def __init__(self, max_batch_size: int, max_delay_s: float, max_queue_faces: int,
                 queue_timeout_s: float, clock: Clock = time.perf_counter) -> None:
        self._options = {"max_batch_size": max_batch_size, "max_delay_s": max_delay_s,
                         "max_queue_faces": max_queue_faces, "queue_timeout_s": queue_timeout_s,
                         "clock": clock}
        self._batchers: dict[tuple[str, int], DynamicBatcher] = {}
        # Models whose batcher was retired: a request that resolved one before it was
        # unloaded is refused, instead of starting a batcher nobody would close.
        self._retired: weakref.WeakSet[OnnxModel] = weakref.WeakSet()
        self._closing: set[asyncio.Task[None]] = set()

    def for_model(self, model: OnnxModel) -> DynamicBatcher:
        if model in self._retired:
            raise ModelUnloaded(f"{model.name}/{model.version} was unloaded; retry")
        key = (model.name, model.version)
        batcher = self._batchers.get(key)
        if batcher is None or batcher.model is not model:
            if batcher is not None:  # the version was reloaded from disk
                self._retired.add(batcher.model)
                self._close_in_background(batcher)
            batcher = DynamicBatcher(model, **self._options)
            batcher.start()
            self._batchers[key] = batcher
        return batcher

    def _close_in_background(self, batcher: DynamicBatcher) -> None:
        task = asyncio.get_running_loop().create_task(batcher.close(),
                                                      name=f"close-{batcher.label}")
        self._closing.add(task)  # a reference, so the task cannot be collected mid-way
        task.add_done_callback(self._closing.discard)

    @property
    def queued_faces(self) -> int:
        """Faces waiting in every batcher."""
        return sum(batcher.queued_faces for batcher in self._batchers.values())

    async def retire(self, keep: set[tuple[str, int]]) -> None:
        """Stop the batchers of versions no longer loaded, and drop their metric series."""
        retiring = {key: self._batchers.pop(key) for key in list(self._batchers) if key not in keep}
        for batcher in retiring.values():
            self._retired.add(batcher.model)
        await asyncio.gather(*(batcher.close() for batcher in retiring.values()))
        for name, version in retiring:
            if (name, version) not in self._batchers:  # not already serving a reloaded copy
                metrics.forget_version(name, version)

    async def close(self) -> None:
        await self.retire(set())
        await asyncio.gather(*self._closing, return_exceptions=True)
