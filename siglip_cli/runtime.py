"""`--device` / `--dtype` / `--attn` "auto" resolution, capability checks, process tuning."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from dataclasses import dataclass

import torch

from .core.attention import why_unavailable
from .core.errors import BackendUnavailable, UsageError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# int8: the fp32 model with its Linear layers quantized (weights int8, activations quantized on
# the fly per batch); CPU only, since it runs on torch's fbgemm/oneDNN CPU kernels.
PRECISIONS = (*DTYPES, "int8")

# x86 flags (as /proc/cpuinfo spells them) that decide or explain the CPU's speed per dtype;
# `siglip bench` reports them. bf16 has native matrix support with AMX-BF16 (tiles) or
# AVX512-BF16 (dot products); without either torch computes bf16 slower than fp32.
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Precision:
    """How the model computes: `name` (fp32, fp16, bf16 or int8), the torch dtype its weights
    and activations are stored in (fp32 for int8) and, for `auto`, why it was picked."""

    name: str
    dtype: torch.dtype
    reason: str = ""

    @property
    def quantize(self) -> str | None:
        return "int8" if self.name == "int8" else None

    @property
    def exact(self) -> bool:
        """Whether the numbers are transformers' fp32 ones (given exact decoding)."""
        return self.name == "fp32"


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


def resolve_precision(name: str, device: torch.device, flags: frozenset[str] | None = None) -> Precision:
    """auto: on CUDA fp16 (tensor cores at half the memory, and 8 more mantissa bits than bf16:
    no CUDA GPU runs bf16 faster); on a CPU with native bf16 matrix support (AMX-BF16 or
    AVX512-BF16, read from the CPU's own flags, never guessed from its vendor) bf16, measured
    1.8x fp32 for the vision tower on a Zen 4 with AVX512-BF16 (docs/benchmarks.md); elsewhere fp32 (MPS half precision is unreliable across
    macOS versions; CPUs without bf16 units run it slower than fp32). `flags`: the CPU's flags,
    read from the machine when not given."""
    name = (name or "auto").lower()
    if name == "auto":
        if device.type == "cuda":
            return Precision("fp16", torch.float16, "fp16 on CUDA")
        if device.type == "cpu":
            flag = native_bf16(cpu_flags() if flags is None else flags)
            if flag:
                return Precision("bf16", torch.bfloat16, f"the CPU has native bf16: {flag}")
            return Precision("fp32", torch.float32, "no native bf16 on this CPU: neither amx_bf16 nor avx512_bf16")
        return Precision("fp32", torch.float32, f"fp32 on {device.type}")
    if name not in PRECISIONS:
        raise UsageError(f"--dtype: unknown dtype {name!r} (use auto, {', '.join(PRECISIONS)})")
    if name == "int8" and device.type != "cpu":
        raise BackendUnavailable(f"--dtype int8 runs on the CPU only (torch's dynamic quantization), not on {device.type}; use fp16 or bf16 there")
    return Precision(name, DTYPES.get(name, torch.float32))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype the weights are stored in for `--dtype name` (fp32 for int8)."""
    return resolve_precision(name, device).dtype


def resolve_decode(name: str, precision: Precision) -> str:
    """auto: `exact` with fp32, whose promise is transformers' numbers; `fast` (JPEG draft
    decoding) otherwise, where its error (min cosine 0.9999+ against exact, docs/benchmarks.md)
    is below the dtype's own."""
    name = (name or "auto").lower()
    if name == "auto":
        return "exact" if precision.exact else "fast"
    if name not in ("exact", "fast"):
        raise UsageError(f"--decode: unknown mode {name!r} (use auto, exact or fast)")
    return name


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first processor in /proc/cpuinfo text (x86: `flags`, ARM: `Features`)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags; empty where /proc/cpuinfo does not exist (macOS, Windows),
    which makes `auto` choose fp32 there."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            return parse_cpu_flags(fh.read())
    except OSError:
        return frozenset()


def native_bf16(flags: frozenset[str]) -> str | None:
    """The flag that gives this CPU native bf16 matrix math, if any. torch reaches those units
    through oneDNN, so a torch built without it gains nothing from them."""
    if not torch.backends.mkldnn.is_available():
        return None
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in flags), None)


def cpu_features(flags: frozenset[str] | None = None) -> dict[str, bool]:
    """{flag: present} for the flags that decide the CPU's speed per dtype (for bench's JSON)."""
    flags = cpu_flags() if flags is None else flags
    return {flag: flag in flags for flag in CPU_FEATURES}


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


@contextlib.contextmanager
def ieee_fp32(device: torch.device, dtype: torch.dtype):
    """fp32 on CUDA means IEEE fp32 here, as on the CPU: torch runs cuDNN convolutions (the patch
    embedding) in TF32 by default, which moves logits by ~3e-4 on an H100 and breaks parity with
    transformers' fp32 numbers. Inside this block TF32 is off for convolutions and matrix
    multiplies; the process's own settings come back afterwards."""
    if device.type != "cuda" or dtype != torch.float32:
        yield
        return
    if hasattr(torch.backends.cudnn, "conv"):  # torch >= 2.9: per-operator precision flags
        settings = [(torch.backends.cudnn.conv, "fp32_precision"), (torch.backends.cuda.matmul, "fp32_precision")]
        ieee = "ieee"
    else:
        settings = [(torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")]
        ieee = False
    saved = [getattr(owner, attr) for owner, attr in settings]
    try:
        for owner, attr in settings:
            setattr(owner, attr, ieee)
        yield
    finally:
        for (owner, attr), value in zip(settings, saved):
            setattr(owner, attr, value)


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
