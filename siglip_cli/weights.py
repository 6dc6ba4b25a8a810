"""`model.safetensors` (official Hugging Face key names) -> our modules.

The whole key set is checked against what the config says the checkpoint must hold, and any
missing, unexpected or misshapen tensor is an error that names it. Only the towers asked for
are then read: safetensors maps the file, so a tower never loaded costs nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from .config import SiglipConfig, TextConfig, VisionConfig
from .errors import ModelUnavailable
from .model import Siglip, skip_init

# Non-persistent buffers that some exporters saved anyway; they carry no information.
_IGNORED_SUFFIXES = (".position_ids",)
_SHOWN = 6


def _layer_keys(prefix: str, hidden: int, intermediate: int) -> dict[str, tuple[int, ...]]:
    keys: dict[str, tuple[int, ...]] = {}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        keys[f"{prefix}.self_attn.{proj}.weight"] = (hidden, hidden)
        keys[f"{prefix}.self_attn.{proj}.bias"] = (hidden,)
    for norm in ("layer_norm1", "layer_norm2"):
        keys[f"{prefix}.{norm}.weight"] = (hidden,)
        keys[f"{prefix}.{norm}.bias"] = (hidden,)
    keys.update(_mlp_keys(f"{prefix}.mlp", hidden, intermediate))
    return keys


def _mlp_keys(prefix: str, hidden: int, intermediate: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.fc1.weight": (intermediate, hidden),
        f"{prefix}.fc1.bias": (intermediate,),
        f"{prefix}.fc2.weight": (hidden, intermediate),
        f"{prefix}.fc2.bias": (hidden,),
    }


def text_keys(config: TextConfig) -> dict[str, tuple[int, ...]]:
    d = config.hidden_size
    keys = {
        "text_model.embeddings.token_embedding.weight": (config.vocab_size, d),
        "text_model.embeddings.position_embedding.weight": (config.max_position_embeddings, d),
        "text_model.final_layer_norm.weight": (d,),
        "text_model.final_layer_norm.bias": (d,),
        "text_model.head.weight": (config.embed_dim, d),
        "text_model.head.bias": (config.embed_dim,),
    }
    for i in range(config.num_hidden_layers):
        keys.update(_layer_keys(f"text_model.encoder.layers.{i}", d, config.intermediate_size))
    return keys


def vision_keys(config: VisionConfig) -> dict[str, tuple[int, ...]]:
    d, p = config.hidden_size, config.patch_size
    keys = {
        "vision_model.embeddings.patch_embedding.weight": (d, config.num_channels, p, p),
        "vision_model.embeddings.patch_embedding.bias": (d,),
        "vision_model.embeddings.position_embedding.weight": (config.num_patches, d),
        "vision_model.post_layernorm.weight": (d,),
        "vision_model.post_layernorm.bias": (d,),
        "vision_model.head.probe": (1, 1, d),
        "vision_model.head.attention.in_proj_weight": (3 * d, d),
        "vision_model.head.attention.in_proj_bias": (3 * d,),
        "vision_model.head.attention.out_proj.weight": (d, d),
        "vision_model.head.attention.out_proj.bias": (d,),
        "vision_model.head.layernorm.weight": (d,),
        "vision_model.head.layernorm.bias": (d,),
    }
    keys.update(_mlp_keys("vision_model.head.mlp", d, config.intermediate_size))
    for i in range(config.num_hidden_layers):
        keys.update(_layer_keys(f"vision_model.encoder.layers.{i}", d, config.intermediate_size))
    return keys


def checkpoint_keys(config: SiglipConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an official SiglipModel checkpoint of this config holds, with its shape."""
    return {"logit_scale": (1,), "logit_bias": (1,), **text_keys(config.text), **vision_keys(config.vision)}


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
    state = {
        name: t.to(device=device, dtype=torch.float32 if name.startswith("logit_") else dtype)
        for name, t in _fuse_qkv(state).items()
    }
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
