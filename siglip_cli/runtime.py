"""`--device` / `--dtype` / `--attn` "auto" resolution, capability checks, process tuning."""

from __future__ import annotations

import ctypes
import sys

import torch

from .core.attention import why_unavailable
from .core.errors import BackendUnavailable, UsageError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_device(name: str = "auto") -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(
            f"--device {name}: CUDA is not available to this torch ({torch.__version__}); use --device cpu"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise BackendUnavailable(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not _mps_available():
        raise BackendUnavailable(f"--device {name}: Apple's MPS backend is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device: {device.type} is not supported (use cpu, cuda or mps)")
    if device.type in ("cpu", "mps") and device.index not in (None, 0):
        raise UsageError(f"--device {name}: there is one {device.type} device; use --device {device.type}")
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: fp16 on CUDA (half the memory, tensor cores), fp32 elsewhere (MPS half precision
    is unreliable across macOS versions; CPUs without fp16 units run it slower than fp32)."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError(f"--dtype: unknown dtype {name!r} (use auto, fp32, fp16 or bf16)") from None


def resolve_attention(
    name: str, device: torch.device, dtype: torch.dtype, head_dims: tuple[int, ...], masked: bool = False
) -> str:
    """auto: torch's SDPA, which picks its own fused kernel per device; `flash` only on request.
    `masked`: the model needs key masks (SigLIP 2 NaFlex)."""
    name = (name or "auto").lower()
    if name == "auto":
        return "sdpa"
    reason = why_unavailable(name, device, dtype, head_dims, masked)
    if reason:
        raise BackendUnavailable(f"--attn {name}: {reason}")
    return name


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Measured on CPU: glibc hands every block over 32 MB back to the OS when it is freed, so
    each layer's fresh activations (38 MB for base-224 at batch 16) are page-faulted in again,
    and the matrix multiplies writing them run ~15% slower. Keeping freed blocks in the heap
    removes that; peak memory is unchanged (the same sizes are reused every batch).
    Called by the CLI only, since it changes the allocator for the whole process. Returns
    whether it took effect (glibc Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False
