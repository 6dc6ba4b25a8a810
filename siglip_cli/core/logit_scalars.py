"""SigLIP's two scoring scalars, the learned temperature and bias, read from a checkpoint's
`model.safetensors` without torch: searching stored rows with a cached query needs these two
numbers and nothing else of the model, and importing torch alone takes longer than the search."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ModelUnavailable

SCALAR_KEYS = ("logit_scale", "logit_bias")


def read_logit_scalars(weights: Path) -> tuple[float, float]:
    """(exp(logit_scale), logit_bias) as float32 math gives them, like the model's own scores."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="numpy") as handle:
            values = [handle.get_tensor(key) for key in SCALAR_KEYS]
    except FileNotFoundError:
        raise ModelUnavailable(f"{weights}: no such file") from None
    except Exception as exc:  # safetensors raises its own error types (bad header, missing key)
        raise ModelUnavailable(f"{weights}: cannot read {' and '.join(SCALAR_KEYS)} ({exc})") from None
    scale, bias = (np.asarray(v, dtype=np.float32).reshape(-1)[0] for v in values)
    return float(np.exp(scale)), float(bias)
