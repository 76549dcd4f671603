"""The CPU's instruction-set extensions, for the precision modes' choices.

`accel` (bf16 on native bf16 CPUs, bf16 attention on AMX) and `quant` (int8 only with VNNI or
AMX-INT8) both ask this one probe; it lives apart from both because `accel` imports `quant`.
"""

from __future__ import annotations

import torch


def cpu_flags() -> set[str]:
    """CPU feature names ("avx512_bf16", "amx_int8", ...): the union of PyTorch's cpuinfo
    probe (works where /proc is absent) and Linux's /proc/cpuinfo (the same names).
    Empty where neither answers."""
    flags: set[str] = set()
    try:
        flags |= {k for k, v in torch._C._cpu._get_cpu_capability().items() if v is True}
    except (AttributeError, RuntimeError):
        pass
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags |= set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return flags
