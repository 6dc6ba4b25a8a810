"""Model and preprocessing configuration, read from a Hugging Face checkpoint folder.

Official `config.json` files list only the values that differ from the defaults of
transformers' `SiglipTextConfig` / `SiglipVisionConfig` (no `layer_norm_eps`, no `hidden_act`,
often no `patch_size`), so every field below carries the reference's default.

Two vision towers exist. SigLIP and fixed-resolution SigLIP 2 (`model_type: siglip`) see a
square image cut into a fixed grid of patches. SigLIP 2 NaFlex (`model_type: siglip2`) sees
each image at its own aspect ratio: as many patches as fit a budget (`max_num_patches`), a
linear patch embedding and a learned position table resized to each image's grid.

Every value read from `config.json` and `preprocessor_config.json` is checked here, in one
place, for its type and range, and the preprocessing is checked against the model (a
`size` the model was not built for, a patch size that differs): a bad file is one line naming
the file, the key and the problem, never a traceback or a run out of memory.

`ARCHITECTURES` is a table of the released checkpoints' shapes so that any of them can be
built by name without downloading anything (`siglip bench` uses it).
"""

from __future__ import annotations

import json
import re
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ModelUnavailable, UsageError

SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu", "quick_gelu", "relu")
# NaFlex patch budgets above this are refused: attention cost grows with the square of the
# patch count (4096 patches is 16x the released default of 256 and ~0.8 GB of attention weights
# per image and layer in eager fp32), and a hostile `max_num_patches` must not exhaust memory.
MAX_PATCH_BUDGET = 4096
PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


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
    image_size: int = 224  # fixed resolution only
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    naflex: bool = False  # SigLIP 2 NaFlex: variable patch grids (model_type siglip2)
    naflex_positions: int = 256  # NaFlex: learned positions, a square grid (config.json's num_patches)

    @property
    def num_patches(self) -> int:
        """Fixed resolution: patches per image, one learned position each. The patch conv uses
        "valid" padding: 384 / 14 gives a 27x27 grid, the last 6 pixels unused."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def position_grid(self) -> int:
        """NaFlex: the side of the square table of learned positions (16 for the released models)."""
        return math.isqrt(self.naflex_positions)

    @property
    def patch_values(self) -> int:
        """Numbers in one flattened patch (NaFlex input): patch_size x patch_size x channels."""
        return self.patch_size * self.patch_size * self.num_channels


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
    max_num_patches: int = 256  # NaFlex: the patch budget per image (`--max-patches`)


@dataclass(frozen=True)
class SiglipConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    text_length: int = 64  # tokens per text after padding; the model pools the last one
    model_type: str = "siglip"  # config.json's: siglip (fixed resolution) or siglip2 (NaFlex)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def head_dims(self) -> tuple[int, int]:
        """(text, vision) attention head sizes; flash kernels constrain them."""
        t, v = self.text, self.vision
        return t.hidden_size // t.num_attention_heads, v.hidden_size // v.num_attention_heads

    def hf_sub_configs(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(text_config, vision_config) under transformers' names, for building its
        SiglipModel / Siglip2Model with the same shapes (benchmarks, `bench --compare`)."""
        t, v = self.text, self.vision
        text = {k: getattr(t, k) for k in TextConfig.__dataclass_fields__ if k != "projection_size"}
        text["projection_size"] = t.embed_dim
        vision = {k: getattr(v, k) for k in VisionConfig.__dataclass_fields__ if k not in ("naflex", "naflex_positions")}
        if v.naflex:
            del vision["image_size"]
            vision["num_patches"] = v.naflex_positions
        return text, vision

    def with_max_patches(self, max_patches: int | None) -> "SiglipConfig":
        """The same model with another NaFlex patch budget (None keeps the checkpoint's)."""
        if max_patches is None:
            return self
        if not self.vision.naflex:
            raise UsageError("max_patches: only SigLIP 2 NaFlex checkpoints take a patch budget")
        if isinstance(max_patches, bool) or not isinstance(max_patches, int) or not 1 <= max_patches <= MAX_PATCH_BUDGET:
            raise UsageError(f"max_patches must be a whole number from 1 to {MAX_PATCH_BUDGET}, not {max_patches!r:.40}")
        return replace(self, preprocess=replace(self.preprocess, max_num_patches=max_patches))


# --------------------------------------------------------------------------------------------
# Reading and checking the JSON files. Every value passes through `_checked`.

def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _whole(value: Any, key: str, source: str, minimum: int = 1) -> int:
    """A whole number >= minimum (JSON `true` is not a number; 768.0 is accepted as 768)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelUnavailable(f"{source}: {key} must be a whole number, not {_json_type(value)} ({value!r:.40})")
    if value < minimum:
        raise ModelUnavailable(f"{source}: {key} must be at least {minimum}, not {value}")
    return value


def _number(value: Any, key: str, source: str, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ModelUnavailable(f"{source}: {key} must be a finite number, not {_json_type(value)} ({value!r:.40})")
    if positive and value <= 0:
        raise ModelUnavailable(f"{source}: {key} must be greater than 0, not {value}")
    return float(value)


def _flag(value: Any, key: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise ModelUnavailable(f"{source}: {key} must be true or false, not {_json_type(value)} ({value!r:.40})")
    return value


def _square(value: Any, key: str, source: str) -> int:
    """A size given as one number or as [n, n]."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ModelUnavailable(f"{source}: non-square {key} {value} is not supported")
        value = value[0]
    return _whole(value, key, source)


def _checked(cls, raw: dict[str, Any], section: str, source: str) -> dict[str, Any]:
    """The fields of dataclass `cls` that `raw` sets, each checked for the type its default
    has: whole numbers at least 1, positive numbers, booleans, known activation names."""
    values: dict[str, Any] = {}
    for name, spec in cls.__dataclass_fields__.items():
        value = raw.get(name)
        if value is None:
            continue
        key = f"{section}.{name}"
        default = spec.default
        if name in ("image_size", "patch_size"):
            values[name] = _square(value, key, source)
        elif name == "hidden_act":
            if value not in SUPPORTED_ACTIVATIONS:
                raise ModelUnavailable(f"{source}: unsupported {key} {value!r:.40} (supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
            values[name] = value
        elif isinstance(default, bool):
            values[name] = _flag(value, key, source)
        elif isinstance(default, float):
            values[name] = _number(value, key, source)
        else:  # whole-number fields (projection_size's default is None)
            values[name] = _whole(value, key, source)
    return values


def _section(raw: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ModelUnavailable(f"{source}: {key} must be a JSON object, not {_json_type(value)}")
    return value


def _check_heads(hidden: int, heads: int, tower: str, source: str) -> None:
    if hidden % heads:
        raise ModelUnavailable(
            f"{source}: {tower} hidden_size {hidden} is not divisible by num_attention_heads {heads}"
        )


def check_patch_budget(value: Any, key: str, source: str) -> int:
    budget = _whole(value, key, source)
    if budget > MAX_PATCH_BUDGET:
        raise ModelUnavailable(
            f"{source}: {key} {budget} is over the limit of {MAX_PATCH_BUDGET} patches per image "
            "(attention cost grows with the square of the patch count)"
        )
    return budget


def text_config_from_hf(raw: dict[str, Any], source: str = "config.json") -> TextConfig:
    text = TextConfig(**_checked(TextConfig, raw, "text_config", source))
    _check_heads(text.hidden_size, text.num_attention_heads, "text", source)
    return text


def vision_config_from_hf(raw: dict[str, Any], source: str = "config.json", naflex: bool = False) -> VisionConfig:
    if raw.get("vision_use_head") is False:
        raise ModelUnavailable(
            f"{source}: this vision tower has no attention-pooling head (vision_use_head=false), "
            "so it cannot produce image embeddings"
        )
    values = _checked(VisionConfig, {k: v for k, v in raw.items() if k not in ("naflex", "naflex_positions")}, "vision_config", source)
    if naflex:
        # NaFlex names its position table `num_patches`; the table is a square grid.
        positions = _whole(raw.get("num_patches", VisionConfig.naflex_positions), "vision_config.num_patches", source)
        if math.isqrt(positions) ** 2 != positions:
            raise ModelUnavailable(f"{source}: vision_config.num_patches {positions} is not a square grid of positions")
        values.update(naflex=True, naflex_positions=positions)
    vision = VisionConfig(**values)
    if vision.num_channels != 3:
        raise ModelUnavailable(f"{source}: vision_config.num_channels {vision.num_channels} is not supported (images are RGB)")
    if not naflex and vision.patch_size > vision.image_size:
        raise ModelUnavailable(
            f"{source}: vision_config.patch_size {vision.patch_size} is larger than image_size {vision.image_size}"
        )
    _check_heads(vision.hidden_size, vision.num_attention_heads, "vision", source)
    return vision


def _channel_values(value: Any, key: str, source: str, nonzero: bool) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(values, (list, tuple)) or len(values) != 3:
        raise ModelUnavailable(f"{source}: {key} must be a number or a list of 3 numbers, not {_json_type(value)} ({value!r:.40})")
    numbers = tuple(_number(v, key, source, positive=False) for v in values)
    if nonzero and 0 in numbers:
        raise ModelUnavailable(f"{source}: {key} {list(numbers)} has a 0 (pixels would be divided by zero)")
    return numbers  # type: ignore[return-value]


def _image_size(raw: dict[str, Any], vision: VisionConfig, source: str) -> tuple[int, int]:
    """Fixed resolution: the processor's output size, which must be the model's own: the
    position table has one entry per patch of that square (and a huge `size` would only be a
    way to run out of memory)."""
    size = raw.get("size")
    if size is None:
        return vision.image_size, vision.image_size
    if isinstance(size, dict):
        unknown = sorted(set(size) - {"height", "width"})
        if unknown:
            raise ModelUnavailable(f"{source}: size.{unknown[0]} is not supported (SigLIP resizes to height x width)")
        height = _whole(size.get("height", vision.image_size), "size.height", source)
        width = _whole(size.get("width", vision.image_size), "size.width", source)
    else:
        height = width = _whole(size, "size", source)
    if (height, width) != (vision.image_size, vision.image_size):
        raise ModelUnavailable(
            f"{source}: size {width}x{height} does not match the model's image_size "
            f"{vision.image_size} in config.json"
        )
    return height, width


def preprocess_config_from_hf(raw: dict[str, Any], vision: VisionConfig, source: str = "preprocessor_config.json") -> PreprocessConfig:
    defaults = PreprocessConfig()
    resample = _whole(raw.get("resample", 2 if vision.naflex else defaults.resample), "resample", source, minimum=0)
    if resample not in PIL_FILTERS:
        raise ModelUnavailable(f"{source}: resample {resample} is not a PIL filter (0-5)")
    values: dict[str, Any] = dict(
        resample=resample,
        do_resize=_flag(raw.get("do_resize", True), "do_resize", source),
        do_rescale=_flag(raw.get("do_rescale", True), "do_rescale", source),
        rescale_factor=_number(raw.get("rescale_factor", defaults.rescale_factor), "rescale_factor", source),
        do_normalize=_flag(raw.get("do_normalize", True), "do_normalize", source),
        image_mean=_channel_values(raw.get("image_mean", defaults.image_mean), "image_mean", source, nonzero=False),
        image_std=_channel_values(raw.get("image_std", defaults.image_std), "image_std", source, nonzero=True),
    )
    if vision.naflex:
        if not values["do_resize"]:
            raise ModelUnavailable(f"{source}: do_resize false is not supported for NaFlex (images are resized to fit the patch budget)")
        patch = _whole(raw.get("patch_size", vision.patch_size), "patch_size", source)
        if patch != vision.patch_size:
            raise ModelUnavailable(f"{source}: patch_size {patch} does not match the model's patch_size {vision.patch_size} in config.json")
        values["max_num_patches"] = check_patch_budget(raw.get("max_num_patches", defaults.max_num_patches), "max_num_patches", source)
        values["height"] = values["width"] = 0  # no fixed size: each image gets its own grid
    else:
        values["height"], values["width"] = _image_size(raw, vision, source)
    return PreprocessConfig(**values)


MAX_JSON_DEPTH = 200
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def json_too_deep(text: str | bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON text nests arrays or objects deeper than `limit`, found without parsing it.
    json.loads would find out by a RecursionError, and on CPython 3.11 a RecursionError raised
    in C code leaves the interpreter's AST recursion counter wrong, so that a later ast.parse
    or compile() in the same process fails (gh-106905): a long-lived process (siglip serve, the
    test suite) must never raise one."""
    import numpy as np

    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    codes = np.frombuffer(_JSON_STRING.sub(b"", data), dtype=np.uint8)
    steps = (np.isin(codes, (0x5B, 0x7B)).astype(np.int32) - np.isin(codes, (0x5D, 0x7D)).astype(np.int32))
    return bool(steps.size) and int(np.cumsum(steps).max()) > limit


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object, or ModelUnavailable naming the file and the problem."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if json_too_deep(raw):
            raise RecursionError
        data = json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelUnavailable(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError as exc:
        raise ModelUnavailable(f"{path}: not UTF-8 text (byte {exc.start}); a JSON file must be UTF-8") from None
    except RecursionError:
        raise ModelUnavailable(f"{path}: JSON nested too deeply") from None
    except OSError as exc:
        raise ModelUnavailable(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise ModelUnavailable(f"{path}: expected a JSON object, not {_json_type(data)}")
    return data


SUPPORTED_MODEL_TYPES = ("siglip", "siglip2")


def read_model_type(folder: Path) -> str:
    """config.json's model_type: siglip (SigLIP and fixed-resolution SigLIP 2) or siglip2 (NaFlex)."""
    config_path = folder / "config.json"
    model_type = read_json_object(config_path).get("model_type", "siglip")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelUnavailable(f"{config_path}: model_type {model_type!r:.40} is not 'siglip' or 'siglip2'")
    return model_type


def config_from_folder(folder: Path) -> SiglipConfig:
    """Read `config.json` (+ `preprocessor_config.json`, `tokenizer_config.json` if present)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelUnavailable(f"{folder}: no config.json (not a Hugging Face SigLIP checkpoint folder)")
    raw = read_json_object(config_path)
    model_type = read_model_type(folder)
    source = str(config_path)
    text = text_config_from_hf(_section(raw, "text_config", source), source)
    vision = vision_config_from_hf(_section(raw, "vision_config", source), source, naflex=model_type == "siglip2")
    if text.embed_dim != vision.hidden_size:
        raise ModelUnavailable(
            f"{config_path}: text embedding width {text.embed_dim} differs from image width {vision.hidden_size}"
        )
    pre_path = folder / "preprocessor_config.json"
    pre_raw = read_json_object(pre_path) if pre_path.is_file() else {}
    preprocess = preprocess_config_from_hf(pre_raw, vision, str(pre_path))
    text_length = text.max_position_embeddings
    tok_path = folder / "tokenizer_config.json"
    if tok_path.is_file():
        max_len = read_json_object(tok_path).get("model_max_length")
        # Some tokenizer configs carry a huge sentinel for "no limit"; the model's table wins then.
        if isinstance(max_len, int) and not isinstance(max_len, bool) and 0 < max_len < text_length:
            text_length = max_len
    return SiglipConfig(text=text, vision=vision, preprocess=preprocess, text_length=text_length, model_type=model_type)


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
    naflex: bool = False,
) -> SiglipConfig:
    text = TextConfig(
        vocab_size=vocab_size,
        max_position_embeddings=text_positions,
        projection_size=projection_size,
        **(text_tower or tower),
    )
    if naflex:  # image_size is unused: every image gets its own grid within the patch budget
        vision = VisionConfig(patch_size=patch_size, naflex=True, naflex_positions=256, **tower)
        preprocess = PreprocessConfig(height=0, width=0, resample=resample, max_num_patches=256)
    else:
        vision = VisionConfig(image_size=image_size, patch_size=patch_size, **tower)
        preprocess = PreprocessConfig(height=image_size, width=image_size, resample=resample)
    return SiglipConfig(
        text=text,
        vision=vision,
        preprocess=preprocess,
        text_length=text_positions,
        model_type="siglip2" if naflex else "siglip",
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
# NaFlex: a 16x16 table of learned positions, resized to each image's grid; 256 patches by default.
for _suffix, _tower in (("base", _BASE), ("so400m", _SO400M)):
    ARCHITECTURES[f"google/siglip2-{_suffix}-patch16-naflex"] = _arch(
        _tower, 0, 16, vocab_size=256000, resample=_BILINEAR, naflex=True
    )


def architecture(name: str) -> SiglipConfig:
    """The built-in config for a released checkpoint; accepts the id with or without `google/`."""
    key = name if "/" in name else f"google/{name}"
    try:
        return ARCHITECTURES[key]
    except KeyError:
        known = ", ".join(sorted(k.split("/", 1)[1] for k in ARCHITECTURES))
        raise ModelUnavailable(f"unknown architecture {name!r}; known: {known}") from None

