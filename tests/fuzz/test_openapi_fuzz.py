"""Schemathesis against the service's own OpenAPI spec, over a real server.

Every operation is called with generated (valid and invalid) parameters and bodies; the
answers must never be 5xx and must match the spec (status codes, content types, headers
and body schemas). The server runs with API keys on, and the calls carry one; the
`ignored_auth` check also makes sure a call without a key is refused.

The default suite makes a few dozen calls per operation;
`SCHEMATHESIS_EXAMPLES=1000 pytest tests/fuzz/test_openapi_fuzz.py` makes more.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.app import create_app
from service.settings import Settings
from tests.conftest import live_server

EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "25"))
KEY = "schemathesis-key"


@pytest.fixture(scope="module")
def server(model_store: Path) -> Iterator[str]:
    with live_server(model_store, api_keys=KEY, max_inflight_requests=64) as url:
        yield url


# The spec comes from the app's code, not from a running server: schemathesis's lazy
# `from_fixture` loader does not work with pytest 9 (it sets a private `_nodeid`).
SPEC = create_app(Settings(api_keys=KEY)).openapi()
schema = schemathesis.openapi.from_dict(SPEC)


# For a body declared as image/png, jpeg or webp, schemathesis sends a real file of that
# format (as the server checks the bytes); it has no BMP sample, so here is one.
BMP = cv2.imencode(".bmp", np.full((32, 32), 128, np.uint8))[1].tobytes()


@schemathesis.serializer("image/bmp")
def bmp_sample(ctx: object, value: object) -> bytes:
    return BMP


@schema.auth()
class ApiKey:
    """A valid key on every call; `ignored_auth` then probes without it and with bad ones."""

    def get(self, case: schemathesis.Case, ctx: object) -> str:
        return KEY

    def set(self, case: schemathesis.Case, data: str, ctx: object) -> None:
        case.headers = {**(case.headers or {}), "X-API-Key": data}


def test_the_server_serves_the_spec_under_test(server: str) -> None:
    assert httpx.get(server + "/openapi.json").json() == SPEC


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize="SCHEMATHESIS_EXAMPLES" not in os.environ)
def test_the_api_conforms_to_its_spec_and_never_answers_5xx(
    case: schemathesis.Case, server: str
) -> None:
    # `positive_data_acceptance` is left out: a body the spec allows (any bytes, as
    # `format: binary` cannot say "a decodable image") is rightly refused with 400/415.
    case.call_and_validate(base_url=server, timeout=30, excluded_checks=[positive_data_acceptance])
