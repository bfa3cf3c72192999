"""Tensors on the wire: the protocol's JSON form and Triton's binary tensor extension.

A request body is either one JSON object, or (binary extension) a JSON header of
`Inference-Header-Content-Length` bytes followed by the raw bytes of every input that
declares `parameters.binary_data_size`, in the order of `inputs`. Binary FP32 is
little-endian; a binary BYTES tensor is each element as a 4-byte little-endian length
and its bytes. A response is built the same way: outputs asked for with `binary_data`
carry `binary_data_size` and their bytes follow the JSON, whose length the response's
`Inference-Header-Content-Length` gives.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from service.errors import ClientError
from service.v2_schemas import InferenceRequest, RequestInput

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
_LENGTH = struct.Struct("<I")


class ProtocolError(ClientError):
    """A request the protocol cannot carry out (/v2 answers `{"error": message}`)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, "bad_inference_request", message, headers)


def _not_json(token: str) -> None:
    raise ProtocolError(400, f"{token} is not JSON; tensors must hold finite numbers")


def describe_errors(errors: list[dict[str, Any]]) -> str:
    """Pydantic's (or FastAPI's) validation errors as one line: `where: what; ...`."""
    parts = []
    for item in errors:
        where = ".".join(str(part) for part in item.get("loc", ()))
        parts.append(f"{where}: {item['msg']}" if where else str(item["msg"]))
    return "; ".join(parts) or "invalid request"


@dataclass
class ParsedRequest:
    request: InferenceRequest
    raw: list[bytes | None]  # per input: its binary data, None when given as JSON `data`


def parse_request(body: bytes, header_length: int | None) -> ParsedRequest:
    if header_length is None:
        header, rest = body, b""
    else:
        if header_length > len(body):
            raise ProtocolError(400, f"{HEADER_LENGTH} is {header_length} but the body has "
                                f"only {len(body)} bytes")
        header, rest = body[:header_length], body[header_length:]
    try:
        document = json.loads(header, parse_constant=_not_json)
    except RecursionError:
        raise ProtocolError(400, "the JSON is nested too deeply") from None
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        where = "JSON header" if header_length is not None else "body"
        raise ProtocolError(400, f"the {where} is not valid JSON: {error}") from None
    try:
        request = InferenceRequest.model_validate(document)
    except ValidationError as error:
        raise ProtocolError(400, "the inference request is invalid: "
                            + describe_errors(error.errors())) from None
    raw: list[bytes | None] = []
    offset = 0
    for tensor in request.inputs:
        size = binary_size(tensor)
        if size is None:
            if tensor.data is None:
                raise ProtocolError(400, f"input {tensor.name!r} has neither data nor "
                                    "parameters.binary_data_size")
            raw.append(None)
            continue
        if tensor.data is not None:
            raise ProtocolError(400, f"input {tensor.name!r} has both data and binary_data_size")
        if offset + size > len(rest):
            raise ProtocolError(400, f"input {tensor.name!r} declares {size} binary bytes; only "
                                f"{len(rest) - offset} follow the JSON header")
        raw.append(rest[offset : offset + size])
        offset += size
    if offset != len(rest):
        raise ProtocolError(400, f"{len(rest) - offset} bytes after the JSON header belong to "
                            "no input's binary_data_size")
    return ParsedRequest(request, raw)


def binary_size(tensor: RequestInput) -> int | None:
    if "shared_memory_region" in (tensor.parameters or {}):
        raise ProtocolError(400, f"input {tensor.name!r}: shared memory is not supported; send "
                            "the data in the body")
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is None:
        return None
    if type(size) is not int or size < 0:
        raise ProtocolError(400, f"input {tensor.name!r}: binary_data_size must be an "
                            "integer >= 0")
    return size


def element_count(shape: list[int]) -> int:
    return math.prod(shape)


def _flatten(data: Any, name: str) -> list[Any]:
    """Row-major elements of flat or nested JSON arrays (iteratively: nesting is unbounded)."""
    if not isinstance(data, list):
        raise ProtocolError(400, f"input {name!r}: data must be an array")
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def fp32_tensor(tensor: RequestInput, raw: bytes | None) -> np.ndarray:
    """The input as a float32 array of its declared shape; every element finite."""
    count = element_count(tensor.shape)
    if raw is not None:
        if len(raw) != count * 4:
            raise ProtocolError(400, f"input {tensor.name!r}: {len(raw)} binary bytes, but "
                                f"FP32 {tensor.shape} takes {count * 4}")
        array = np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=False)
    else:
        flat = _flatten(tensor.data, tensor.name)
        if len(flat) != count:
            raise ProtocolError(400, f"input {tensor.name!r}: {len(flat)} elements, but shape "
                                f"{tensor.shape} has {count}")
        if not all(type(value) is float or type(value) is int for value in flat):
            raise ProtocolError(400, f"input {tensor.name!r}: FP32 data must be numbers")
        try:
            with np.errstate(over="ignore"):  # out of float32's range: refused below
                array = np.array(flat, dtype=np.float32)
        except OverflowError:  # an integer beyond any float
            raise ProtocolError(400, f"input {tensor.name!r}: a number is out of range") from None
    if not np.isfinite(array).all():
        raise ProtocolError(400, f"input {tensor.name!r}: every element must be finite "
                            "(no NaN or infinity, nothing beyond float32's range)")
    return array.reshape(tensor.shape)


def bytes_elements(tensor: RequestInput, raw: bytes | None) -> list[bytes | str]:
    """A BYTES input's elements: bytes when binary, strings when JSON."""
    count = element_count(tensor.shape)
    if raw is None:
        flat = _flatten(tensor.data, tensor.name)
        if len(flat) != count:
            raise ProtocolError(400, f"input {tensor.name!r}: {len(flat)} elements, but shape "
                                f"{tensor.shape} has {count}")
        if not all(isinstance(value, str) for value in flat):
            raise ProtocolError(400, f"input {tensor.name!r}: BYTES data must be strings")
        return flat
    elements: list[bytes | str] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ProtocolError(400, f"input {tensor.name!r}: the binary data ends inside an "
                                "element's 4-byte length")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ProtocolError(400, f"input {tensor.name!r}: element {len(elements)} declares "
                                f"{length} bytes; {len(raw) - offset} remain")
        elements.append(raw[offset : offset + length])
        offset += length
    if len(elements) != count:
        raise ProtocolError(400, f"input {tensor.name!r}: the binary data holds {len(elements)} "
                            f"elements, but shape {tensor.shape} has {count}")
    return elements


def serialize_bytes(elements: list[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(element)) + element for element in elements)


@dataclass
class OutputTensor:
    name: str
    datatype: str  # FP32, INT32 or BYTES
    array: np.ndarray  # numeric, or an object array of bytes for BYTES
    binary: bool

    def json_data(self) -> list[Any]:
        flat = self.array.reshape(-1)
        if self.datatype == "BYTES":
            return [element.decode() for element in flat]
        if self.datatype == "FP32":
            # The shortest decimal that reads back as the same float32 (0.062114, not
            # 0.06211400032043457): exact, and a third of the JSON.
            return [float(str(value)) for value in flat]
        return flat.tolist()

    def binary_data(self) -> bytes:
        if self.datatype == "BYTES":
            return serialize_bytes(list(self.array.reshape(-1)))
        dtype = {"FP32": "<f4", "INT32": "<i4"}[self.datatype]
        return np.ascontiguousarray(self.array, dtype=dtype).tobytes()


def encode_response(model_name: str, model_version: str, request_id: str | None,
                    outputs: list[OutputTensor]) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (content type, and the JSON length when binary)."""
    described = []
    blobs = []
    for output in outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype,
                                 "shape": list(output.array.shape)}
        if output.binary:
            blob = output.binary_data()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = output.json_data()
        described.append(entry)
    document: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        document["id"] = request_id
    document["outputs"] = described
    header = json.dumps(document, separators=(",", ":")).encode()
    if not blobs:
        return header, {"content-type": JSON_TYPE}
    return header + b"".join(blobs), {"content-type": BINARY_TYPE, HEADER_LENGTH: str(len(header))}
