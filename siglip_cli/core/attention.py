"""Attention backends behind one signature, picked by name when the model is built.

Every backend takes `q` of shape (batch, query_len, heads, head_dim) and `k`, `v` of shape
(batch, key_len, heads, head_dim) -- the layout the projections produce without a copy and the
one flash-attn wants -- plus the softmax scale and an optional key mask, and returns
(batch, query_len, heads * head_dim).

The key mask (batch, key_len), True for real tokens, exists for SigLIP 2 NaFlex: images of
different patch counts share a batch padded to the longest, and no query may attend to the
padding (in the encoder and in the pooling head). SigLIP's text tower attends without a mask,
over its padding, as in training. A backend that cannot take a mask says so
(`why_unavailable(..., masked=True)`) instead of computing something else.

`eager` is the reference: plain matmuls with the softmax upcast to fp32, the same math as
transformers' `eager_attention_forward`. `sdpa` and `flash` are tested against it.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import BackendUnavailable

AttentionFn = Callable[..., torch.Tensor]  # (q, k, v, scale, key_mask=None) -> (B, Lq, H * D)

BACKENDS = ("eager", "sdpa", "flash")


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    batch, query_len, heads, head_dim = q.shape
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D)
    weights = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_mask is not None:
        # The reference adds the dtype's minimum: after the softmax a padded key weighs exactly 0.
        weights = weights.masked_fill(~key_mask[:, None, None, :], torch.finfo(weights.dtype).min)
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(weights, v)  # (B, H, Lq, D)
    return out.transpose(1, 2).reshape(batch, query_len, heads * head_dim)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    batch, query_len, heads, head_dim = q.shape
    mask = None if key_mask is None else key_mask[:, None, None, :]  # boolean: True takes part
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(batch, query_len, heads * head_dim)


def _flash_attn_func() -> Callable:
    # flash-attn 2.x (`pip install flash-attn`) first, then flash-attn 4 (`pip install flash-attn-4`,
    # CuTe DSL kernels for Hopper and Blackwell). Both take (B, L, H, D) and `softmax_scale`.
    try:
        from flash_attn import flash_attn_func

        return flash_attn_func
    except Exception as first:  # a 2.x build for another torch: ImportError "undefined symbol"
        try:
            from flash_attn.cute import flash_attn_func
        except Exception as second:
            # The first failure is the one to report: "No module named 'flash_attn.cute'" would
            # hide why the installed 2.x does not load. A flash-attn 4 that is there but broken
            # is reported too.
            missing = isinstance(second, ModuleNotFoundError) and second.name in ("flash_attn", "flash_attn.cute")
            if missing or str(second) == str(first):  # no flash-attn 4, or its parent failed the same way
                raise first from None
            raise ImportError(f"{first}; flash_attn.cute: {second}") from None
        return flash_attn_func


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    batch, query_len, heads, head_dim = q.shape
    if key_mask is not None and not bool(key_mask.all()):
        # Refused up front by why_unavailable(masked=True); this guards direct calls.
        raise BackendUnavailable(FLASH_NO_MASK)
    out = _flash_attn_func()(q, k, v, softmax_scale=scale)
    if isinstance(out, tuple):  # flash-attn 4 returns (out, lse)
        out = out[0]
    return out.reshape(batch, query_len, heads * head_dim)


_REGISTRY: dict[str, AttentionFn] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "flash": flash_attention,
}


# flash-attn 2 runs on Ampere and newer (sm80+); flash-attn 4's CuTe kernels on Hopper and
# Blackwell (sm90+). On older GPUs their kernels fail at the first call, not at import.
FLASH_MIN_CAPABILITY = {"flash-attn 2": (8, 0), "flash-attn 4": (9, 0)}


def flash_generation_problem(capability: tuple[int, int], flavour: str) -> str | None:
    """None if `flavour` (a FLASH_MIN_CAPABILITY key) runs on a GPU of this compute capability."""
    needed = FLASH_MIN_CAPABILITY[flavour]
    if tuple(capability) >= needed:
        return None
    return (f"{flavour} needs a GPU of compute capability {needed[0]}.{needed[1]} or newer; "
            f"this one is {capability[0]}.{capability[1]}; use --attn sdpa")


def flash_flavour() -> str:
    """Which flash-attn the `flash` backend uses (the package must import)."""
    return "flash-attn 4" if _flash_attn_func().__module__.startswith("flash_attn.cute") else "flash-attn 2"


def flash_available() -> str | None:
    """None when a flash-attn package can be imported, else the reason it cannot."""
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed (pip install 'siglip-cli[flash]')"
    try:
        _flash_attn_func()
    except Exception as exc:  # a broken CUDA build raises all sorts of errors at import
        return f"flash-attn is installed but does not import ({type(exc).__name__}: {exc})"
    return None


# flash-attn's padded-batch entry point (`flash_attn_varlen_func`) needs the batch unpadded into
# one packed sequence; that path is not written, since it could not be tested on the machines
# this was built on. NaFlex checkpoints therefore run flash-free.
FLASH_NO_MASK = (
    "flash attention here takes no padding mask, which SigLIP 2 NaFlex batches need "
    "(images of different patch counts share a batch); use --attn sdpa"
)


def why_unavailable(
    name: str, device: torch.device, dtype: torch.dtype, head_dims: tuple[int, ...] = (), masked: bool = False
) -> str | None:
    """None if backend `name` can run on this device and dtype (and with a key mask, when
    `masked`), else one sentence saying why not."""
    if name not in _REGISTRY:
        return f"unknown attention backend {name!r} (choose from {', '.join(BACKENDS)})"
    if name != "flash":
        return None
    if masked:
        return FLASH_NO_MASK
    if device.type != "cuda":
        return f"flash attention needs a CUDA device, not {device.type}; use --attn sdpa"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash attention runs only in fp16 or bf16, not {str(dtype).removeprefix('torch.')}; add --dtype fp16 or use --attn sdpa"
    bad = [d for d in head_dims if d % 8 or d > 256]
    if bad:
        return f"flash attention needs a head size that is a multiple of 8 and at most 256 (model has {bad[0]})"
    return flash_available() or flash_generation_problem(torch.cuda.get_device_capability(device), flash_flavour())


def resolve(
    name: str, device: torch.device, dtype: torch.dtype, head_dims: tuple[int, ...] = (), masked: bool = False
) -> AttentionFn:
    """The attention function for `name`, or BackendUnavailable saying why it cannot run here."""
    reason = why_unavailable(name, device, dtype, head_dims, masked)
    if reason:
        raise BackendUnavailable(reason)
    return _REGISTRY[name]
