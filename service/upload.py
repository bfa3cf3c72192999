"""Read an uploaded image (raw body or multipart field `image`) under a size cap.

The cap is enforced while the body streams in: an oversized upload is answered with
413 as soon as it crosses the limit (or at once, from its Content-Length), without
reading the rest. An upload that takes longer than its time limit is answered with 408.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.types import Message

from service.errors import ClientError
from service.imaging import MEDIA_TYPES

MULTIPART_OVERHEAD = 64 * 1024
RAW_TYPES = set(MEDIA_TYPES) | {"application/octet-stream", ""}


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ClientError(413, "body_too_large",
                                  f"the upload is {declared} bytes; the limit is {limit}")
        except ValueError:
            raise ClientError(400, "bad_content_length", "Content-Length is not a number") from None
    chunks = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                chunks += chunk
                if len(chunks) > limit:
                    raise ClientError(413, "body_too_large",
                                      f"the upload exceeds the limit of {limit} bytes")
    except TimeoutError:
        raise ClientError(408, "upload_timeout", f"the upload took longer than {timeout_s:g} s "
                          f"({len(chunks)} bytes received)") from None
    except ClientDisconnect:
        # Nobody will read the answer; 499 (nginx's "client closed request") keeps it out
        # of the 5xx error rate and out of the error log.
        raise ClientError(499, "client_closed_request",
                          f"the client left after sending {len(chunks)} bytes") from None
    return bytes(chunks)


async def read_image_upload(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        body = await read_body(request, limit + MULTIPART_OVERHEAD, timeout_s)
        return await _multipart_image(request, body, limit)
    if media_type not in RAW_TYPES:
        raise ClientError(
            415, "unsupported_media_type",
            f"content type {media_type!r} is not accepted: send multipart/form-data with an "
            f"'image' field, or the image itself as one of {sorted(MEDIA_TYPES)}",
        )
    return await read_body(request, limit, timeout_s)


async def _multipart_image(request: Request, body: bytes, limit: int) -> bytes:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    replayed = Request(request.scope, replay)
    try:
        form = await replayed.form(max_files=1, max_fields=8)
    except Exception as error:  # malformed multipart of every kind
        raise ClientError(400, "bad_multipart",
                          f"the multipart body cannot be parsed: {error}") from None
    try:
        field = form.get("image")
        if field is None:
            raise ClientError(400, "missing_image", "the multipart body has no 'image' field")
        if not isinstance(field, UploadFile):
            raise ClientError(400, "missing_image", "the 'image' field must be a file upload")
        data = await field.read()
        if len(data) > limit:
            raise ClientError(413, "body_too_large",
                              f"the image exceeds the limit of {limit} bytes")
        return data
    finally:
        await form.close()
