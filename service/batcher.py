"""Dynamic batching, as in Triton: faces from concurrent requests run as one batch.

A batch closes when it holds `max_batch_size` faces or its first face has waited
`max_delay` seconds. While one batch runs on the inference thread, the next one
fills up, so batches grow with load by themselves. The queue is bounded
(`max_queue_faces`) and a face that waited longer than `queue_timeout` is failed
rather than run late: both surface as `Overloaded` (HTTP 503 + Retry-After).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service import metrics
from service.onnx_model import OnnxModel

log = logging.getLogger("service.batcher")


class Overloaded(Exception):
    """The service cannot take this work now; the client should retry later."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _Item:
    inputs: np.ndarray
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    def __init__(
        self,
        model: OnnxModel,
        max_batch_size: int = 32,
        max_delay_s: float = 0.002,
        max_queue_faces: int = 512,
        queue_timeout_s: float = 5.0,
    ) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_faces = max_queue_faces
        self.queue_timeout_s = queue_timeout_s
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._carry: _Item | None = None
        self._queued_faces = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{model.name}")
        self._task: asyncio.Task[None] | None = None
        labels = {"model": model.name, "version": str(model.version)}
        self._batch_size = metrics.BATCH_SIZE.labels(**labels)
        self._queue_wait = metrics.QUEUE_WAIT.labels(**labels)
        self._queue_depth = metrics.QUEUE_DEPTH.labels(**labels)
        self._inference = metrics.INFERENCE_LATENCY.labels(**labels)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"batcher-{self.model.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(Overloaded("the model was unloaded"))
        self._executor.shutdown(wait=False)

    @property
    def queued_faces(self) -> int:
        return self._queued_faces

    async def infer(self, inputs: np.ndarray) -> np.ndarray:
        """Probabilities [N, 7] for normalised faces [N, 1, S, S]; N may exceed a batch."""
        if len(inputs) == 0:
            return np.zeros((0, 7), dtype=np.float32)
        if self._queued_faces + len(inputs) > self.max_queue_faces:
            metrics.REJECTED.labels(reason="queue_full").inc()
            raise Overloaded(
                f"{self.model.name} has {self._queued_faces} faces queued "
                f"(limit {self.max_queue_faces})"
            )
        loop = asyncio.get_running_loop()
        items = []
        for start in range(0, len(inputs), self.max_batch_size):
            item = _Item(inputs[start : start + self.max_batch_size], loop.create_future())
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
        waited = time.perf_counter() - item.enqueued
        if waited > self.queue_timeout_s:
            metrics.REJECTED.labels(reason="queue_timeout").inc()
            item.future.set_exception(
                Overloaded(f"waited {waited:.1f}s in the queue (limit {self.queue_timeout_s}s)")
            )
            return False
        self._queue_wait.observe(waited)
        return True

    async def _collect(self) -> list[_Item]:
        batch: list[_Item] = []
        size = 0
        deadline: float | None = None
        while size < self.max_batch_size:
            timeout = None if deadline is None else deadline - time.perf_counter()
            item = await self._next_item(timeout)
            if item is None:
                break
            if size + len(item.inputs) > self.max_batch_size:
                self._carry = item  # starts the next batch
                break
            if not self._take(item):
                continue
            batch.append(item)
            size += len(item.inputs)
            if deadline is None:
                deadline = time.perf_counter() + self.max_delay_s
        self._queue_depth.set(self._queued_faces)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            inputs = np.concatenate([item.inputs for item in batch])
            started = time.perf_counter()
            try:
                probabilities = await loop.run_in_executor(self._executor, self.model.infer, inputs)
            except Exception as error:  # a model failing at run time fails its requests only
                log.exception("inference failed on %s/%s", self.model.name, self.model.version)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(InferenceError(str(error)))
                continue
            self._inference.observe(time.perf_counter() - started)
            self._batch_size.observe(len(inputs))
            offset = 0
            for item in batch:
                count = len(item.inputs)
                if not item.future.done():
                    item.future.set_result(probabilities[offset : offset + count])
                offset += count


class InferenceError(RuntimeError):
    """The model raised while running a batch."""


class BatcherPool:
    """One running batcher per loaded model version, created on first use."""

    def __init__(self, max_batch_size: int, max_delay_s: float, max_queue_faces: int,
                 queue_timeout_s: float) -> None:
        self._options = dict(max_batch_size=max_batch_size, max_delay_s=max_delay_s,
                             max_queue_faces=max_queue_faces, queue_timeout_s=queue_timeout_s)
        self._batchers: dict[tuple[str, int], DynamicBatcher] = {}

    def for_model(self, model: OnnxModel) -> DynamicBatcher:
        key = (model.name, model.version)
        batcher = self._batchers.get(key)
        if batcher is None or batcher.model is not model:
            if batcher is not None:  # the version was reloaded from disk
                asyncio.get_running_loop().create_task(batcher.close())
            batcher = DynamicBatcher(model, **self._options)
            batcher.start()
            self._batchers[key] = batcher
        return batcher

    @property
    def queued_faces(self) -> int:
        """Faces waiting in every batcher."""
        return sum(batcher.queued_faces for batcher in self._batchers.values())

    async def retire(self, keep: set[tuple[str, int]]) -> None:
        """Stop the batchers of versions no longer loaded."""
        for key in [k for k in self._batchers if k not in keep]:
            await self._batchers.pop(key).close()

    async def close(self) -> None:
        await self.retire(set())
