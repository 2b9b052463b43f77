"""What this x86 CPU offers ONNX Runtime's integer kernels (Linux ``/proc/cpuinfo`` flags).

Int8 speed depends on it: with VNNI or AMX, ORT's u8·s8 matmul sums in int32 and is exact for
full-range 8-bit weights, so ``weight_format="int8-vnni"`` is both exact and about twice as fast
for W8 there; without them its int16 pair sums saturate (docs/RESULTS.md, issue #21)."""
from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

ISA_FLAGS = {"avx2": "AVX2", "avx_vnni": "AVX-VNNI", "avx512f": "AVX512F", "avx512_vnni": "AVX512-VNNI",
             "avx512_bf16": "AVX512-BF16", "amx_tile": "AMX-TILE", "amx_int8": "AMX-INT8", "amx_bf16": "AMX-BF16"}
INT32_DOT_FLAGS = ("avx_vnni", "avx512_vnni", "amx_int8")


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    name, flags = platform.processor() or "unknown CPU", frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", "unknown CPU", platform.processor()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = frozenset(line.split(":", 1)[1].split())
    except OSError:   # not Linux: nothing known
        pass
    return name, flags


def cpu_name() -> str:
    return _cpuinfo()[0]


def isa() -> dict[str, bool]:
    """Each integer-relevant instruction-set extension, by its usual name: present or not."""
    flags = _cpuinfo()[1]
    return {label: flag in flags for flag, label in ISA_FLAGS.items()}


def has_int32_dot() -> bool:
    """Whether this CPU has an 8-bit dot product summing in int32 (VNNI or AMX)."""
    return any(flag in _cpuinfo()[1] for flag in INT32_DOT_FLAGS)
