"""GET /v1/models and /v1/models/{name}: what is loaded, and each version's card."""

from __future__ import annotations

from fastapi import APIRouter

from service.card import CLASSES
from service.model_store import ENSEMBLE_NAME, ENSEMBLE_VERSION
from service.onnx_model import OnnxModel
from service.runtime import Runtime, RuntimeDep
from service.schemas import ErrorResponse, ModelInfo, ModelList, ModelRef, ModelVersionInfo

router = APIRouter(prefix="/v1/models", tags=["models"])


def members_precision(members: tuple[OnnxModel, ...]) -> str:
    precisions = {m.precision for m in members}
    return precisions.pop() if len(precisions) == 1 else "mixed"


def model_info(runtime: Runtime, name: str) -> ModelInfo:
    store = runtime.store
    if name == ENSEMBLE_NAME:
        target = store.resolve(ENSEMBLE_NAME)
        return ModelInfo(
            name=name, latest_version=ENSEMBLE_VERSION, classes=list(CLASSES),
            versions=[ModelVersionInfo(
                version=ENSEMBLE_VERSION, architecture="mean of member probabilities",
                provider=target.members[0].provider, input_size=target.members[0].input_size,
                precision=members_precision(target.members),
                tta=[], metrics={}, training={},
            )],
            members=[ModelRef(name=m.name, version=m.version) for m in target.members],
        )
    versions = store.models.get(name)
    if not versions:
        store.get(name)  # raises: unknown (404), or configured but not loaded yet (503)
        versions = store.models[name]  # loaded meanwhile
    return ModelInfo(
        name=name,
        latest_version=max(versions),
        classes=list(CLASSES),
        versions=[
            ModelVersionInfo(
                version=v, architecture=m.card.architecture, provider=m.provider,
                precision=m.precision, input_size=m.input_size, tta=m.card.tta,
                metrics=m.card.metrics, training=m.card.training,
                int8=m.card.int8.model_dump(mode="json") if m.card.int8 else None,
            )
            for v, m in sorted(versions.items())
        ],
    )


@router.get("", response_model=ModelList)
async def list_models(runtime: RuntimeDep) -> ModelList:
    return ModelList(
        default_model=runtime.default_model_name(),
        models=[model_info(runtime, name) for name in runtime.store.names()],
        failures=runtime.store.failures,
    )


@router.get("/{name}", response_model=ModelInfo, responses={
    404: {"model": ErrorResponse, "description": "Unknown model"},
    503: {"model": ErrorResponse, "description": "Configured but not loaded yet; retry after "
                                                   "the Retry-After header's seconds"}})
async def get_model(name: str, runtime: RuntimeDep) -> ModelInfo:
    return model_info(runtime, name)
