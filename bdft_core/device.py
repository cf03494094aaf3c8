"""Pick the compute device, set CPU threads sensibly, and keep freed tensor memory for reuse."""
from __future__ import annotations

import ctypes
import os
import platform
import sys

import torch

# glibc malloc returns large freed blocks to the OS (blocks above its mmap threshold, which stops
# adapting at 32 MiB, and heap tops above its trim threshold); every training step then maps and
# zeroes its activation and gradient buffers afresh: about 2 million page faults and 4-6 s of system
# time per fine-tuning run of the demo. Keeping blocks up to this size in the heap removes them
# (measured 2026-11-26 on the 2-core CI machine, run alternately: the whole demo 97-98 s against
# 100-113 s, evaluation 8,200 against 4,800 images/s, identical figures; README, "Measured").
MALLOC_KEEP_BYTES = 256 * 2**20
_allocator_tuned: bool | None = None


def tune_allocator() -> bool:
    """Make glibc keep freed tensor memory for reuse instead of unmapping it (Linux/glibc only; once
    per process; ``BDFT_MALLOC_TUNE=0`` leaves malloc alone). Returns whether the setting is in force.
    It changes no result, only how often pages are faulted in; the price is that up to a few hundred
    MiB freed by PyTorch stay with the process instead of going back to the OS."""
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if os.environ.get("BDFT_MALLOC_TUNE", "1").strip().lower() in ("0", "false", "no", "off") \
            or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt  # glibc's; elsewhere missing (left alone) or a stub that returns 0
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    _allocator_tuned = bool(mallopt(m_mmap_threshold, MALLOC_KEEP_BYTES)
                            and mallopt(m_trim_threshold, 2 * MALLOC_KEEP_BYTES))
    return _allocator_tuned


def pick_device(requested: str | None = None) -> torch.device:
    """Return the device to train on: ``requested`` if given ("cpu", "cuda", "cuda:1"), else CUDA
    when available, else CPU. Asking for CUDA on a machine without it is an error, not a silent
    fallback."""
    from .errors import ConfigError

    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(requested)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {requested!r}: use 'auto', 'cpu' or 'cuda'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r} asked for, but this machine has no usable CUDA GPU; use 'cpu'")
    return dev


def describe_device(dev: torch.device, amp: str | bool = "auto") -> str:
    """A human-readable name: the GPU model for CUDA, the CPU thread count otherwise, and the
    arithmetic ``amp`` resolves to there ("bf16 autocast" or "fp32"). Runs record it because the
    same seed gives different figures in the two (a CPU without native bf16 trains in fp32)."""
    precision = "bf16 autocast" if amp_dtype(dev, amp) is not None else "fp32"
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)}, {precision})"
    return f"cpu ({torch.get_num_threads()} threads, {precision})"


def setup_threads(n: int | None = None) -> int:
    """Use all cores available to this process for intra-op work (no DataLoader workers compete),
    unless BDFT_THREADS or ``n`` says otherwise; also keeps freed tensor memory for reuse
    (:func:`tune_allocator`)."""
    tune_allocator()
    if n is None:
        env = os.environ.get("BDFT_THREADS")
        n = int(env) if env else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = max(1, int(n))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def cpu_bf16_fast() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16 / AMX on x86, the bf16
    extension on ARM), where bf16 autocast roughly doubles convolution speed; elsewhere bf16 on CPU is
    emulated and slower. On x86 the instructions themselves are asked for: oneDNN's own "bf16
    supported" is true on any AVX-512 CPU (Skylake to Ice Lake servers), where it emulates bf16 and a
    fastnet forward pass took 2.4x as long as in fp32 (oneDNN capped at AVX-512 core, 2026-11-27)."""
    try:
        if platform.machine().lower() in ("x86_64", "amd64", "x86", "i386", "i686"):
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover - older builds
        return False


def amp_dtype(dev: torch.device, amp: str | bool = "auto") -> torch.dtype | None:
    """The autocast dtype for ``dev``: bf16 on CUDA and on CPUs with native bf16, else None (fp32).
    ``amp`` may force it: True/"bf16" on, False/"off" off."""
    if amp in (False, "off", "fp32", "none"):
        return None
    if amp in (True, "bf16", "on"):
        return torch.bfloat16
    if dev.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_bf16_fast() else None
