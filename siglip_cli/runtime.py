"""`--device` / `--dtype` / `--attn` "auto" resolution and capability checks."""

from __future__ import annotations

import torch

from .attention import why_unavailable
from .errors import BackendUnavailable, UsageError

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


def resolve_attention(name: str, device: torch.device, dtype: torch.dtype, head_dims: tuple[int, ...]) -> str:
    """auto: torch's SDPA, which picks its own fused kernel per device; `flash` only on request."""
    name = (name or "auto").lower()
    if name == "auto":
        return "sdpa"
    reason = why_unavailable(name, device, dtype, head_dims)
    if reason:
        raise BackendUnavailable(f"--attn {name}: {reason}")
    return name


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]
