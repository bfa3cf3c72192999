"""The model card (`model.json`): the I/O contract between `train/` and `service/`.

The exporter writes a card beside every `model.onnx`; the server reads it back and
takes the class names, the input size and the pre-processing from it, so no other
file lists the classes or the normalisation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.tta import tta_views

# FER2013's label indices: the `emotion` column of fer2013.csv.
CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

CARD_FILENAME = "model.json"
MODEL_FILENAME = "model.onnx"
INT8_FILENAME = "model.int8.onnx"


class InputSpec(BaseModel):
    """What the network expects: a grayscale NCHW float32 tensor, normalised."""

    model_config = ConfigDict(extra="forbid")

    name: str = "input"
    size: int = Field(48, ge=8, le=512, description="Side of the square face crop in pixels.")
    mean: float = Field(..., description="Subtracted after scaling pixels to [0, 1].")
    std: float = Field(..., gt=0, description="Divided by after subtracting the mean.")

    @property
    def shape(self) -> list[int]:
        return [-1, 1, self.size, self.size]


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "logits"


class FaceCropSpec(BaseModel):
    """How a face detected in a photo becomes the network's input; tuned with the model.

    Not applied to images sent with `detect=false`: those already are face crops."""

    model_config = ConfigDict(extra="forbid")

    padding: float = Field(
        0.0, ge=0.0, le=1.0, description="Fraction of the Haar box added on every side."
    )
    equalize: bool = Field(False, description="Histogram-equalise the crop before resizing.")
    align: bool = Field(
        True,
        description="For faces with landmarks (FER_DETECTOR=retinaface): rotate so the eyes "
                    "are level and crop from the eye/mouth geometry as FER2013 frames faces "
                    "(service.preprocess.align_face) instead of the padded box; faces without "
                    "landmarks (Haar) ignore it. On by default: it raised natural-dev accuracy "
                    "end to end by 7 points with the v2 models (bench/DETECTORS.md).",
    )


class Int8Check(BaseModel):
    """The int8 graph measured again on validation on another CPU kernel family
    (`python -m train quantize --check`): ONNX Runtime's int8 kernels round differently."""

    model_config = ConfigDict(extra="allow")

    kept: bool = Field(..., description="Within the accuracy and agreement budget on that "
                       "kernel family.")


class Int8Spec(BaseModel):
    """An int8 version of the graph (`python -m train quantize`) and what it measured.

    `kept` says it lost at most the allowed accuracy against `model.onnx` on validation and
    picked `model.onnx`'s class on at least the required share of faces; only then is
    `file` present and served (FER_INT8=auto), on CPUs of the kernel family it was measured
    on (`kernel`, or one in `checks`). The measurement's other keys
    (accuracies, ECE, agreement, calibration, versions) are kept as written."""

    model_config = ConfigDict(extra="allow")

    file: str = Field(INT8_FILENAME, description="File name beside model.onnx.")
    kept: bool = Field(..., description="Within the accuracy and agreement budget, so the "
                       "file is served.")
    sha256: str | None = Field(None, description="Of `file`; checked when it is loaded.")
    # Cards written before this field were measured where the service then served int8 only.
    kernel: str = Field("dot_product", description="CPU int8 kernel family of the measurement "
                        "(service.cpu_features.int8_kernel).")
    checks: dict[str, Int8Check] = Field(
        default_factory=dict, description="Measurements on other kernel families, by family.")

    @field_validator("file")
    @classmethod
    def file_is_a_plain_name(cls, file: str) -> str:
        if not file or Path(file).name != file or file in (".", "..", MODEL_FILENAME):
            raise ValueError(f"int8 file must be a file name beside {MODEL_FILENAME}, got {file!r}")
        return file

    def measurement(self, kernel: str) -> dict[str, Any] | None:
        """The validation figures measured on `kernel`, if any."""
        if kernel == self.kernel:
            return self.model_dump(exclude={"checks"})
        check = self.checks.get(kernel)
        return check.model_dump() if check is not None else None

    def kept_on(self, kernel: str) -> bool:
        """Whether the file is served on CPUs of `kernel`: kept, and measured there within
        budget."""
        found = self.measurement(kernel)
        return self.kept and found is not None and bool(found["kept"])


class ModelCard(BaseModel):
    """Everything a reader needs to trust (and re-run) one model version."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str
    version: int = Field(..., ge=1)
    architecture: str
    classes: list[str]
    input: InputSpec
    output: OutputSpec = OutputSpec()
    face_crop: FaceCropSpec = FaceCropSpec()
    tta: list[str] = Field(
        default_factory=list,
        description="Test-time augmentation the service applies, e.g. ['hflip'].",
    )
    temperature: float = Field(
        1.0, gt=0.0, le=100.0,
        description="Logits are divided by this before the softmax (temperature scaling, "
                    "fitted on the validation split so that confidences match accuracy).",
    )
    metrics: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    int8: Int8Spec | None = Field(None, description="Set by `python -m train quantize`.")

    @field_validator("classes")
    @classmethod
    def classes_are_fer2013(cls, classes: list[str]) -> list[str]:
        if tuple(classes) != CLASSES:
            raise ValueError(f"classes must be FER2013's, in order: {list(CLASSES)}")
        return classes

    @field_validator("tta")
    @classmethod
    def tta_is_known(cls, tta: list[str]) -> list[str]:
        tta_views(tta)  # raises ValueError naming the unknown ones
        return tta

    @classmethod
    def read(cls, path: Path) -> ModelCard:
        return cls.model_validate(json.loads(Path(path).read_text()))

    def write(self, path: Path) -> None:
        """Write atomically: a reader never sees half a card."""
        path = Path(path)
        partial = path.with_name(f".{path.name}.partial")
        # A card without int8 is written as before the field existed.
        exclude = {"int8"} if self.int8 is None else None
        dumped = self.model_dump(mode="json", exclude=exclude)
        partial.write_text(json.dumps(dumped, indent=2) + "\n")
        partial.replace(path)
