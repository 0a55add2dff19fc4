"""Process-level settings that make PyTorch fast on CPU."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from handsoff.errors import HandsoffError, UsageError

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 2**31 - 1  # mallopt takes an int


def tune_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the kernel.

    With glibc's defaults every large tensor is a fresh mmap whose pages the kernel must fault in and zero;
    in VMs that costs up to ten times the arithmetic of an elementwise op (measured here: a bf16 multiply of a
    (16, 512, 64, 64) tensor 21 ms -> 2.3 ms). Raising the mmap and trim thresholds lets the heap reuse pages,
    at the price of RSS staying near its peak. Same effect as starting Python with MALLOC_MMAP_THRESHOLD_ and
    MALLOC_TRIM_THRESHOLD_ set. Called by the CLI and the benchmarks; library users may call it themselves.
    Set HANDSOFF_NO_MALLOPT=1 to skip. Returns whether the settings were applied.
    """
    if os.environ.get("HANDSOFF_NO_MALLOPT") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False


def resolve_device(name):
    """A torch.device from a device option: "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ...

    Raises UsageError (a ValueError) naming the option for a malformed name or a CUDA device this machine does
    not have."""
    import torch

    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {name!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine (use auto or cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: handsoff runs on cpu or cuda")
    return device


class NonFiniteLossError(HandsoffError, ArithmeticError):
    """Training produced a NaN or infinite loss; raised before anything of that step is saved."""


def require_finite(loss, where: str, parts: dict | None = None) -> None:
    """Raise NonFiniteLossError naming ``where`` (the run and step) when ``loss`` (a scalar tensor) is NaN or
    infinite. The usual causes are a NaN / inf in the labels or a learning rate far too high."""
    import torch

    if not bool(torch.isfinite(loss.detach())):
        detail = ", ".join(f"{k}={float(v.detach() if isinstance(v, torch.Tensor) else v):.4g}"
                           for k, v in (parts or {}).items())
        raise NonFiniteLossError(f"{where}: the training loss is {float(loss.detach())}"
                                 + (f" ({detail})" if detail else "")
                                 + "; stopped before saving. Check the labels for NaN / inf values (every "
                                 "label file must hold finite numbers) or lower the learning rate")
