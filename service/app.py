"""The ASGI app: `uvicorn service.app:app` (settings from FER_* environment variables)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from service import streaming
from service.errors import install_error_handlers
from service.logs import configure_logging
from service.middleware import RequestContextMiddleware
from service.routes import demo, health, models, predict, v2
from service.runtime import Runtime
from service.settings import Settings

__version__ = "0.1.0"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_format, settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings)
        app.state.runtime = runtime
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="FER service",
        version=__version__,
        summary="Facial expression recognition: Haar face detection + CNN10 / improved ResNet.",
        lifespan=lifespan,
    )
    app.add_middleware(RequestContextMiddleware)
    install_error_handlers(app)
    app.include_router(predict.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(v2.router)
    app.include_router(streaming.router)
    app.include_router(demo.router)
    app.mount("/static", StaticFiles(directory=demo.STATIC_DIR), name="static")
    return app


app = create_app()
