"""What every served model looks like through the Open Inference Protocol, and how it runs.

Each model (the ensemble too) takes one of two inputs:

* `input`, FP32 [N, 1, S, S]: face crops already normalised as the model card says
  (pixels / 255, then (x - mean) / std; S, mean and std are in the metadata's
  `parameters`) -> `probabilities` FP32 [N, 7] and `labels` BYTES [7];
* `image`, BYTES [N]: encoded photos (JPEG, PNG, WebP, BMP; base64 in the JSON form)
  through the whole /predict pipeline (detection on) -> one row per face found:
  `boxes` INT32 [F, 4] (x, y, width, height in the photo's pixels), `probabilities`
  FP32 [F, 7], `image_index` INT32 [F] (which photo the face is in), and `labels`.

Crops go through the same dynamic batchers and `Pipeline.classify` as /predict's faces;
photos go through `Pipeline.predict` itself, so the limits, the metrics and the answers
are /predict's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time

import numpy as np

from service import metrics
from service.card import CLASSES
from service.imaging import ImageError
from service.model_store import ENSEMBLE_VERSION, Target
from service.runtime import Runtime
from service.v2_codec import OutputTensor, ProtocolError, bytes_elements, element_count, fp32_tensor
from service.v2_schemas import InferenceRequest, MetadataTensor, ModelMetadata, RequestInput

PLATFORM = "onnxruntime_onnx"
ENSEMBLE_PLATFORM = "ensemble"  # what Triton reports for an ensemble model

CROPS = "input"
IMAGES = "image"
PROBABILITIES = "probabilities"
LABELS = "labels"
BOXES = "boxes"
IMAGE_INDEX = "image_index"

CROP_OUTPUTS = (PROBABILITIES, LABELS)
IMAGE_OUTPUTS = (BOXES, PROBABILITIES, IMAGE_INDEX, LABELS)


def _tensor(name: str, datatype: str, shape: list[int], description: str) -> MetadataTensor:
    return MetadataTensor(name=name, datatype=datatype, shape=shape,
                          parameters={"description": description})


def crop_size(target: Target) -> int | None:
    """The side of the `input` crops, or None when the members disagree (no `input` then)."""
    sizes = {model.input_size for model in target.members}
    return sizes.pop() if len(sizes) == 1 else None


def metadata(target: Target, versions: list[int]) -> ModelMetadata:
    card = target.members[0].card
    size = crop_size(target)
    inputs = [_tensor(IMAGES, "BYTES", [-1], "encoded photos (JPEG, PNG, WebP or BMP; base64 "
                      "strings in JSON data), each through face detection and the classifier")]
    if size is not None:
        inputs.insert(0, _tensor(CROPS, "FP32", [-1, 1, size, size],
                                 "grayscale face crops, pixels / 255 then (x - input_mean) / "
                                 "input_std; outputs probabilities and labels"))
    outputs = [
        _tensor(PROBABILITIES, "FP32", [-1, len(CLASSES)],
                "class probabilities, one row per crop (input) or per face found (image); "
                "columns in the order of labels"),
        _tensor(LABELS, "BYTES", [len(CLASSES)], "the class names"),
        _tensor(BOXES, "INT32", [-1, 4], "image only: each face's x, y, width, height in "
                "its photo's pixels, largest face of each photo first"),
        _tensor(IMAGE_INDEX, "INT32", [-1], "image only: the index of the photo each face "
                "is in"),
    ]
    parameters: dict[str, str | float | int] = {"classes": ",".join(CLASSES)}
    if size is not None:
        parameters |= {"input_size": size, "input_mean": card.input.mean,
                       "input_std": card.input.std}
    if target.is_ensemble:
        parameters["members"] = ",".join(f"{m.name}:{m.version}" for m in target.members)
    return ModelMetadata(
        name=target.name, versions=[str(v) for v in versions],
        platform=ENSEMBLE_PLATFORM if target.is_ensemble else PLATFORM,
        inputs=inputs, outputs=outputs, parameters=parameters,
    )


def loaded_versions(runtime: Runtime, target: Target) -> list[int]:
    if target.is_ensemble:
        return [ENSEMBLE_VERSION]
    return sorted(runtime.store.models.get(target.name, {}))


# An inference's outputs, name -> (datatype, array), before the request picks and encodes them.
Tensors = dict[str, tuple[str, np.ndarray]]


def labels() -> tuple[str, np.ndarray]:
    return "BYTES", np.array([name.encode() for name in CLASSES], dtype=np.object_)


def the_input(request: InferenceRequest, target: Target) -> RequestInput:
    accepted = [CROPS, IMAGES] if crop_size(target) is not None else [IMAGES]
    names = [tensor.name for tensor in request.inputs]
    unknown = [name for name in names if name not in accepted]
    if unknown:
        raise ProtocolError(400, f"unknown input {unknown[0]!r}: {target.name} takes "
                            f"one of {accepted}")
    if len(names) != 1:
        raise ProtocolError(400, f"send exactly one input, one of {accepted}; got {names}")
    return request.inputs[0]


async def infer(runtime: Runtime, target: Target, tensor: RequestInput,
                raw: bytes | None) -> Tensors:
    if tensor.name == CROPS:
        return await _classify_crops(runtime, target, tensor, raw)
    return await _analyse_images(runtime, target, tensor, raw)


async def _classify_crops(runtime: Runtime, target: Target, tensor: RequestInput,
                          raw: bytes | None) -> Tensors:
    size = crop_size(target)
    expected = [-1, 1, size, size]
    if tensor.datatype != "FP32":
        raise ProtocolError(400, f"input {CROPS!r} must be FP32, not {tensor.datatype}")
    shape = tensor.shape
    if len(shape) != 4 or shape[1:] != expected[1:]:
        raise ProtocolError(400, f"input {CROPS!r} must have shape {expected}, not {shape}")
    settings = runtime.settings
    count, pixels = shape[0], element_count(shape)
    if count > settings.max_queue_faces:
        raise ProtocolError(413, f"{count} crops in one request; the limit is "
                            f"{settings.max_queue_faces} (FER_MAX_QUEUE_FACES)")
    if pixels > settings.max_pixels:
        raise ProtocolError(413, f"{pixels} pixels in one request; the limit is "
                            f"{settings.max_pixels} (FER_MAX_PIXELS)")
    crops = fp32_tensor(tensor, raw)
    started = time.perf_counter()
    probabilities = await runtime.pipeline.classify(target, _member_inputs(target, crops))
    metrics.STAGE_LATENCY.labels(stage="inference").observe(time.perf_counter() - started)
    metrics.FACES.inc(count)
    return {PROBABILITIES: ("FP32", probabilities.astype(np.float32)), LABELS: labels()}


def _member_inputs(target: Target, crops: np.ndarray) -> list[np.ndarray]:
    """The crops for each member: as given for members normalised like the first (the
    card the metadata quotes), re-expressed in a member's own normalisation otherwise."""
    given = target.members[0].card.input
    inputs = []
    for model in target.members:
        own = model.card.input
        if (own.mean, own.std) == (given.mean, given.std):
            inputs.append(crops)
        else:
            inputs.append(((crops * given.std + given.mean - own.mean) / own.std)
                          .astype(np.float32))
    return inputs


async def _analyse_images(runtime: Runtime, target: Target, tensor: RequestInput,
                          raw: bytes | None) -> Tensors:
    if tensor.datatype != "BYTES":
        raise ProtocolError(400, f"input {IMAGES!r} must be BYTES, not {tensor.datatype}")
    if len(tensor.shape) != 1:
        raise ProtocolError(400, f"input {IMAGES!r} must have shape [-1], not {tensor.shape}")
    limit = runtime.settings.max_inflight_requests
    if tensor.shape[0] > limit:
        raise ProtocolError(413, f"{tensor.shape[0]} images in one request; the limit is "
                            f"{limit} (FER_MAX_INFLIGHT_REQUESTS)")
    photos = [_photo_bytes(element, index)
              for index, element in enumerate(bytes_elements(tensor, raw))]
    answers = await asyncio.gather(
        *(runtime.pipeline.predict(photo, target, detect=True) for photo in photos),
        return_exceptions=True,
    )
    boxes, probabilities, image_index = [], [], []
    for index, answer in enumerate(answers):
        if isinstance(answer, ImageError):
            raise ProtocolError(answer.status, f"image {index}: {answer.message}")
        if isinstance(answer, BaseException):
            raise answer
        for face in answer.faces:
            boxes.append([face.box.x, face.box.y, face.box.width, face.box.height])
            probabilities.append([getattr(face.probabilities, name) for name in CLASSES])
            image_index.append(index)
    return {
        BOXES: ("INT32", np.array(boxes, dtype=np.int32).reshape(-1, 4)),
        PROBABILITIES: ("FP32", np.array(probabilities, dtype=np.float32)
                        .reshape(-1, len(CLASSES))),
        IMAGE_INDEX: ("INT32", np.array(image_index, dtype=np.int32)),
        LABELS: labels(),
    }


def _photo_bytes(element: bytes | str, index: int) -> bytes:
    if isinstance(element, bytes):
        return element
    try:
        return base64.b64decode(element, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(400, f"image {index}: JSON data must be the base64 of the encoded "
                            "photo") from None


def select_outputs(request: InferenceRequest, tensor_name: str,
                   tensors: Tensors) -> list[OutputTensor]:
    """The outputs the request asked for (all by default), each as JSON or binary."""
    available = CROP_OUTPUTS if tensor_name == CROPS else IMAGE_OUTPUTS
    default_binary = _flag(request.parameters, "binary_data_output", False, "the request")
    if request.outputs is None:
        wanted = [(name, {}) for name in available]
    else:
        wanted = [(output.name, output.parameters or {}) for output in request.outputs]
    selected = []
    for name, parameters in wanted:
        if name not in available:
            raise ProtocolError(400, f"unknown output {name!r}: input {tensor_name!r} gives "
                                f"{list(available)}")
        if "shared_memory_region" in parameters:
            raise ProtocolError(400, f"output {name!r}: shared memory is not supported")
        binary = _flag(parameters, "binary_data", default_binary, f"output {name!r}")
        datatype, array = tensors[name]
        classes = parameters.get("classification")
        if classes is not None:
            datatype, array = _classification(name, array, classes)
        selected.append(OutputTensor(name, datatype, array, binary))
    return selected


def _flag(parameters: dict | None, key: str, default: bool, where: str) -> bool:
    value = (parameters or {}).get(key, default)
    if type(value) is not bool:
        raise ProtocolError(400, f"{where}: parameter {key} must be true or false")
    return value


def _classification(name: str, probabilities: np.ndarray,
                    classes: object) -> tuple[str, np.ndarray]:
    """Triton's classification extension: the top k of each row as `score:index:label`."""
    if name != PROBABILITIES:
        raise ProtocolError(400, f"classification applies to {PROBABILITIES!r} only, not {name!r}")
    if type(classes) is not int or not 1 <= classes <= len(CLASSES):
        raise ProtocolError(400, f"classification must be an integer from 1 to {len(CLASSES)}")
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :classes]
    rows = [[f"{row[i]:f}:{i}:{CLASSES[i]}".encode() for i in top]
            for row, top in zip(probabilities, order, strict=True)]
    return "BYTES", np.array(rows, dtype=np.object_).reshape(len(rows), classes)
