"""SigLIP in plain PyTorch: two towers and a sigmoid.

Follows transformers' `modeling_siglip.py` (itself a port of big_vision's
`models/proj/image_text/two_towers.py`) and, for SigLIP 2 NaFlex, `modeling_siglip2.py`: a
linear patch embedding over already cut patches, a learned position table resized to each
image's patch grid, and a key mask in every attention layer and in the pooling head so that
images padded to a common length never see the padding. Module names match the checkpoint keys, so a
`model.safetensors` state dict loads as it is, with one exception: each encoder layer's
separate `q_proj`, `k_proj`, `v_proj` are stored here as one `qkv_proj` (one matrix multiply
instead of three; `weights.py` concatenates them at load time, exactly as the pooling head's
`in_proj_weight` already is in the checkpoint).

This file knows no files, images or tokenizers: tensors in, tensors out.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionFn, eager_attention
from .config import SiglipConfig, TextConfig, VisionConfig


_INIT_FUNCTIONS = ("kaiming_uniform_", "uniform_", "normal_", "ones_", "zeros_")


@contextlib.contextmanager
def skip_init():
    """Build layers without random initialisation (weights are about to be replaced). On the meta
    device this also keeps torch from importing its decomposition machinery (seconds at start-up)."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def activation(name: str):
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported activation {name!r}")


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str, device=None):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size, device=device)
        self.fc2 = nn.Linear(intermediate_size, hidden_size, device=device)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, attend: AttentionFn, device=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(hidden_size, 3 * hidden_size, device=device)  # checkpoint: q_proj, k_proj, v_proj
        self.out_proj = nn.Linear(hidden_size, hidden_size, device=device)
        self.attend = attend

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, last_query_only: bool = False) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = self.qkv_proj(x).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # each (B, L, H, D), views into qkv
        if last_query_only:
            q = q[:, -1:]
        return self.out_proj(self.attend(q, k, v, self.scale, key_mask))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block, shared by both towers."""

    def __init__(self, config: TextConfig | VisionConfig, attend: AttentionFn, device=None):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, device=device)
        self.self_attn = SelfAttention(config.hidden_size, config.num_attention_heads, attend, device)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, device=device)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act, device)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, last_query_only: bool = False) -> torch.Tensor:
        residual = x[:, -1:] if last_query_only else x
        # Residual sums go into the freshly made branch outputs: no extra activation-sized buffers.
        h = self.self_attn(self.layer_norm1(x), key_mask, last_query_only)
        h += residual
        out = self.mlp(self.layer_norm2(h))
        out += h
        return out


class Encoder(nn.Module):
    def __init__(self, config: TextConfig | VisionConfig, attend: AttentionFn, device=None):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config, attend, device) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, last_query_only: bool = False) -> torch.Tensor:
        """`key_mask` (B, L), True for real tokens: no position attends to padding.
        `last_query_only`: the caller needs only the last position, so the final layer computes
        its attention output and MLP for that one position (keys and values still see all)."""
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x = layer(x, key_mask, last_query_only and index == last)
        return x


class TextEmbeddings(nn.Module):
    def __init__(self, config: TextConfig, device=None):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size, device=device)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size, device=device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:length]


class TextTower(nn.Module):
    """Token ids (B, L) -> text features (B, projection_size), not normalised."""

    def __init__(self, config: TextConfig, attend: AttentionFn, device=None):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config, device)
        self.encoder = Encoder(config, attend, device)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, device=device)
        self.head = nn.Linear(config.hidden_size, config.embed_dim, device=device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"text of {input_ids.shape[1]} tokens is longer than the model's "
                f"{self.config.max_position_embeddings} positions"
            )
        x = self.encoder(self.embeddings(input_ids), last_query_only=True)
        # SigLIP pools the LAST position (no argmax over eos as in CLIP): texts padded to the
        # fixed length end in the pad/eos token, which is what the model was trained to read.
        return self.head(self.final_layer_norm(x[:, -1]))


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig, device=None):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size, device=device
        )
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size, device=device)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, h, w)
        patches = patches.flatten(2).transpose(1, 2)  # (B, h*w, D), row-major patch order
        if patches.shape[1] != self.position_embedding.num_embeddings:
            raise ValueError(
                f"image of {tuple(pixel_values.shape[-2:])} pixels gives {patches.shape[1]} patches; "
                f"the model has {self.position_embedding.num_embeddings} positions"
            )
        return patches + self.position_embedding.weight


class PoolingAttention(nn.Module):
    """`torch.nn.MultiheadAttention`'s parameters (names as in the checkpoint), our backends' math."""

    def __init__(self, hidden_size: int, num_heads: int, attend: AttentionFn, device=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * hidden_size, hidden_size, device=device))  # rows: q, k, v
        self.in_proj_bias = nn.Parameter(torch.empty(3 * hidden_size, device=device))
        self.out_proj = nn.Linear(hidden_size, hidden_size, device=device)
        self.attend = attend

    def forward(self, query: torch.Tensor, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, hidden = x.shape
        w_q, w_kv = self.in_proj_weight[:hidden], self.in_proj_weight[hidden:]
        b_q, b_kv = self.in_proj_bias[:hidden], self.in_proj_bias[hidden:]
        q = F.linear(query, w_q, b_q).view(1, 1, self.num_heads, self.head_dim)
        # A real (batch, 1, H, D) copy, not a stride-0 expand: fused kernels (cuDNN SDPA,
        # flash-attn) expect dense strides, and the copy is only batch x hidden values.
        q = q.expand(batch, -1, -1, -1).contiguous()
        k, v = F.linear(x, w_kv, b_kv).view(batch, length, 2, self.num_heads, self.head_dim).unbind(2)
        return self.out_proj(self.attend(q, k, v, self.head_dim**-0.5, key_mask))


class AttentionPoolingHead(nn.Module):
    """Multi-head attention pooling (MAP): one learned probe attends over all patches."""

    def __init__(self, config: VisionConfig, attend: AttentionFn, device=None):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, config.hidden_size, device=device))
        self.attention = PoolingAttention(config.hidden_size, config.num_attention_heads, attend, device)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, device=device)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act, device)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        pooled = self.attention(self.probe, x, key_mask)  # (B, 1, D); no residual from the probe itself
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]


class VisionTower(nn.Module):
    """Pixels (B, 3, S, S) in [-1, 1] -> image features (B, hidden), not normalised."""

    embeddings_class: type[nn.Module] = VisionEmbeddings

    def __init__(self, config: VisionConfig, attend: AttentionFn, device=None):
        super().__init__()
        self.config = config
        self.embeddings = self.embeddings_class(config, device)
        self.encoder = Encoder(config, attend, device)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, device=device)
        self.head = AttentionPoolingHead(config, attend, device)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.post_layernorm(self.encoder(self.embeddings(pixel_values))))


class PatchEmbeddings(nn.Module):
    """SigLIP 2 NaFlex: flattened patches -> a linear embedding plus the learned positions,
    resized for each image's grid."""

    def __init__(self, config: VisionConfig, device=None):
        super().__init__()
        self.grid = config.position_grid
        self.patch_embedding = nn.Linear(config.patch_values, config.hidden_size, device=device)
        self.position_embedding = nn.Embedding(config.naflex_positions, config.hidden_size, device=device)

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position table resized to `grid` (rows, columns): (rows * columns, D), row-major
        like the patches. Bilinear with antialiasing, in fp32, as transformers'
        `resize_positional_embeddings` and big_vision's `jax.image.resize` do."""
        rows, columns = grid
        table = self.position_embedding.weight.float().reshape(self.grid, self.grid, -1)
        row_weights = resize_weights(self.grid, rows, table.device)
        column_weights = resize_weights(self.grid, columns, table.device)
        resized = torch.einsum("hi,wj,ijd->hwd", row_weights, column_weights, table)
        return resized.reshape(rows * columns, -1)

    def forward(self, patches: torch.Tensor, spatial_shapes: torch.Tensor) -> torch.Tensor:
        """`patches` (B, N, p*p*3), `spatial_shapes` (B, 2) with each image's (rows, columns); the
        positions past an image's patches stay zero (padding, which no one attends to)."""
        weight = self.patch_embedding.weight
        x = self.patch_embedding(patches.to(weight.dtype))
        positions = torch.zeros(x.shape, dtype=weight.dtype, device=weight.device)
        grids = [tuple(shape) for shape in spatial_shapes.tolist()]
        for grid in dict.fromkeys(grids):  # each distinct grid is resized once per batch
            resized = self.positions(grid).to(device=weight.device, dtype=weight.dtype)
            for index in (i for i, g in enumerate(grids) if g == grid):
                positions[index, : resized.shape[0]] = resized
        return x + positions


def resize_weights(source: int, target: int, device=None) -> torch.Tensor:
    """(target, source) weights of a bilinear, antialiased resize along one axis: a triangle
    filter over the source samples, widened by the factor when shrinking, each row summing to 1
    (the weights of `F.interpolate(mode="bilinear", align_corners=False, antialias=True)`).
    Written out rather than calling F.interpolate: torch 2.13's CPU kernel gets an output side
    of 1 wrong when the other side grows (a 4x4 table resized to 7x1 came out off by ~1)."""
    scale = source / target
    centers = (torch.arange(target, dtype=torch.float32, device=device) + 0.5) * scale - 0.5
    offsets = torch.arange(source, dtype=torch.float32, device=device)[None, :] - centers[:, None]
    weights = (1 - offsets.abs() / max(scale, 1.0)).clamp(min=0)
    return weights / weights.sum(dim=1, keepdim=True)


class NaFlexVisionTower(VisionTower):
    """SigLIP 2 NaFlex: patches (B, N, p*p*3) in [-1, 1], their mask (B, N) (True for real
    patches) and grids (B, 2) -> image features (B, hidden), not normalised. An image's
    features do not depend on the padding, so not on the batch it lands in."""

    embeddings_class = PatchEmbeddings

    def forward(self, patches: torch.Tensor, mask: torch.Tensor, spatial_shapes: torch.Tensor) -> torch.Tensor:
        mask = mask.to(device=patches.device, dtype=torch.bool)
        x = self.encoder(self.embeddings(patches, spatial_shapes), key_mask=mask)
        return self.head(self.post_layernorm(x), key_mask=mask)


class Siglip(nn.Module):
    """Both towers plus the learned temperature and bias. Either tower may be absent (None)
    when only the other is needed: `classify` with cached label embeddings never loads text."""

    def __init__(self, config: SiglipConfig, attend: AttentionFn = eager_attention, towers=("text", "vision"), device=None):
        """`device="meta"` builds the structure without memory or random init, to be filled by
        `load_state_dict(..., assign=True)`."""
        super().__init__()
        self.config = config
        self.text_model = TextTower(config.text, attend, device) if "text" in towers else None
        vision_tower = NaFlexVisionTower if config.vision.naflex else VisionTower
        self.vision_model = vision_tower(config.vision, attend, device) if "vision" in towers else None
        self.logit_scale = nn.Parameter(torch.zeros(1, device=device))
        self.logit_bias = nn.Parameter(torch.zeros(1, device=device))

    def set_attention(self, attend: AttentionFn) -> None:
        """Switch the attention backend of every layer in place (weights are shared)."""
        for module in self.modules():
            if isinstance(module, (SelfAttention, PoolingAttention)):
                module.attend = attend


def normalize(x: torch.Tensor) -> torch.Tensor:
    # Same as the reference (x / ||x||, no epsilon), done in fp32 whatever the model's dtype.
    x = x.float()
    return x / x.norm(p=2, dim=-1, keepdim=True)


def random_init_(model: nn.Module, seed: int = 0) -> None:
    """Fill every parameter with small random values (for benchmarks of architectures whose
    weights are not at hand; scores from such a model mean nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") and name != "logit_bias":
                param.zero_()
            elif "layer_norm" in name or "layernorm" in name:
                param.fill_(1.0)
            elif name == "logit_scale":
                param.fill_(math.log(10.0))
            elif name == "logit_bias":
                param.fill_(-10.0)
            else:
                fan_in = param.numel() // param.shape[0] if param.dim() > 1 else 1
                values = torch.randn(param.shape, generator=generator) / math.sqrt(fan_in)
                param.copy_(values.to(param.dtype))
