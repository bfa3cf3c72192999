"""The Open Inference Protocol's JSON objects (KServe v2 REST), as pydantic models.

They validate the JSON part of an inference request and are the OpenAPI schemas at
/docs. Types are strict, so what the schema refuses (a shape given as strings, a
boolean where a number belongs) is refused by the server too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BF16", "BYTES",
]
Parameters = dict[str, StrictBool | StrictInt | StrictFloat | StrictStr]
Dimension = Annotated[StrictInt, Field(ge=0)]


class RequestInput(BaseModel):
    name: StrictStr
    shape: list[Dimension]
    datatype: Datatype
    parameters: Parameters | None = Field(
        None, description="`binary_data_size`: the tensor's bytes follow the JSON header "
        "(binary tensor extension) instead of `data`.")
    data: Any = Field(
        None, description="The elements in row-major order, flat or nested; BYTES elements "
        "are strings (for `image`: base64 of the encoded photo).")


class RequestOutput(BaseModel):
    name: StrictStr
    parameters: Parameters | None = Field(
        None, description="`binary_data` (bool): this output as binary data after the JSON; "
        "`classification` (int k): the top k classes as BYTES `score:index:label` "
        "(`probabilities` only).")


class InferenceRequest(BaseModel):
    id: StrictStr | None = None
    parameters: Parameters | None = Field(
        None, description="`binary_data_output` (bool): the default of every output's "
        "`binary_data`.")
    inputs: list[RequestInput] = Field(..., min_length=1)
    outputs: list[RequestOutput] | None = Field(
        None, description="The outputs wanted (default: all that the input gives).")


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: Parameters | None = Field(
        None, description="`binary_data_size`: the output's bytes follow the JSON header.")
    data: list[Any] | None = Field(None, description="Row-major, flat (absent when binary).")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class MetadataTensor(BaseModel):
    name: str
    datatype: Datatype
    shape: list[int] = Field(..., description="-1: any size.")
    parameters: Parameters | None = Field(None, description="`description`: what it holds.")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: Parameters | None = Field(
        None, description="`classes`, and the normalisation the `input` tensor must have.")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ProtocolErrorBody(BaseModel):
    error: str = Field(..., description="What was wrong.")


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its `$defs` substituted in place, for an OpenAPI body."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(definitions[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)
