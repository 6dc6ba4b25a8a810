"""Model and preprocessing configuration, read from a Hugging Face checkpoint folder.

Official `config.json` files list only the values that differ from the defaults of
transformers' `SiglipTextConfig` / `SiglipVisionConfig` (no `layer_norm_eps`, no `hidden_act`,
often no `patch_size`), so every field below carries the reference's default.

`ARCHITECTURES` is a table of the released checkpoints' shapes so that any of them can be
built by name without downloading anything (`siglip bench` uses it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelUnavailable

SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu", "quick_gelu", "relu")


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 64  # the fixed text length the model was trained with
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    projection_size: int | None = None  # width of `text_model.head`; None means hidden_size

    @property
    def embed_dim(self) -> int:
        return self.projection_size or self.hidden_size


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        # The patch conv uses "valid" padding: 384 / 14 gives a 27x27 grid, the last 6 pixels unused.
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class PreprocessConfig:
    """What `preprocessor_config.json` says; defaults are `SiglipImageProcessor`'s."""

    height: int = 224
    width: int = 224
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class SiglipConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    text_length: int = 64  # tokens per text after padding; the model pools the last one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def head_dims(self) -> tuple[int, int]:
        """(text, vision) attention head sizes; flash kernels constrain them."""
        t, v = self.text, self.vision
        return t.hidden_size // t.num_attention_heads, v.hidden_size // v.num_attention_heads


_TEXT_KEYS = {f for f in TextConfig.__dataclass_fields__}
_VISION_KEYS = {f for f in VisionConfig.__dataclass_fields__}


def _pick(raw: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if k in keys and v is not None}


def _square(value: Any, what: str, source: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ModelUnavailable(f"{source}: non-square {what} {value} is not supported")
        value = value[0]
    return int(value)


def text_config_from_hf(raw: dict[str, Any], source: str = "config.json") -> TextConfig:
    text = TextConfig(**_pick(raw, _TEXT_KEYS))
    _check_activation(text.hidden_act, source)
    _check_heads(text.hidden_size, text.num_attention_heads, "text", source)
    return text


def vision_config_from_hf(raw: dict[str, Any], source: str = "config.json") -> VisionConfig:
    values = _pick(raw, _VISION_KEYS)
    for key in ("image_size", "patch_size"):
        if key in values:
            values[key] = _square(values[key], key, source)
    if raw.get("vision_use_head") is False:
        raise ModelUnavailable(
            f"{source}: this vision tower has no attention-pooling head (vision_use_head=false), "
            "so it cannot produce image embeddings"
        )
    vision = VisionConfig(**values)
    _check_activation(vision.hidden_act, source)
    _check_heads(vision.hidden_size, vision.num_attention_heads, "vision", source)
    return vision


def _check_activation(name: str, source: str) -> None:
    if name not in SUPPORTED_ACTIVATIONS:
        raise ModelUnavailable(f"{source}: unsupported hidden_act {name!r}")


def _check_heads(hidden: int, heads: int, tower: str, source: str) -> None:
    if hidden % heads:
        raise ModelUnavailable(
            f"{source}: {tower} hidden_size {hidden} is not divisible by num_attention_heads {heads}"
        )


def preprocess_config_from_hf(raw: dict[str, Any], image_size: int) -> PreprocessConfig:
    size = raw.get("size") or {}
    if isinstance(size, int):
        height = width = size
    else:
        height = int(size.get("height", image_size))
        width = int(size.get("width", image_size))
    mean = raw.get("image_mean", (0.5, 0.5, 0.5))
    std = raw.get("image_std", (0.5, 0.5, 0.5))
    if isinstance(mean, (int, float)):
        mean = (mean,) * 3
    if isinstance(std, (int, float)):
        std = (std,) * 3
    return PreprocessConfig(
        height=height,
        width=width,
        resample=int(raw.get("resample", 3)),
        do_resize=bool(raw.get("do_resize", True)),
        do_rescale=bool(raw.get("do_rescale", True)),
        rescale_factor=float(raw.get("rescale_factor", 1 / 255)),
        do_normalize=bool(raw.get("do_normalize", True)),
        image_mean=tuple(float(m) for m in mean),
        image_std=tuple(float(s) for s in std),
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ModelUnavailable(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise ModelUnavailable(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise ModelUnavailable(f"{path}: expected a JSON object")
    return data


def config_from_folder(folder: Path) -> SiglipConfig:
    """Read `config.json` (+ `preprocessor_config.json`, `tokenizer_config.json` if present)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelUnavailable(f"{folder}: no config.json (not a Hugging Face SigLIP checkpoint folder)")
    raw = _read_json(config_path)
    model_type = raw.get("model_type", "siglip")
    if model_type != "siglip":
        hint = " (SigLIP 2 NaFlex checkpoints are not supported; use a fixed-resolution one)" if model_type == "siglip2" else ""
        raise ModelUnavailable(f"{config_path}: model_type {model_type!r} is not 'siglip'{hint}")
    text = text_config_from_hf(raw.get("text_config") or {}, str(config_path))
    vision = vision_config_from_hf(raw.get("vision_config") or {}, str(config_path))
    if text.embed_dim != vision.hidden_size:
        raise ModelUnavailable(
            f"{config_path}: text embedding width {text.embed_dim} differs from image width {vision.hidden_size}"
        )
    pre_path = folder / "preprocessor_config.json"
    pre_raw = _read_json(pre_path) if pre_path.is_file() else {}
    preprocess = preprocess_config_from_hf(pre_raw, vision.image_size)
    text_length = text.max_position_embeddings
    tok_path = folder / "tokenizer_config.json"
    if tok_path.is_file():
        max_len = _read_json(tok_path).get("model_max_length")
        # Some tokenizer configs carry a huge sentinel for "no limit"; the model's table wins then.
        if isinstance(max_len, int) and 0 < max_len < text_length:
            text_length = max_len
    return SiglipConfig(text=text, vision=vision, preprocess=preprocess, text_length=text_length)


# --------------------------------------------------------------------------------------------
# Built-in table of released architectures (shapes only; weights come from the hub).
# Sources: the checkpoints' config.json files and transformers' conversion scripts
# (convert_siglip_to_hf.py, convert_siglip2_to_hf.py); see docs/architectures.md.

_BASE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
_LARGE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16)
_GIANT = dict(hidden_size=1536, intermediate_size=6144, num_hidden_layers=40, num_attention_heads=16)
_BILINEAR = 2  # SigLIP 2 checkpoints resize bilinearly (preprocessor_config.json "resample": 2)


def _arch(
    tower: dict,
    image_size: int,
    patch_size: int,
    vocab_size: int = 32000,
    text_tower: dict | None = None,
    text_positions: int = 64,
    projection_size: int | None = None,
    resample: int = 3,
) -> SiglipConfig:
    text = TextConfig(
        vocab_size=vocab_size,
        max_position_embeddings=text_positions,
        projection_size=projection_size,
        **(text_tower or tower),
    )
    vision = VisionConfig(image_size=image_size, patch_size=patch_size, **tower)
    return SiglipConfig(
        text=text,
        vision=vision,
        preprocess=PreprocessConfig(height=image_size, width=image_size, resample=resample),
        text_length=text_positions,
    )


ARCHITECTURES: dict[str, SiglipConfig] = {
    "google/siglip-base-patch16-224": _arch(_BASE, 224, 16),
    "google/siglip-base-patch16-256": _arch(_BASE, 256, 16),
    "google/siglip-base-patch16-384": _arch(_BASE, 384, 16),
    "google/siglip-base-patch16-512": _arch(_BASE, 512, 16),
    "google/siglip-base-patch16-256-multilingual": _arch(_BASE, 256, 16, vocab_size=250000),
    "google/siglip-large-patch16-256": _arch(_LARGE, 256, 16),
    "google/siglip-large-patch16-384": _arch(_LARGE, 384, 16),
    "google/siglip-so400m-patch14-384": _arch(_SO400M, 384, 14),
    "google/siglip-so400m-patch14-224": _arch(_SO400M, 224, 14, text_positions=16),
    "google/siglip-so400m-patch16-256-i18n": _arch(_SO400M, 256, 16, vocab_size=250000),
}

_SIGLIP2 = {
    "base-patch16-224": (_BASE, 224, 16),
    "base-patch16-256": (_BASE, 256, 16),
    "base-patch16-384": (_BASE, 384, 16),
    "base-patch16-512": (_BASE, 512, 16),
    "base-patch32-256": (_BASE, 256, 32),
    "large-patch16-256": (_LARGE, 256, 16),
    "large-patch16-384": (_LARGE, 384, 16),
    "large-patch16-512": (_LARGE, 512, 16),
    "so400m-patch14-224": (_SO400M, 224, 14),
    "so400m-patch14-384": (_SO400M, 384, 14),
    "so400m-patch16-256": (_SO400M, 256, 16),
    "so400m-patch16-384": (_SO400M, 384, 16),
    "so400m-patch16-512": (_SO400M, 512, 16),
}
for _suffix, (_tower, _size, _patch) in _SIGLIP2.items():
    ARCHITECTURES[f"google/siglip2-{_suffix}"] = _arch(
        _tower, _size, _patch, vocab_size=256000, resample=_BILINEAR
    )
# The giant vision tower is paired with an so400m-sized text tower projected to its width.
for _size in (256, 384):
    ARCHITECTURES[f"google/siglip2-giant-opt-patch16-{_size}"] = _arch(
        _GIANT, _size, 16, vocab_size=256000, text_tower=_SO400M, projection_size=1536, resample=_BILINEAR
    )


def architecture(name: str) -> SiglipConfig:
    """The built-in config for a released checkpoint; accepts the id with or without `google/`."""
    key = name if "/" in name else f"google/{name}"
    try:
        return ARCHITECTURES[key]
    except KeyError:
        known = ", ".join(sorted(k.split("/", 1)[1] for k in ARCHITECTURES))
        raise ModelUnavailable(f"unknown architecture {name!r}; known: {known}") from None

