"""The machine figures are measured on: CPU model, the ISA flags that decide INT8/BF16 speed, usable cores.

A latency means little without the CPU it ran on (BF16 is fast with AMX or AVX-512 BF16 and emulated, 30-50x
slower, on AVX2), so bench, loadtest and the export report all describe the machine the same way.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def default_threads() -> int:
    """The cores this process may run on (its affinity mask, which a container's cpuset narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_info() -> dict[str, Any]:
    """CPU model and the ISA flags that decide INT8/BF16 speed: figures mean little without them."""
    model, flags = "", set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    return {
        "cpu_model": model,
        "isa": {flag: flag in flags for flag in ISA_FLAGS},
        "logical_cpus": os.cpu_count(),
        "usable_cpus": default_threads(),
        "platform": platform.platform(),
    }


def bf16_native(info: dict[str, Any] | None = None) -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX); elsewhere it is emulated."""
    isa = (info or machine_info())["isa"]
    return bool(isa.get("avx512_bf16") or isa.get("amx_bf16"))
