import re
from pathlib import Path

from bench.server import HTTP_OPTIONS
from tests.deploy.test_dockerfile import SERVICE_COMMAND

ROOT = Path(__file__).resolve().parents[2]


def test_benchmarks_run_the_server_with_the_deployed_http_options():
    makefile = (ROOT / "Makefile").read_text()
    (make_options,) = re.findall(r"^HTTP_OPTIONS := (.*)$", makefile, flags=re.M)
    assert make_options.split() == HTTP_OPTIONS
    assert SERVICE_COMMAND[-len(HTTP_OPTIONS):] == HTTP_OPTIONS
