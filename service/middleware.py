"""Pure-ASGI middleware: a request id on every request, request metrics, access log.

It also answers an unexpected exception (500 `internal_error`): here, inside the
request's context, the traceback is logged with the request id and the answer carries
`X-Request-ID`, so that an operator can find one from the other. (Starlette's own
catch-all runs outside every user middleware, after the id is gone.)
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import problem
from service.logs import request_id

log = logging.getLogger("service.access")
error_log = logging.getLogger("service.errors")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _SAFE_ID.match(incoming) else uuid.uuid4().hex[:16]
        token = request_id.set(rid)
        if scope["type"] == "websocket":
            try:
                await self.app(scope, receive, send)
            finally:
                request_id.reset(token)
            return

        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as error:
            error_log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if response_started:  # too late to answer: let the server close the connection
                raise
            await problem(error).response()(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            metrics.REQUESTS.labels(endpoint=endpoint, method=scope["method"],
                                    status=str(status)).inc()
            metrics.REQUEST_LATENCY.labels(endpoint=endpoint).observe(elapsed)
            if endpoint not in ("/healthz", "/readyz", "/metrics"):
                log.info(
                    "%s %s %d %.1fms", scope["method"], scope["path"], status, elapsed * 1000,
                    extra={"method": scope["method"], "path": scope["path"], "status": status,
                           "duration_ms": round(elapsed * 1000, 1)},
                )
            request_id.reset(token)
