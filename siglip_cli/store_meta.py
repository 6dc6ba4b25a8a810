"""A store's meta, checked in one place: every key's type and range.

Every reader (`store.open_store` for all four formats, Ray shards, `--update`, `search`) gets
its meta through `validate_meta`, as `core/config.py` checks a checkpoint's config. A meta
that was edited by hand or damaged is one line naming the file, the key and the problem,
never a traceback or a score computed from nonsense (a `logit_scale` of 1e308 scores every
hit 1.0).

Keys this version does not know are kept as they are: a newer siglip may add some.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable

from .core.config import json_too_deep
from .core.errors import OutputError

FORMAT_NAME = "siglip-embeddings"
FORMAT_VERSION = 1
ROW_DTYPES = ("float32", "float16")
MODEL_DTYPES = ("fp32", "fp16", "bf16", "int8")
DECODES = ("exact", "fast")
MAX_DIM = 1 << 16  # released SigLIPs are 768..1536 wide
# exp(logit_scale) and logit_bias of released SigLIPs are ~10..120 and ~-17..-6 (the paper
# initialises them at 10 and -10); far outside these, every score would be 0 or 1.
MAX_LOGIT_SCALE = 1e4
MAX_LOGIT_BIAS = 1e4
MAX_PATCHES = 4096  # as core/config.py's MAX_PATCH_BUDGET
# How far a normalized row's length may be from 1: float16 rows carry ~3 significant digits.
NORM_TOLERANCE = {"float32": 1e-3, "float16": 1e-2}
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def damaged(path: Path, why: str) -> OutputError:
    return OutputError(f"{path}: {why}; it is damaged or not a siglip embedding file (re-create it with siglip embed)")


def parse_meta_json(path: Path, text: str | bytes) -> Any:
    """JSON text -> Python, a damaged text (or one nested 100,000 deep) as one line."""
    try:
        if json_too_deep(text):
            raise RecursionError
        return json.loads(text)
    except RecursionError:
        raise damaged(path, "its meta is nested too deep to be one") from None
    except (ValueError, TypeError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise damaged(path, f"unreadable meta ({exc})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return _is_int(value) and 0 <= value < 1 << 62


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _texts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _skipped(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, dict) and isinstance(v.get("path"), str) and isinstance(v.get("error"), str) for v in value
    )


def _digests(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) and _DIGEST.fullmatch(v) for k, v in value.items())


def _settings(value: Any) -> bool:
    return isinstance(value, dict)


# key -> (required, check, what a good value is)
_KEYS: dict[str, tuple[bool, Callable[[Any], bool], str]] = {
    "version": (False, lambda v: _is_int(v) and 1 <= v <= FORMAT_VERSION, f"a format version from 1 to {FORMAT_VERSION} (a newer siglip wrote it?)"),
    "dim": (True, lambda v: _is_int(v) and 1 <= v <= MAX_DIM, f"a width from 1 to {MAX_DIM}"),
    "dtype": (True, lambda v: v in ROW_DTYPES, " or ".join(ROW_DTYPES)),
    "count": (True, _count, "a row count"),
    "image_rows": (True, _count, "a row count"),
    "text_rows": (True, _count, "a row count"),
    "model": (False, lambda v: _text(v) and v != "", "a model name"),
    "revision": (False, lambda v: _text(v) and v != "", "a revision (text)"),
    "model_dtype": (False, lambda v: v in MODEL_DTYPES, ", ".join(MODEL_DTYPES)),
    "decode": (False, lambda v: v in DECODES, " or ".join(DECODES)),
    "normalized": (False, lambda v: isinstance(v, bool), "true or false"),
    "templates": (False, _texts, "a list of texts"),
    "max_patches": (False, lambda v: v is None or (_is_int(v) and 1 <= v <= MAX_PATCHES), f"a patch budget from 1 to {MAX_PATCHES}"),
    "logit_scale": (False, lambda v: _real(v) and 0 < v <= MAX_LOGIT_SCALE, f"exp(logit_scale), a number in (0, {MAX_LOGIT_SCALE:g}]"),
    "logit_bias": (False, lambda v: _real(v) and abs(v) <= MAX_LOGIT_BIAS, f"a number from {-MAX_LOGIT_BIAS:g} to {MAX_LOGIT_BIAS:g}"),
    "images": (False, _count, "a row count"),
    "texts": (False, _count, "a row count"),
    "skipped_count": (False, _count, "a count"),
    "skipped": (False, _skipped, "a list of {path, error}"),
    "created": (False, _text, "a time (text)"),
    "digests": (False, _digests, "{part: 'sha256:<64 hex digits>'}"),
    "shard": (False, _count, "a shard number"),
    "settings": (False, _settings, "the settings a shard was made with"),
}


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 40 else text[:37] + "..."


def validate_meta(path: Path, meta: Any) -> dict:
    """`meta` if every key has the type and range it must have; else OutputError naming the
    file and the first key that does not."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise damaged(path, "no siglip meta")
    for key, (required, check, good) in _KEYS.items():
        if key not in meta:
            if required:
                raise damaged(path, f"its meta lacks {key!r}")
            continue
        if not check(meta[key]):
            raise damaged(path, f"its meta's {key} is {_shown(meta[key])}, not {good}")
    if meta["count"] != meta["image_rows"] + meta["text_rows"]:
        raise damaged(path, "its meta's row counts disagree")
    return meta
