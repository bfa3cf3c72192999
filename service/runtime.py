"""The service's resources, owned by the app's lifespan: store, detector, batchers, pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated

import cv2
from fastapi import Depends, Request

from service import metrics
from service.auth import Guard
from service.batcher import BatcherPool
from service.detector import create_detector
from service.model_store import ModelNotLoaded, ModelStore, Target
from service.onnx_model import choose_providers
from service.pipeline import Pipeline
from service.settings import Settings

log = logging.getLogger("service.runtime")


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.providers = choose_providers(settings.device)
        self.store = ModelStore(
            settings.model_store,
            policy=settings.version_policy,
            providers=self.providers,
            threads=settings.effective_ort_threads,
            ensemble_members=settings.ensemble_members,
            int8=settings.int8,
        )
        self.detector = create_detector(settings.detector, settings.detector_config,
                                        settings.retinaface_config, self.providers)
        self.batchers = BatcherPool(
            max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_delay_ms / 1000,
            max_queue_faces=settings.max_queue_faces,
            queue_timeout_s=settings.queue_timeout_ms / 1000,
        )
        self.pipeline = Pipeline(
            self.detector,
            self.batchers,
            cpu_threads=settings.effective_cpu_threads,
            max_pixels=settings.max_pixels,
            max_inflight=settings.max_inflight_requests,
        )
        self.guard = Guard(settings.api_key_list, settings.rate_limit_per_minute)
        self.ready = False
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        # Parallelism comes from concurrent requests on the CPU pool; OpenCV's own
        # threads on top of that would oversubscribe the cores.
        cv2.setNumThreads(1)
        log.info("execution providers: %s", self.providers)
        keys, rate = len(self.settings.api_key_list), self.settings.rate_limit_per_minute
        log.info("API keys: %s; rate limit: %s", keys or "off (open access)",
                 f"{rate}/min" if rate else "off")
        self._tasks.append(asyncio.create_task(self._load_then_poll(), name="model-store"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.batchers.close()
        self.pipeline.close()

    async def sync_models(self) -> None:
        result = await asyncio.to_thread(self.store.sync)
        await self.batchers.retire(
            {(name, v) for name, versions in self.store.models.items() for v in versions}
        )
        metrics.MODELS_LOADED.set(self.store.loaded_count())
        metrics.MODEL_LOAD_FAILURES.set(len(self.store.failures))
        if result.loaded or result.unloaded:
            log.info("model store: loaded %s, unloaded %s", result.loaded, result.unloaded)

    async def _load_then_poll(self) -> None:
        try:
            await self.sync_models()
        except Exception:
            log.exception("loading the model store failed")
        self.ready = True
        if not self.store.loaded_count():
            log.error("no model could be loaded from %s", self.settings.model_store)
        interval = self.settings.reload_interval_s
        while interval > 0:
            await asyncio.sleep(interval)
            try:
                await self.sync_models()
            except Exception:
                log.exception("re-scanning the model store failed")

    # -- lookup -------------------------------------------------------------------------
    def default_model_name(self) -> str:
        names = self.store.names()
        if self.settings.default_model in names or not names:
            return self.settings.default_model
        return names[0]

    def resolve(self, name: str | None, version: int | None) -> Target:
        if not name and not self.store.loaded_count():
            raise ModelNotLoaded("no model is loaded yet; see /readyz")
        return self.store.resolve(name or self.default_model_name(), version)


async def get_runtime(request: Request) -> Runtime:
    # async: FastAPI runs a plain `def` dependency in a worker thread, a hop per request.
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
