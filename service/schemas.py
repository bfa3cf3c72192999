"""The JSON the API answers with; these models are also the OpenAPI schemas at /docs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, create_model, model_serializer

from service.card import CLASSES

Probabilities = create_model(  # one float field per class, in FER2013 order
    "Probabilities",
    __doc__="Softmax probability of each expression; they sum to 1.",
    **{name: (float, Field(..., ge=0.0, le=1.0)) for name in CLASSES},
)


class FaceBox(BaseModel):
    x: int = Field(..., description="Left edge, pixels from the image's left.")
    y: int = Field(..., description="Top edge, pixels from the image's top.")
    width: int
    height: int


class Point(BaseModel):
    x: float = Field(..., description="Pixels from the image's left.")
    y: float = Field(..., description="Pixels from the image's top.")


class Landmarks(BaseModel):
    """Five facial landmarks; left and right as seen in the image (`eye_left` is the
    subject's right eye)."""

    eye_left: Point
    eye_right: Point
    nose: Point
    mouth_left: Point
    mouth_right: Point


class Face(BaseModel):
    box: FaceBox
    landmarks: Landmarks | None = Field(
        None, description="Only from detectors that give them (FER_DETECTOR=retinaface); "
        "absent otherwise.",
    )
    label: str = Field(..., description="The most probable expression.")
    score: float = Field(..., description="Probability of `label`.")
    probabilities: Probabilities  # type: ignore[valid-type]

    @model_serializer(mode="wrap")
    def _leave_out_absent_landmarks(self, handler: SerializerFunctionWrapHandler):
        # (no return annotation: with one, the OpenAPI schema of Face would be a bare object)
        data = handler(self)
        if data.get("landmarks") is None:
            data.pop("landmarks", None)
        return data


class ImageSize(BaseModel):
    width: int
    height: int


class ModelRef(BaseModel):
    name: str
    version: int


class Timings(BaseModel):
    decode_ms: float
    detect_ms: float
    preprocess_ms: float
    inference_ms: float = Field(..., description="Queueing for a batch plus running it.")
    total_ms: float


class PredictResponse(BaseModel):
    model: str
    version: int
    members: list[ModelRef] = Field(
        default_factory=list, description="For the ensemble: the model versions averaged."
    )
    image: ImageSize
    faces: list[Face] = Field(..., description="Largest face first; empty if none was found.")
    timings: Timings


class ErrorResponse(BaseModel):
    error: str = Field(..., description="Machine-readable error code.")
    detail: str = Field(..., description="What was wrong, for a person.")


class ModelVersionInfo(BaseModel):
    version: int
    architecture: str
    provider: str
    precision: str = Field(description="Graph loaded: fp32 (model.onnx) or int8 (FER_INT8); "
                                       "for the ensemble, its members' (mixed when they differ).")
    input_size: int
    tta: list[str]
    metrics: dict[str, Any]
    training: dict[str, Any]
    int8: dict[str, Any] | None = Field(
        None, description="The card's int8 measurement (`python -m train quantize`), if any.")


class ModelInfo(BaseModel):
    name: str
    latest_version: int
    classes: list[str]
    versions: list[ModelVersionInfo]
    members: list[ModelRef] = Field(default_factory=list)


class ModelList(BaseModel):
    default_model: str
    models: list[ModelInfo]
    failures: dict[str, str] = Field(
        default_factory=dict, description="Versions present in the store but refused at load."
    )


class Health(BaseModel):
    status: str
    models_loaded: int = 0
    detail: str = ""
