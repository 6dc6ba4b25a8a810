"""Few-shot classification from example images: a training-free Tip-Adapter cache on top of
SigLIP's zero-shot logits, its weights chosen by leave-one-out on the examples themselves.

Method (Zhang et al., "Tip-Adapter: Training-free Adaption of CLIP for Few-shot
Classification", ECCV 2022, arXiv:2207.09519). The examples' normalised image embeddings are a
cache of keys K (N, D) with one-hot labels L (N, C). For an image embedding x, each label's
logit is SigLIP's own plus an affinity-weighted vote of the examples:

    logit_c(x) = t * cos(x, text_c) + b  +  alpha * s * mean_{k in c} exp(-beta * (1 - cos(x, K_k)))

`t, b` are the model's logit scale and bias, so with alpha = 0 this is exactly zero-shot SigLIP;
the score is sigmoid(logit) as always (softmax with --softmax). Two changes from the paper,
both because SigLIP is not CLIP: (1) `s` is the spread of the text logits between labels (their
standard deviation, averaged over the examples), so alpha is in units of how strongly the text
already separates the labels, instead of CLIP's fixed 100x logit scale; (2) the vote is a mean
per label instead of a sum, so a label with more examples does not win by count.

Choosing alpha and beta. The paper tunes them on a validation set; a user with a few examples
has none, so each example is classified with itself left out of the cache (leave-one-out) for
every (alpha, beta) on a small grid, and the pair with the best LOO accuracy wins (ties: the
better mean log-likelihood of the right label, then the smaller alpha). The text-only accuracy
(alpha = 0) is in the grid, so examples are used only when they help on held-out examples.

Published gains (ImageNet, CLIP ResNet-50, 16 shots per class, training-free): zero-shot 60.3%
-> Tip-Adapter 62.0% top-1 (and 65.5% with fine-tuned keys, Tip-Adapter-F); the gains are much
larger on datasets far from web captions (e.g. EuroSAT and FGVC-Aircraft in the paper's
11-dataset table). No SigLIP numbers are published for this recipe; ours are in docs/actions.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .core.errors import UsageError
from .core.images import IMAGE_SUFFIXES

ALPHAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
BETAS = (1.0, 3.0, 5.5, 10.0, 20.0, 50.0)
MIN_PER_LABEL = 2  # leave-one-out needs one left in


@dataclass
class ExampleSet:
    """The examples folder: label names (sub-folder names, in order) and (label index, path) pairs."""

    folder: Path
    labels: list[str]
    files: list[tuple[int, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # files directly in the folder, not in a label


def read_examples(folder: Path, labels: Sequence[str] | None = None) -> ExampleSet:
    """One sub-folder per label with its example images (sub-sub-folders are not walked). With
    `labels`, every sub-folder must be one of them (labels without examples use text alone);
    without, the sub-folders are the labels. A label folder with fewer than 2 images, or none
    at all, is refused: leave-one-out could not test it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--examples {folder}: {'no such folder' if not folder.exists() else 'is not a folder'}")
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise UsageError(f"--examples {folder}: cannot list it ({exc.strerror or exc})") from None
    sub_folders = [e for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
    ignored = [e.path for e in entries if not e.name.startswith(".") and not e.is_dir(follow_symlinks=False)]
    if not sub_folders:
        raise UsageError(f"--examples {folder}: holds no label folders (one sub-folder per label, with example images)")
    if labels is None:
        names = [e.name for e in sub_folders]
    else:
        names = list(labels)
        for entry in sub_folders:
            if entry.name not in names:
                raise UsageError(f"--examples {folder}: folder {entry.name!r} is not among the labels; add it to --labels or remove it")
    if len(names) < 2:
        raise UsageError(f"--examples {folder}: needs at least 2 labels to choose between")
    examples = ExampleSet(folder, names, ignored=ignored)
    for entry in sub_folders:
        try:
            images = sorted(f.path for f in os.scandir(entry.path)
                            if not f.name.startswith(".") and f.is_file() and os.path.splitext(f.name)[1].lower() in IMAGE_SUFFIXES)
        except OSError as exc:
            raise UsageError(f"--examples {entry.path}: cannot list it ({exc.strerror or exc})") from None
        if len(images) < MIN_PER_LABEL:
            what = "no images" if not images else "only 1 image"
            raise UsageError(f"--examples {entry.path}: {what}; leave-one-out needs at least {MIN_PER_LABEL} per label")
        index = names.index(entry.name)
        examples.files += [(index, path) for path in images]
    return examples


@dataclass
class Fit:
    alpha: float  # in units of `spread`
    beta: float
    spread: float
    loo_accuracy: float
    text_accuracy: float  # leave-one-out is moot without the cache: plain zero-shot on the examples
    count: int


class TipAdapter:
    """Zero-shot logits plus a cache of example embeddings (see the module docstring)."""

    def __init__(self, text: np.ndarray, keys: np.ndarray, key_labels: np.ndarray, scale: float, bias: float):
        self.text = np.asarray(text, np.float32)
        self.keys = np.asarray(keys, np.float32)
        self.key_labels = np.asarray(key_labels, np.int64)
        self.scale, self.bias = float(scale), float(bias)
        self.onehot = np.eye(len(self.text), dtype=np.float64)[self.key_labels]  # (N, C)
        self.counts = self.onehot.sum(0)  # examples per label
        self.fit: Fit | None = None

    def text_logits(self, images: np.ndarray) -> np.ndarray:
        return self.scale * (np.asarray(images, np.float32) @ self.text.T).astype(np.float64) + self.bias

    def _votes(self, cosines: np.ndarray, beta: float, leave_out: bool) -> np.ndarray:
        affinity = np.exp(-beta * (1.0 - cosines.astype(np.float64)))
        counts = np.broadcast_to(self.counts, (len(cosines), len(self.counts))).copy()
        if leave_out:  # example i votes for nobody, and its label has one example fewer
            np.fill_diagonal(affinity, 0.0)
            counts -= self.onehot
        votes = affinity @ self.onehot
        return np.divide(votes, counts, out=np.zeros_like(votes), where=counts > 0)

    def choose(self, alphas: Sequence[float] = ALPHAS, betas: Sequence[float] = BETAS) -> Fit:
        """alpha and beta by leave-one-out accuracy on the examples (module docstring)."""
        text = self.text_logits(self.keys)
        spread = float(np.mean(np.std(text, axis=1))) or 1.0
        cosines = self.keys @ self.keys.T
        truth = self.key_labels
        best = None
        for beta in betas:
            votes = self._votes(cosines, beta, leave_out=True)
            for alpha in alphas:
                logits = text + alpha * spread * votes
                accuracy = float(np.mean(np.argmax(logits, 1) == truth))
                shifted = logits - logits.max(1, keepdims=True)
                log_likelihood = float(np.mean(shifted[np.arange(len(truth)), truth] - np.log(np.exp(shifted).sum(1))))
                key = (accuracy, log_likelihood, -alpha)
                if best is None or key > best[0]:
                    best = (key, alpha, beta, accuracy)
        text_accuracy = float(np.mean(np.argmax(text, 1) == truth))
        _, alpha, beta, accuracy = best
        if alpha == 0.0:
            beta = betas[0]
        self.fit = Fit(alpha, beta, spread, accuracy, text_accuracy, len(truth))
        return self.fit

    def logits(self, images: np.ndarray) -> np.ndarray:
        """(M, C) logits for normalised image embeddings, with the chosen weights."""
        fit = self.fit or self.choose()
        logits = self.text_logits(images)
        if fit.alpha:
            logits = logits + fit.alpha * fit.spread * self._votes(np.asarray(images, np.float32) @ self.keys.T, fit.beta, leave_out=False)
        return logits

    def describe(self) -> str:
        fit = self.fit or self.choose()
        weight = "text alone (the examples did not help on held-out examples)" if fit.alpha == 0 else (
            f"Tip-Adapter weight alpha={fit.alpha:g} (x {fit.spread:.3g}, the text logits' spread), beta={fit.beta:g}")
        return (f"examples: {fit.count} images of {len(self.text)} labels; {weight}; "
                f"leave-one-out accuracy {fit.loo_accuracy:.1%} (text alone: {fit.text_accuracy:.1%})")


def embed_examples(engine, examples: ExampleSet, report) -> tuple[np.ndarray, np.ndarray]:
    """(keys (N, D) normalised, their label indices (N,)) for the examples, from the image cache
    where possible. An image that fails to decode is reported (one line) and left out; a label
    left with fewer than 2 images is then refused."""
    import hashlib

    from .cache import ImageCache
    from .sources import Source

    cache = None
    if engine.text_cache is not None:
        variant = f"{engine.device.type}-{engine.precision}-{engine.decode}-{getattr(engine.config.preprocess, 'max_num_patches', None) or 0}"
        cache = ImageCache(engine.text_cache.root, engine.resolved.revision, variant, engine.embed_dim)
    vectors: dict[int, np.ndarray] = {}
    digests: dict[int, str] = {}
    todo: list[Source] = []
    for position, (_, path) in enumerate(examples.files):
        try:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            digests[position] = digest.hexdigest()
        except OSError as exc:
            report(f"{path}: cannot read ({exc.strerror or exc}); example left out")
            continue
        cached = cache.get(digests[position]) if cache is not None else None
        if cached is not None:
            vectors[position] = cached
        else:
            todo.append(Source(path, path))
    if todo:
        by_path = {path: position for position, (_, path) in enumerate(examples.files)}
        for item in engine.iter_image_features(todo):
            position = by_path[item.name]
            if item.error is not None:
                report(f"{item.error}; example left out")
                continue
            vectors[position] = np.asarray(item.vector, np.float32)
            if cache is not None:
                cache.put(digests[position], vectors[position])
    kept = sorted(vectors)
    labels = np.array([examples.files[p][0] for p in kept], np.int64)
    for index, name in enumerate(examples.labels):
        have = int(np.sum(labels == index))
        if 0 < have < MIN_PER_LABEL or (have == 0 and any(i == index for i, _ in examples.files)):
            raise UsageError(f"--examples {examples.folder / name}: only {have} readable image(s) left; "
                             f"leave-one-out needs at least {MIN_PER_LABEL} per label")
    return np.stack([vectors[p] for p in kept]), labels
