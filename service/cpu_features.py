"""What the CPU can do natively, for choices made once at start-up."""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path
from typing import Literal

# CPU flags (as /proc/cpuinfo names them) of an 8-bit dot-product instruction.
INT8_DOT_PRODUCT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "asimddp"})

# Which of ONNX Runtime's uint8 x int8 kernels a CPU runs. They round differently (without
# a dot product, x86 uses VPMADDUBSW, whose 16-bit sums can saturate), so an int8 graph's
# accuracy is measured, and served, per kernel (`Int8Spec.kept_on`).
Int8Kernel = Literal["dot_product", "avx2_u8s8", "generic"]


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The feature flags of the first CPU listed (empty where there is no /proc/cpuinfo)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def kernel_for(flags: frozenset[str], machine: str) -> Int8Kernel:
    if flags & INT8_DOT_PRODUCT_FLAGS or machine == "arm64":
        return "dot_product"
    if "avx2" in flags:
        return "avx2_u8s8"
    return "generic"


@lru_cache(maxsize=1)
def int8_kernel() -> Int8Kernel:
    """The int8 kernel family of this CPU."""
    return kernel_for(cpu_flags(), platform.machine())
