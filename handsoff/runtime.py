"""Process-level settings that make PyTorch fast on CPU."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import sys

from handsoff.errors import HandsoffError, UsageError

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 2**31 - 1  # mallopt takes an int


def _glibc():
    """The C library, where it is glibc on Linux (mallopt, malloc_trim); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def tune_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the kernel.

    With glibc's defaults every large tensor is a fresh mmap whose pages the kernel must fault in and zero;
    in VMs that costs up to ten times the arithmetic of an elementwise op (measured here: a bf16 multiply of a
    (16, 512, 64, 64) tensor 21 ms -> 2.3 ms). Raising the mmap and trim thresholds lets the heap reuse pages,
    at the price of RSS staying near its peak. Same effect as starting Python with MALLOC_MMAP_THRESHOLD_ and
    MALLOC_TRIM_THRESHOLD_ set. Called by the CLI and the benchmarks; library users may call it themselves.
    Set HANDSOFF_NO_MALLOPT=1 to skip. Returns whether the settings were applied.
    """
    libc = None if os.environ.get("HANDSOFF_NO_MALLOPT") else _glibc()
    try:
        return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)
                    and libc.mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
    except AttributeError:  # not glibc (musl, ...): nothing to tune
        return False


def release_memory() -> bool:
    """Hand the heap's free pages back to the kernel (glibc ``malloc_trim``), after garbage collection.

    With ``tune_allocator``'s thresholds, memory a stage frees stays in the process; where one process runs several
    stages (``handsoff run``) the next stage's allocations then land beside it instead of in it, and the peaks add
    up (measured at 256 px: 9.1 GiB for a run whose largest stage alone peaks at 7.4 GiB). Called between stages.
    Returns whether memory was returned (False off glibc).
    """
    gc.collect()
    libc = _glibc()
    try:
        return bool(libc and libc.malloc_trim(0))
    except AttributeError:  # not glibc
        return False


# Reduced precision must beat float32 by this much to be chosen (timing noise on a shared machine is a few %).
REDUCED_PRECISION_MARGIN = 1.1


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo (Linux; read once per process); empty elsewhere."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform reports."""
    import platform

    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


# The instruction sets that decide whether bf16 arithmetic is native on a CPU.
_PRECISION_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_key() -> str:
    """What identifies this CPU's arithmetic in cached measurements: the model name, family and model numbers and
    the bf16-relevant instruction sets. Virtual machines often report only "AMD EPYC": without the rest, a cache
    written on an AVX2-only EPYC would answer for an AVX512-BF16 one in the same home directory."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    isa = ",".join(f for f in _PRECISION_FLAGS if f in flags)
    return f"{cpu_name()} (family {info.get('cpu family', '?')} model {info.get('model', '?')}; {isa or 'no flags'})"


def _timed_speedup(run, repeats: int) -> float:
    """float32 time / bfloat16 time of ``run(dtype)`` (which returns its own seconds), fastest of ``repeats`` each
    after one warm-up run of each dtype; a first timed bf16 run over 4x float32 (emulated bf16) ends the
    measurement early."""
    import torch

    # oneDNN creates (JIT-compiles) its kernels on first use, per dtype: an untimed bf16 run first, or the
    # compilation reads as emulation (a native AVX512-BF16 CPU measured 0.02x at one thread that way).
    run(torch.float32)
    run(torch.bfloat16)
    fp32 = min(run(torch.float32) for _ in range(repeats))
    first = run(torch.bfloat16)
    if first > 4 * fp32:  # emulated: no need to time it more precisely
        return fp32 / first
    return fp32 / min(run(torch.bfloat16) for _ in range(repeats))


def measure_bf16_speedup(channels: int = 64, size: int = 32, batch: int = 2, repeats: int = 3) -> float:
    """float32 time / bfloat16 time of a channels-last 3x3 convolution pair with leaky ReLUs, forward and backward,
    on the CPU: the arithmetic that dominates generator training. Above 1 bf16 is faster; on CPUs without
    AVX512-BF16 or AMX it is emulated and far below 1 (a mixed-precision training step measured about 30x slower
    than float32 on an AVX2-only AMD EPYC); then the measurement stops after bf16's first run."""
    import time

    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    x32 = torch.randn(batch, channels, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    w32 = torch.randn(channels, channels, 3, 3, generator=gen) / (3 * channels**0.5)

    def run(dtype) -> float:
        x = x32.to(dtype).requires_grad_(True)
        w = w32.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        start = time.perf_counter()
        y = F.leaky_relu(F.conv2d(F.leaky_relu(F.conv2d(x, w, padding=1), 0.2), w, padding=1), 0.2)
        y.float().square().mean().backward()
        return time.perf_counter() - start

    return _timed_speedup(run, repeats)


def measure_bf16_matmul_speedup(rows: int = 1024, inner: int = 128, width: int = 2560, repeats: int = 3) -> float:
    """float32 time / bfloat16 time of a (rows, inner) @ (inner, width) matrix product on the CPU: the shape of the
    label generator's first layer on one band of label pixels (heads-64: a 32-px group's 128 channels into 10
    members x 256). On an AVX512-BF16 AMD EPYC (Zen 4) it measured 2.8x; without native bf16 it is below 1."""
    import time

    import torch

    gen = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(rows, inner, generator=gen), torch.randn(inner, width, generator=gen)

    def run(dtype) -> float:
        a, b = a32.to(dtype), b32.to(dtype)
        start = time.perf_counter()
        a @ b
        return time.perf_counter() - start

    return _timed_speedup(run, repeats)


def _cache_file():
    from pathlib import Path

    root = os.environ.get("HANDSOFF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "handsoff")
    return Path(root) / "precision.json"


def bf16_speedup(kind: str = "conv") -> float:
    """How much faster bf16 is than float32 on this CPU, measured once per CPU (``cpu_key``), torch version,
    thread count and measurement version, and cached in ``$HANDSOFF_CACHE/precision.json`` (default
    ~/.cache/handsoff); an unwritable cache only costs a re-measure. ``kind``: 'conv' (``measure_bf16_speedup``:
    generator training and synthesis) or 'matmul' (``measure_bf16_matmul_speedup``: label maps)."""
    import json

    import torch

    measure = {"conv": lambda: measure_bf16_speedup(), "matmul": lambda: measure_bf16_matmul_speedup()}[kind]
    # v2: bf16 warmed up before timing (v1 entries could hold kernel creation read as emulation: measured again).
    key = f"{cpu_key()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {kind} | v2"
    path = _cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    if not isinstance(cache.get(key), (int, float)):
        cache[key] = round(measure(), 3)
        try:
            from handsoff.fileio import atomic_write_json

            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, cache)
        except OSError:
            pass
    return float(cache[key])


def reduced_precision_pays(device, kind: str = "conv") -> bool:
    """Whether 'auto' precision should run reduced-precision arithmetic of ``kind`` (see ``bf16_speedup``) on
    ``device``: always on CUDA (fp16 / bf16 tensor cores, NVIDIA's default); on a CPU only where bf16 measured at
    least REDUCED_PRECISION_MARGIN x faster than float32, so that the default is never the slower one."""
    return getattr(device, "type", device) == "cuda" or bf16_speedup(kind) >= REDUCED_PRECISION_MARGIN


def memory_gib() -> tuple[float, float]:
    """(total, available) memory of this machine in GiB (Linux /proc/meminfo; elsewhere (0, 0): unknown)."""
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0]) / 2**20
    except (OSError, ValueError):
        return 0.0, 0.0
    return info.get("MemTotal", 0.0), info.get("MemAvailable", 0.0)


def resident_gib() -> float:
    """This process's resident memory now, in GiB (0 where unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except (OSError, ValueError):
        pass
    return 0.0


def default_memory_budget_gib(device) -> float:
    """The peak memory a stage plans for when the user states none: on CUDA 80% of the device's free memory; on a
    CPU a third of the machine's memory and at most half of what is available now (8 GiB on a 24 GiB machine)."""
    import torch

    if getattr(device, "type", device) == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.8 * free / 2**30
    total, available = memory_gib()
    return min(total / 3, available / 2) if total else 8.0


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
