"""What the CPU can do natively, for choices made once at start-up."""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

# CPU flags (as /proc/cpuinfo names them) of an 8-bit dot-product instruction. Without one,
# ONNX Runtime's x86 uint8 x int8 kernels use VPMADDUBSW, whose 16-bit sums can saturate:
# the int8 graphs were measured only where one of these exists.
INT8_DOT_PRODUCT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "asimddp"})


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


@lru_cache(maxsize=1)
def has_int8_dot_product() -> bool:
    return bool(cpu_flags() & INT8_DOT_PRODUCT_FLAGS) or platform.machine() == "arm64"
