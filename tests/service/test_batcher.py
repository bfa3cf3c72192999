"""DynamicBatcher and BatcherPool, driven by events and a fake clock, never by sleeps.

The model is a real ONNX model behind a gate: each batch announces that it started and
then waits until the test opens the gate, so a test knows what is running, queued or
carried over at every step, however slow the machine.
"""

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from service import metrics
from service.batcher import (
    BatcherPool,
    DynamicBatcher,
    InferenceError,
    ModelUnloaded,
    Overloaded,
)
from service.onnx_model import OnnxModel

HANG_GUARD_S = 60  # only ever reached when something hangs


class GatedModel:
    """A real ONNX model whose batches wait for `gate`; records each batch's size."""

    def __init__(self, model: OnnxModel, fail: bool = False, open_gate: bool = True) -> None:
        self.fail = fail
        self.name, self.version = model.name, model.version
        self._infer = model.infer
        self.batches: list[int] = []
        self.gate = threading.Event()
        if open_gate:
            self.gate.set()
        self._started = threading.Condition()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with self._started:
            self.batches.append(len(batch))
            self._started.notify_all()
        if not self.gate.wait(HANG_GUARD_S):
            raise TimeoutError("the test never opened the gate")
        if self.fail:
            raise RuntimeError("simulated runtime failure")
        return self._infer(batch)

    async def started(self, count: int) -> None:
        """Return once `count` batches have reached the model."""
        def wait() -> None:
            with self._started:
                if not self._started.wait_for(lambda: len(self.batches) >= count, HANG_GUARD_S):
                    raise TimeoutError(f"only {len(self.batches)} of {count} batches started")
        await asyncio.to_thread(wait)


@contextmanager
def gated(model: OnnxModel) -> Iterator[GatedModel]:
    """Gate a model the service is serving (its batches wait until the gate opens)."""
    gate = GatedModel(model, open_gate=False)
    model.infer = gate.infer  # the batcher calls model.infer
    try:
        yield gate
    finally:
        gate.gate.set()
        del model.infer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def onnx_model(model_store: Path) -> OnnxModel:
    return OnnxModel(model_store / "cnn10" / "1", ["CPUExecutionProvider"], threads=1)


def faces(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 1, 48, 48)).astype(np.float32)


async def with_batcher(model, body, **options):
    batcher = DynamicBatcher(model, **options)
    batcher.start()
    try:
        return await body(batcher)
    finally:
        if hasattr(model, "gate"):
            model.gate.set()
        await batcher.close()


async def ended(tasks) -> None:
    """Every task has finished (the guard only matters when one hangs)."""
    _, pending = await asyncio.wait(tasks, timeout=HANG_GUARD_S)
    assert not pending, f"{len(pending)} requests never ended"


def queue_depth(model) -> float | None:
    labels = {"model": model.name, "version": str(model.version)}
    return metrics.REGISTRY.get_sample_value("fer_queue_depth", labels)


def test_concurrent_requests_share_a_batch_and_match_unbatched_results(onnx_model):
    spy = GatedModel(onnx_model)
    inputs = [faces(1, seed) for seed in range(8)]

    async def body(batcher):
        return await asyncio.gather(*(batcher.infer(x) for x in inputs))

    results = asyncio.run(with_batcher(spy, body, max_batch_size=32, max_delay_s=0.05))
    assert spy.batches == [8]
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_allclose(result, onnx_model.infer(x), atol=1e-5)
        np.testing.assert_allclose(result.sum(), 1.0, atol=1e-5)


def test_batches_never_exceed_the_maximum(onnx_model):
    spy = GatedModel(onnx_model)

    async def body(batcher):
        return await asyncio.gather(batcher.infer(faces(5)), batcher.infer(faces(3, 1)),
                                    batcher.infer(faces(2, 2)))

    results = asyncio.run(with_batcher(spy, body, max_batch_size=4, max_delay_s=0.02))
    assert [len(r) for r in results] == [5, 3, 2]
    assert max(spy.batches) <= 4 and sum(spy.batches) == 10


def test_a_full_queue_rejects_with_overloaded(onnx_model):
    spy = GatedModel(onnx_model, open_gate=False)

    async def body(batcher):
        first = asyncio.create_task(batcher.infer(faces(4)))
        await spy.started(1)  # the first batch is on the model; the queue is empty again
        queued = asyncio.create_task(batcher.infer(faces(4)))
        await asyncio.sleep(0)
        assert batcher.queued_faces == 4
        with pytest.raises(Overloaded, match="limit 6"):
            await batcher.infer(faces(4))
        spy.gate.set()
        assert [len(r) for r in await asyncio.gather(first, queued)] == [4, 4]

    asyncio.run(with_batcher(spy, body, max_batch_size=4, max_queue_faces=6, max_delay_s=0))


def test_faces_that_waited_too_long_fail_instead_of_running_late(onnx_model):
    spy = GatedModel(onnx_model, open_gate=False)
    clock = FakeClock()
    labels = {"model": spy.name, "version": str(spy.version)}

    def waits() -> float:
        return metrics.REGISTRY.get_sample_value("fer_queue_wait_seconds_count", labels) or 0

    async def body(batcher):
        first = asyncio.create_task(batcher.infer(faces(1)))
        await spy.started(1)
        late = asyncio.create_task(batcher.infer(faces(1)))
        on_time = asyncio.create_task(batcher.infer(faces(1, 1)))
        await asyncio.sleep(0)
        clock.now += 10  # both wait for 10 s while the first batch runs
        before = waits()
        spy.gate.set()
        await first
        with pytest.raises(Overloaded, match="waited 10.0s"):
            await late
        with pytest.raises(Overloaded, match="waited"):
            await on_time
        assert waits() == before + 2  # the refused waits are measured too
        assert len(await batcher.infer(faces(1))) == 1  # a fresh face runs
        assert spy.batches == [1, 1]

    asyncio.run(with_batcher(spy, body, max_batch_size=1, queue_timeout_s=5, max_delay_s=0,
                             clock=clock))


def test_a_cancelled_request_is_skipped_and_the_batcher_goes_on(onnx_model):
    spy = GatedModel(onnx_model, open_gate=False)

    async def body(batcher):
        running = asyncio.create_task(batcher.infer(faces(1)))
        await spy.started(1)
        abandoned = asyncio.create_task(batcher.infer(faces(3)))
        await asyncio.sleep(0)
        abandoned.cancel()
        spy.gate.set()
        await running
        assert len(await batcher.infer(faces(2))) == 2
        assert batcher.queued_faces == 0

    asyncio.run(with_batcher(spy, body, max_batch_size=8, max_delay_s=0))
    assert 3 not in spy.batches


def test_a_failing_model_fails_its_requests_only(onnx_model):
    spy = GatedModel(onnx_model, fail=True)

    async def body(batcher):
        with pytest.raises(InferenceError, match="simulated runtime failure") as raised:
            await batcher.infer(faces(1))
        assert (raised.value.status, raised.value.code) == (500, "inference_failed")
        assert raised.value.detail == "the model failed: simulated runtime failure"
        spy.fail = False
        return await batcher.infer(faces(1))

    assert asyncio.run(with_batcher(spy, body)).shape == (1, 7)


def test_no_faces_needs_no_inference(onnx_model):
    spy = GatedModel(onnx_model)

    async def body(batcher):
        return await batcher.infer(np.zeros((0, 1, 48, 48), np.float32))

    assert asyncio.run(with_batcher(spy, body)).shape == (0, 7) and spy.batches == []


# -- a version retired while its requests are running, carried over, queued ------------
def test_close_ends_every_request_running_carried_and_queued(onnx_model):
    """The running batch is answered by the retiring version; the rest get 503."""
    spy = GatedModel(onnx_model, open_gate=False)

    async def main():
        batcher = DynamicBatcher(spy, max_batch_size=4, max_delay_s=0)
        batcher.start()
        running = asyncio.create_task(batcher.infer(faces(3)))
        carried = asyncio.create_task(batcher.infer(faces(2)))  # 3 + 2 > 4: the next batch
        await spy.started(1)
        queued = asyncio.create_task(batcher.infer(faces(1)))
        await asyncio.sleep(0)
        assert batcher.queued_faces == 3 and queue_depth(spy) == 3
        closing = asyncio.create_task(batcher.close())
        await asyncio.sleep(0)
        with pytest.raises(ModelUnloaded):  # refused once closing
            await batcher.infer(faces(1))
        spy.gate.set()
        await ended([running, carried, queued, closing])
        assert running.result().shape == (3, 7)
        for task in (carried, queued):
            error = task.exception()
            assert isinstance(error, ModelUnloaded) and error.status == 503
            assert error.retry_after_s >= 1
        assert spy.batches == [3]
        assert batcher.queued_faces == 0 and queue_depth(spy) == 0

    asyncio.run(main())


def test_close_fails_a_batch_still_collecting(onnx_model):
    """Faces taken from the queue while the batch waits for company are answered too."""
    spy = GatedModel(onnx_model)

    async def main():
        batcher = DynamicBatcher(spy, max_batch_size=8, max_delay_s=3600)
        batcher.start()
        collecting = asyncio.create_task(batcher.infer(faces(2)))
        for _ in range(3):
            await asyncio.sleep(0)  # the batcher takes it and waits an hour for more
        assert batcher.queued_faces == 0
        await batcher.close()
        await ended([collecting])
        assert isinstance(collecting.exception(), ModelUnloaded) and spy.batches == []

    asyncio.run(main())


def test_close_stops_waiting_for_a_stuck_batch_after_the_grace(onnx_model):
    spy = GatedModel(onnx_model, open_gate=False)

    async def main():
        batcher = DynamicBatcher(spy, max_batch_size=4, max_delay_s=0)
        batcher.start()
        stuck = asyncio.create_task(batcher.infer(faces(1)))
        await spy.started(1)
        await batcher.close(grace_s=0)
        await ended([stuck])
        assert isinstance(stuck.exception(), ModelUnloaded)
        spy.gate.set()  # the thread finishes; its answer goes nowhere

    asyncio.run(main())


def test_retiring_a_version_ends_its_requests_and_drops_its_series(onnx_model):
    spy = GatedModel(onnx_model, open_gate=False)

    async def main():
        pool = BatcherPool(max_batch_size=4, max_delay_s=0, max_queue_faces=64,
                           queue_timeout_s=5)
        running = asyncio.create_task(pool.for_model(spy).infer(faces(1)))
        await spy.started(1)
        queued = asyncio.create_task(pool.for_model(spy).infer(faces(1)))
        await asyncio.sleep(0)
        assert queue_depth(spy) == 1
        retiring = asyncio.create_task(pool.retire(keep=set()))
        await asyncio.sleep(0)
        # A request that resolved the model before it was unloaded is refused, rather
        # than given a new batcher that nobody would close.
        with pytest.raises(ModelUnloaded):
            pool.for_model(spy)
        spy.gate.set()
        await ended([running, queued, retiring])
        assert running.result().shape == (1, 7)
        assert isinstance(queued.exception(), ModelUnloaded)
        assert pool.queued_faces == 0
        assert queue_depth(spy) is None  # the retired version's series are gone
        await pool.close()

    asyncio.run(main())


def test_a_reloaded_version_closes_the_old_batcher_and_keeps_a_reference(onnx_model):
    old, new = GatedModel(onnx_model, open_gate=False), GatedModel(onnx_model)

    async def main():
        pool = BatcherPool(max_batch_size=4, max_delay_s=0, max_queue_faces=64,
                           queue_timeout_s=5)
        running = asyncio.create_task(pool.for_model(old).infer(faces(1)))
        await old.started(1)
        assert (await pool.for_model(new).infer(faces(1))).shape == (1, 7)
        assert len(pool._closing) == 1  # the old batcher's close task is held
        with pytest.raises(ModelUnloaded):
            pool.for_model(old)
        old.gate.set()
        await pool.close()
        await ended([running])
        assert running.result().shape == (1, 7) and not pool._closing

    asyncio.run(main())
