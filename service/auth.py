"""Optional API keys and rate limits for the endpoints that run the models.

With `FER_API_KEYS` set, POST /predict, POST /v2/models/.../infer and /v1/stream need one
of the keys, sent as
`Authorization: Bearer <key>` or `X-API-Key: <key>`; a WebSocket may also carry it as
`?api_key=<key>`, since a browser cannot set headers on one. A presented key is compared
with every configured key, each in constant time, over SHA-256 digests so that neither a
key nor its length leaks through timing. A refused request gets 401 + `WWW-Authenticate`;
a refused stream is accepted, sent a JSON error and closed with 1008.

With `FER_RATE_LIMIT_PER_MINUTE` set, each API key (or each client IP when no keys are
set) has a token bucket that holds one minute's worth of requests and refills
continuously; a request (or stream connect) with an empty bucket gets 429 + `Retry-After`
(a stream: close 1013). Behind a proxy the client IP is the proxy's unless uvicorn runs
with `--proxy-headers` and `--forwarded-allow-ips`.

Everything else (/, /static, /docs, /openapi.json, /v1/models, /healthz, /readyz,
/metrics, and /v2's metadata and health) stays open, so that probes, scrapes and the demo
page work without a key.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service import metrics
from service.errors import ClientError

API_KEY_HEADER = "X-API-Key"
API_KEY_QUERY = "api_key"
MAX_TRACKED_CLIENTS = 10_000

_bearer = HTTPBearer(
    auto_error=False, scheme_name="bearerKey",
    description="An API key as `Authorization: Bearer <key>` (needed only when the server "
    "sets FER_API_KEYS).",
)
_header = APIKeyHeader(
    name=API_KEY_HEADER, auto_error=False, scheme_name="apiKeyHeader",
    description="An API key as `X-API-Key: <key>` (needed only when the server sets "
    "FER_API_KEYS).",
)


class Unauthorized(ClientError):
    def __init__(self, detail: str) -> None:
        super().__init__(401, "unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


class RateLimited(ClientError):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(429, "rate_limited",
                         f"too many requests; retry after {retry_after_s} s",
                         headers={"Retry-After": str(retry_after_s)})
        self.retry_after_s = retry_after_s


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class RateLimiter:
    """One token bucket per client: `per_minute` tokens at most, refilled continuously.

    Only the `max_clients` most recently seen clients are remembered; one forgotten
    comes back with a full bucket.
    """

    def __init__(self, per_minute: int, max_clients: int = MAX_TRACKED_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there will be."""
        now = self.clock()
        tokens, updated = self._buckets.pop(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - updated) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


class Guard:
    """Checks the credentials and the rate of one request; raises `Unauthorized`/`RateLimited`."""

    def __init__(self, keys: Sequence[str], per_minute: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._digests = [_digest(key) for key in keys]
        self.limiter = RateLimiter(per_minute, clock=clock) if per_minute > 0 else None

    @property
    def keys_required(self) -> bool:
        return bool(self._digests)

    def _match(self, presented: str) -> int | None:
        digest = _digest(presented)
        found = None
        for index, key in enumerate(self._digests):  # every key, no early exit
            if hmac.compare_digest(digest, key) and found is None:
                found = index
        return found

    def admit(self, presented: Iterable[str | None], client_host: str | None) -> None:
        client = f"ip:{client_host or 'unknown'}"
        if self._digests:
            candidates = [key for key in presented if key]
            if not candidates:
                metrics.REJECTED.labels(reason="unauthorized").inc()
                raise Unauthorized(
                    "an API key is required: send 'Authorization: Bearer <key>' "
                    f"or '{API_KEY_HEADER}: <key>'"
                )
            matches = [self._match(key) for key in candidates]
            index = next((m for m in matches if m is not None), None)
            if index is None:
                metrics.REJECTED.labels(reason="unauthorized").inc()
                raise Unauthorized("the API key is not valid")
            client = f"key:{index}"
        if self.limiter is not None:
            wait = self.limiter.take(client)
            if wait > 0:
                metrics.REJECTED.labels(reason="rate_limited").inc()
                raise RateLimited(max(1, math.ceil(wait)))


def bearer_token(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def websocket_credentials(headers: Mapping[str, str], query: Mapping[str, str]) -> list[str | None]:
    return [bearer_token(headers.get("authorization")), headers.get(API_KEY_HEADER),
            query.get(API_KEY_QUERY)]


async def require_access(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    api_key: Annotated[str | None, Security(_header)],
) -> None:
    """Route dependency; it also declares both security schemes in the OpenAPI spec."""
    guard: Guard = request.app.state.runtime.guard
    credentials = [bearer.credentials if bearer else None, api_key]
    guard.admit(credentials, request.client.host if request.client else None)
