"""`model.safetensors` (official Hugging Face key names) -> our modules.

The whole key set is checked against what the config says the checkpoint must hold, and any
missing, unexpected or misshapen tensor is an error that names it. Only the towers asked for
are then read: safetensors maps the file, so a tower never loaded costs nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from .config import SiglipConfig
from .errors import ModelUnavailable
from .model import Siglip, skip_init

# Non-persistent buffers that some exporters saved anyway; they carry no information.
_IGNORED_SUFFIXES = (".position_ids",)
_SHOWN = 6


def checkpoint_keys(config: SiglipConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an official SiglipModel checkpoint of this config holds, with its shape:
    read off the model itself (built on the meta device, so it costs nothing), under the
    checkpoint's names."""
    with skip_init():
        network = Siglip(config, device="meta")
    return {name: tuple(t.shape) for name, t in to_checkpoint_state(network).items()}


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" (and {len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")


def check_checkpoint(path: Path, config: SiglipConfig, handle) -> None:
    expected = checkpoint_keys(config)
    found = {k for k in handle.keys() if not k.endswith(_IGNORED_SUFFIXES)}
    missing = sorted(set(expected) - found)
    unexpected = sorted(found - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if not problems:
        wrong = []
        for name, shape in expected.items():
            actual = tuple(handle.get_slice(name).get_shape())
            if actual != shape:
                wrong.append(f"{name} is {list(actual)}, config says {list(shape)}")
        if wrong:
            problems.append("shape mismatch: " + _listing(wrong))
    if problems:
        raise ModelUnavailable(f"{path}: does not match config.json; " + "; ".join(problems))


def _fuse_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    fused: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if ".self_attn.q_proj." in name:
            kind = name.rsplit(".", 1)[1]  # weight or bias
            base = name.split(".self_attn.")[0] + ".self_attn."
            parts = [state[f"{base}{p}_proj.{kind}"] for p in ("q", "k", "v")]
            fused[f"{base}qkv_proj.{kind}"] = torch.cat(parts, dim=0)
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        else:
            fused[name] = tensor
    return fused


def load_model(
    path: Path,
    config: SiglipConfig,
    towers: tuple[str, ...],
    attend,
    device: torch.device,
    dtype: torch.dtype,
) -> Siglip:
    """Build a `Siglip` holding only `towers` and fill it from `path`, checking every key first."""
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except FileNotFoundError:
        raise ModelUnavailable(f"{path}: no such file") from None
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ModelUnavailable(f"{path}: not a readable safetensors file ({exc})") from None
    with handle:
        check_checkpoint(path, config, handle)
        prefixes = tuple(f"{tower}_model." for tower in towers)
        state = {
            name: handle.get_tensor(name)
            for name in handle.keys()
            if name.startswith(prefixes + ("logit_",)) and not name.endswith(_IGNORED_SUFFIXES)
        }
    # The temperature and bias stay fp32 whatever the model's dtype: two numbers, every score.
    # Converted before q/k/v are fused, so a bf16/fp16 load never makes a fused fp32 copy.
    state = _fuse_qkv({
        name: t.to(device=device, dtype=torch.float32 if name.startswith("logit_") else dtype)
        for name, t in state.items()
    })
    # On the meta device: no memory and no random init for weights about to be replaced.
    with skip_init():
        model = Siglip(config, attend, towers=towers, device="meta")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def to_checkpoint_state(model: Siglip) -> dict[str, torch.Tensor]:
    """Our state dict under the official checkpoint names (q/k/v split again), e.g. to load the
    same weights into transformers' SiglipModel for a side-by-side comparison."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if ".self_attn.qkv_proj." in name:
            base, kind = name.split(".qkv_proj.")
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                state[f"{base}.{proj}.{kind}"] = part.contiguous()
        else:
            state[name] = tensor
    return state
