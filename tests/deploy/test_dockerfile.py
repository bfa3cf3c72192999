"""The Dockerfile: lint, targets, what the service images hold, the build context."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.deploy.conftest import (
    DOCKERFILE,
    ROOT,
    dockerfile_stages,
    exec_form,
    healthcheck_command,
    run,
    stage,
    tool,
)

SERVICE_COMMAND = [
    "uvicorn", "service.app:app", "--host", "0.0.0.0", "--port", "8000",
    # h11 caps a request's line and headers (httptools, the default, reads any size).
    "--http", "h11", "--h11-max-incomplete-event-size", "32768",
]


def load_requirements_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "requirements", ROOT / "deploy/docker/requirements.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pyproject_requirements = load_requirements_module()


def test_hadolint_finds_nothing() -> None:
    result = run([tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_config_ignores_only_justified_rules() -> None:
    text = (ROOT / ".hadolint.yaml").read_text()
    ignored = re.findall(r"^\s*-\s*(DL\d+|SC\d+)\s*$", text, re.MULTILINE)
    assert ignored == ["DL3008"]
    assert "failure-threshold: info" in text
    # Each ignored rule is explained by a comment right above it.
    lines = text.splitlines()
    for rule in ignored:
        index = next(i for i, line in enumerate(lines) if line.strip() == f"- {rule}")
        assert lines[index - 1].strip().startswith("#"), rule


def test_targets_cpu_last_gpu_and_train() -> None:
    stages = dockerfile_stages()
    names = [s.name for s in stages]
    assert {"cpu", "gpu", "train"} <= set(names)
    assert names[-1] == "cpu", "the cpu service must be the last (default) stage"
    assert len(names) == len(set(names))


def test_bases() -> None:
    assert stage("cpu").base == "python"
    assert stage("python").base.startswith("python:3.11-slim")
    assert stage("train").base == "python"
    assert re.fullmatch(
        r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", stage("gpu").base
    )
    assert stage("gpu-venv").base == stage("gpu").base


def test_the_onnxruntime_gpu_pin_matches_the_cuda_base() -> None:
    # onnxruntime-gpu 1.24+ on PyPI is built for CUDA 13 / cuDNN 9 (its `cuda` extra asks
    # for nvidia-cuda-runtime~=13.0).
    text = DOCKERFILE.read_text()
    version = re.search(r"ARG ONNXRUNTIME_GPU_VERSION=(\d+)\.(\d+)\.\d+", text)
    cuda = re.search(r"ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.", text)
    assert version and cuda
    assert (int(version.group(1)), int(version.group(2))) >= (1, 24)
    assert cuda.group(1) == "13"
    assert '"onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"' in text


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_service_images_run_the_one_process_command(name: str) -> None:
    s = stage(name)
    assert exec_form(s.last("CMD")) == SERVICE_COMMAND
    assert s.last("ENTRYPOINT") is None
    assert s.last("USER") == "10001:10001"
    assert s.last("EXPOSE") == "8000"
    assert "COPY model_store /app/model_store" in [f"COPY {a}" for a in s.all("COPY")]
    assert any("FER_MODEL_STORE=/app/model_store" in env for env in s.all("ENV"))


def test_service_images_share_one_healthcheck_on_healthz() -> None:
    cpu, gpu = healthcheck_command(stage("cpu")), healthcheck_command(stage("gpu"))
    assert cpu == gpu
    assert cpu[:2] == ["python", "-c"] and "http://127.0.0.1:8000/healthz" in cpu[2]


def test_gpu_image_uses_cuda() -> None:
    env = " ".join(stage("gpu").all("ENV"))
    assert "FER_DEVICE=cuda" in env
    assert any("requirements.py gpu" in r for r in stage("gpu-venv").all("RUN"))


def test_train_image_entrypoint() -> None:
    s = stage("train")
    assert exec_form(s.last("ENTRYPOINT")) == ["python", "-m", "train"]
    assert exec_form(s.last("CMD")) == ["--help"]
    assert any("requirements.py cpu train" in r for r in s.all("RUN"))
    assert s.last("USER") == "10001:10001"


def test_train_entrypoint_runs() -> None:
    """What `docker run --rm fer-service:train --help` runs: ENTRYPOINT + CMD."""
    command = exec_form(stage("train").last("ENTRYPOINT")) + exec_form(stage("train").last("CMD"))
    command[0] = sys.executable
    result = run(command, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    for sub in ("fit", "export", "evaluate"):
        assert sub in result.stdout


def test_service_images_hold_no_build_tools_or_training_stack() -> None:
    for name in ("python", "cpu", "cpu-venv", "gpu", "gpu-venv"):
        text = " ".join(args for _, args in stage(name).instructions)
        for forbidden in ("build-essential", "gcc", "torch", " train", "cpu train", "-dev "):
            assert forbidden not in text, (name, forbidden)
    assert not any("train" in c for c in stage("cpu-venv").all("COPY"))
    # Final service stages copy the venv from a build stage, not a source tree.
    assert stage("cpu").all("COPY")[0] == "--from=cpu-venv /opt/venv /opt/venv"
    assert stage("gpu").all("COPY")[0] == "--from=gpu-venv /opt/venv /opt/venv"


def test_requirements_script() -> None:
    pyproject = ROOT / "pyproject.toml"
    cpu = pyproject_requirements.requirements(pyproject, ["cpu"])
    gpu = pyproject_requirements.requirements(pyproject, ["gpu"])
    train = pyproject_requirements.requirements(pyproject, ["cpu", "train"])

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[<>=~!\[; ]", r, maxsplit=1)[0] for r in reqs}

    assert "onnxruntime" in names(cpu) and "torch" not in names(cpu)
    assert "onnxruntime-gpu" in names(gpu) and "onnxruntime" not in names(gpu)
    assert {"torch", "onnx", "onnxruntime"} <= names(train)
    assert {"fastapi", "opencv-python-headless", "uvicorn"} <= names(cpu)
    with pytest.raises(SystemExit):
        pyproject_requirements.requirements(pyproject, ["nope"])
    result = run([sys.executable, str(ROOT / "deploy/docker/requirements.py"), "cpu"], cwd=ROOT)
    assert result.returncode == 0 and result.stdout.splitlines() == cpu


# -- the slim image needs no system package ---------------------------------------------------
SLIM_LIBRARIES = {
    "libc.so.6",
    "libm.so.6",
    "libpthread.so.0",
    "libdl.so.2",
    "librt.so.1",
    "libz.so.1",
    "libgcc_s.so.1",
    "libstdc++.so.6",
}


def test_opencv_and_onnxruntime_need_only_libraries_of_the_slim_base() -> None:
    """opencv-python-headless bundles its libraries (no libGL, no libglib): the cpu image
    installs no Debian package. Every library the wheels' extension modules load is either
    in the wheel or one of those python:3.11-slim has."""
    site = Path(__import__("cv2").__file__).parent.parent
    modules = [
        *site.glob("cv2/*.so"),
        *site.glob("opencv_python_headless.libs/*.so*"),
        *site.glob("onnxruntime/capi/*.so"),
    ]
    assert modules
    outside = set()
    for module in modules:
        result = subprocess.run(["ldd", str(module)], capture_output=True, text=True, timeout=30)
        for line in result.stdout.splitlines():
            name, arrow, where = line.strip().partition(" => ")
            assert "not found" not in where, f"{module}: {line}"
            if arrow and str(site) not in where:
                outside.add(name)
    assert outside <= SLIM_LIBRARIES, outside - SLIM_LIBRARIES


# -- .dockerignore --------------------------------------------------------------------------
def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents wins."""
    parts = path.split("/")
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = re.escape(pattern.lstrip("!").strip("/"))
        regex = regex.replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_the_images_copy_and_nothing_else() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    sources = set()
    for s in dockerfile_stages():
        for args in s.all("COPY"):
            if not args.startswith("--from"):
                sources.update(args.split()[:-1])
    assert {"pyproject.toml", "README.md", "service", "train", "model_store"} <= sources
    for source in sources:
        assert not dockerignore_excludes(source, patterns), source
    for kept in ("service/app.py", "train/fit.py", "model_store/cnn10/4/model.onnx"):
        assert not dockerignore_excludes(kept, patterns), kept
    for dropped in (
        ".git",
        ".git/config",
        ".venv/bin/python",
        "runs/cnn10-v1/best.pt",
        ".cache/fer2013/x.npz",
        "tests/fixtures/faces/LICENSE",
        "bench/load.py",
        "service/__pycache__/app.cpython-311.pyc",
        "deploy/k8s/base/hpa.yaml",
        "train/snapshots/cnn10-long.pt",
    ):
        assert dockerignore_excludes(dropped, patterns), dropped
