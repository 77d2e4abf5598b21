"""Mixed precision: bf16 autocast where the device computes bf16 natively.

On a CPU with AVX512-BF16 or AMX (Intel since Cooper Lake / Sapphire Rapids, AMD since
Zen 4) oneDNN runs bf16 matmuls about 1.7x faster than float32 for the tiny models of the
embedded default (`benchmarks/precision.py`); without them bf16 is emulated and
slower, so `auto` keeps float32 there. Weights, optimizer state and losses stay float32.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch

MODES = ("auto", "bf16", "none")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this processor has bf16 arithmetic (avx512_bf16 or amx_bf16; Linux flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_enabled(device: torch.device | str, mode: str) -> bool:
    """`mode` (auto, bf16, none) resolved for `device`."""
    if mode not in MODES:
        raise ValueError(f"precision {mode!r} is not one of {MODES}")
    kind = torch.device(device).type
    if mode == "none":
        return False
    if mode == "bf16":
        return True
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    return kind == "cpu" and cpu_has_native_bf16()


def autocast(device: torch.device | str, mode: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `mode` resolves to it; otherwise a no-op context."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16_enabled(device, mode))
