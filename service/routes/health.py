"""Liveness, readiness and the Prometheus scrape."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service import metrics
from service.runtime import RuntimeDep
from service.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up and its event loop answers."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(runtime: RuntimeDep) -> Response:
    """200 once at least one model version is loaded and warmed up, else 503."""
    loaded = runtime.store.loaded_count()
    if runtime.ready and loaded:
        return JSONResponse(Health(status="ready", models_loaded=loaded).model_dump())
    detail = "loading models" if not runtime.ready else "no model version could be loaded"
    return JSONResponse(
        Health(status="not_ready", models_loaded=loaded, detail=detail).model_dump(),
        status_code=503,
    )


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
