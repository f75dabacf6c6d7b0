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


# The flags whose presence changes which kernels run, and so which variant is fastest.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def fingerprint(info: dict[str, Any] | None = None) -> str:
    """A short key for 'the same kind of machine': CPU model, speed-deciding ISA flags and usable cores."""
    import hashlib

    info = info or machine_info()
    flags = ",".join(f for f in SPEED_FLAGS if info["isa"].get(f))
    text = f"{info['cpu_model']}|{flags}|{info['usable_cpus']}|{platform.machine()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe(info: dict[str, Any]) -> str:
    flags = ", ".join(f for f in SPEED_FLAGS if info.get("isa", {}).get(f)) or "no AVX2/AVX-512/AMX"
    return f"{info.get('cpu_model', 'an unknown CPU')} ({flags})"


def speed_mismatch(recorded: dict[str, Any] | None, here: dict[str, Any] | None = None) -> str | None:
    """A warning when the machine a default was chosen on differs from this one in the flags that decide speed."""
    if not recorded or "isa" not in recorded:
        return None
    here = here or machine_info()
    differ = [f for f in SPEED_FLAGS if bool(recorded["isa"].get(f)) != bool(here["isa"].get(f))]
    if not differ:
        return None
    lost = [f for f in differ if recorded["isa"].get(f)]
    meaning = ""
    if any(f in lost for f in ("avx512_bf16", "amx_bf16")):
        meaning = " bf16 runs emulated here, often 30-50x slower than fp32;"
    elif lost:
        meaning = " kernels the chosen variant relied on are missing here;"
    return (f"the default variant was chosen on {describe(recorded)}, and this machine is {describe(here)}: "
            f"they differ in {', '.join(differ)}.{meaning} the choice may not be the fastest here: serve with "
            "--variant auto to re-choose on this machine, or run `kiln bench --select` here")
