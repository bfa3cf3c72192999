import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from service.batcher import DynamicBatcher, InferenceError, Overloaded
from service.onnx_model import OnnxModel


class RecordingModel:
    """A real ONNX model that also records the size of every batch it runs."""

    def __init__(self, model: OnnxModel, delay_s: float = 0.0, fail: bool = False) -> None:
        self.model, self.delay_s, self.fail = model, delay_s, fail
        self.name, self.version = model.name, model.version
        self.batches: list[int] = []

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(len(batch))
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("simulated runtime failure")
        return self.model.infer(batch)


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
        await batcher.close()


def test_concurrent_requests_share_a_batch_and_match_unbatched_results(onnx_model):
    spy = RecordingModel(onnx_model)
    inputs = [faces(1, seed) for seed in range(8)]

    async def body(batcher):
        return await asyncio.gather(*(batcher.infer(x) for x in inputs))

    results = asyncio.run(with_batcher(spy, body, max_batch_size=32, max_delay_s=0.05))
    assert spy.batches == [8]
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_allclose(result, onnx_model.infer(x), atol=1e-5)
        np.testing.assert_allclose(result.sum(), 1.0, atol=1e-5)


def test_batches_never_exceed_the_maximum(onnx_model):
    spy = RecordingModel(onnx_model)

    async def body(batcher):
        return await asyncio.gather(batcher.infer(faces(5)), batcher.infer(faces(3, 1)),
                                    batcher.infer(faces(2, 2)))

    results = asyncio.run(with_batcher(spy, body, max_batch_size=4, max_delay_s=0.02))
    assert [len(r) for r in results] == [5, 3, 2]
    assert max(spy.batches) <= 4 and sum(spy.batches) == 10


def test_a_full_queue_rejects_with_overloaded(onnx_model):
    spy = RecordingModel(onnx_model, delay_s=0.2)

    async def body(batcher):
        first = asyncio.create_task(batcher.infer(faces(4)))
        await asyncio.sleep(0.05)  # the first batch is running; the queue is empty again
        queued = asyncio.create_task(batcher.infer(faces(4)))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await batcher.infer(faces(4))
        await asyncio.gather(first, queued)

    asyncio.run(with_batcher(spy, body, max_batch_size=4, max_queue_faces=6, max_delay_s=0))


def test_faces_that_waited_too_long_fail_instead_of_running_late(onnx_model):
    spy = RecordingModel(onnx_model, delay_s=0.3)

    async def body(batcher):
        first = asyncio.create_task(batcher.infer(faces(1)))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="waited"):
            await batcher.infer(faces(1))
        await first

    asyncio.run(with_batcher(spy, body, max_batch_size=1, queue_timeout_s=0.1, max_delay_s=0))


def test_a_cancelled_request_is_skipped_and_the_batcher_goes_on(onnx_model):
    spy = RecordingModel(onnx_model, delay_s=0.1)

    async def body(batcher):
        running = asyncio.create_task(batcher.infer(faces(1)))
        await asyncio.sleep(0.02)
        abandoned = asyncio.create_task(batcher.infer(faces(3)))
        await asyncio.sleep(0.01)
        abandoned.cancel()
        await running
        assert len(await batcher.infer(faces(2))) == 2
        assert batcher.queued_faces == 0

    asyncio.run(with_batcher(spy, body, max_batch_size=8, max_delay_s=0))
    assert 3 not in spy.batches


def test_a_failing_model_fails_its_requests_only(onnx_model):
    spy = RecordingModel(onnx_model, fail=True)

    async def body(batcher):
        with pytest.raises(InferenceError):
            await batcher.infer(faces(1))
        spy.fail = False
        return await batcher.infer(faces(1))

    assert asyncio.run(with_batcher(spy, body)).shape == (1, 7)


def test_no_faces_needs_no_inference(onnx_model):
    spy = RecordingModel(onnx_model)

    async def body(batcher):
        return await batcher.infer(np.zeros((0, 1, 48, 48), np.float32))

    assert asyncio.run(with_batcher(spy, body)).shape == (0, 7) and spy.batches == []
