"""Pure math on embeddings: logits, probabilities, template ensembles, ranking."""

from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def ensemble(prompt_embeddings: np.ndarray, num_labels: int, num_templates: int) -> np.ndarray:
    """(labels*templates, D) normalised embeddings, label-major -> (labels, D): the mean over each
    label's templates, normalised again. One template returns its input unchanged."""
    if num_templates == 1:
        return prompt_embeddings
    grouped = prompt_embeddings.reshape(num_labels, num_templates, -1)
    return l2_normalize(grouped.mean(axis=1))


def logits(image_embeddings: np.ndarray, text_embeddings: np.ndarray, scale: float, bias: float) -> np.ndarray:
    """SigLIP's pairwise logits: exp(logit_scale) * cosine + logit_bias, shape (images, texts).
    `scale` is the already-exponentiated temperature."""
    return (image_embeddings @ text_embeddings.T) * np.float32(scale) + np.float32(bias)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Per-pair probabilities: each label scored on its own; they do not sum to 1."""
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    """Single-label view: a distribution over the given labels (sums to 1 per image)."""
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def rank(scores: np.ndarray, top_k: int | None = None, threshold: float | None = None) -> list[int]:
    """Label indices of one image, best first (stable for ties), cut by top-k and threshold."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    if threshold is not None:
        order = [i for i in order if scores[i] >= threshold]
    if top_k is not None:
        order = order[:top_k]
    return order
