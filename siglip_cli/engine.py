"""The handle behind `siglip_cli.load()`: wires config, weights, tokenizer, images and scoring.

Towers load on first use: scoring images against cached label embeddings never reads the text
tower's weights or the tokenizer. Images are decoded by a pool of threads (Pillow releases the
GIL while decoding and resizing) a few batches ahead of the model, travel to the device as
uint8 and are normalised there. On CUDA one batch is in flight while the previous one's
results come back. Per-image failures come back as results with an error, never as exceptions
that would lose the rest of a batch.
"""

from __future__ import annotations

import collections
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from . import attention as attention_backends
from .cache import TextCache, default_cache_dir
from .config import SiglipConfig, config_from_folder
from .errors import InputError, SiglipError, UsageError
from .hub import DEFAULT_MODEL, ResolvedModel, resolve_model
from .images import ImageOptions, describe, load_pixels, normalization_table, pixels_to_model_input
from .model import Siglip, normalize
from .prompts import DEFAULT_TEMPLATE, fill, resolve_templates
from .results import Embedded, ImageScores, LabelScore
from .runtime import dtype_name, resolve_attention, resolve_device, resolve_dtype
from .scoring import ensemble, l2_normalize, logits, rank, sigmoid, softmax
from .tokenizer import Tokenizer
from .weights import load_model

DEFAULT_BATCH = {"cuda": 128, "mps": 32, "cpu": 16}
TEXT_BATCH = {"cuda": 512, "mps": 128, "cpu": 64}


def default_workers(device: torch.device) -> int:
    """Decode threads. On a CPU the model needs every core and decoding is a few per cent of the
    work, so one thread keeps a batch ready without fighting the matrix multiplies; a GPU eats
    images faster than one core decodes them, so it gets up to 16."""
    cores = os.cpu_count() or 1
    return 1 if device.type == "cpu" else max(1, min(16, cores))


class Engine:
    def __init__(
        self,
        resolved: ResolvedModel,
        config: SiglipConfig,
        device: torch.device,
        dtype: torch.dtype,
        attn: str,
        cache_dir: Path | None = None,
        use_cache: bool = True,
        image_options: ImageOptions = ImageOptions(),
        batch_size: int | None = None,
        workers: int | None = None,
    ):
        self.resolved = resolved
        self.config = config
        self.device = device
        self.dtype = dtype
        self.attn = attn
        self.image_options = image_options
        self.batch_size = batch_size or DEFAULT_BATCH.get(device.type, 16)
        self.workers = default_workers(device) if workers is None else workers
        self.text_cache = (
            TextCache(cache_dir or default_cache_dir(), resolved.revision, f"{device.type}-{dtype_name(dtype)}")
            if use_cache
            else None
        )
        self._network: Siglip | None = None
        self._tokenizer: Tokenizer | None = None
        self._table: torch.Tensor | None = None
        self._scale_bias: tuple[float, float] | None = None

    # ------------------------------------------------------------------ loading
    @property
    def weights_path(self) -> Path:
        return self.resolved.folder / "model.safetensors"

    def _attend(self):
        return attention_backends.resolve(self.attn, self.device, self.dtype, self.head_dims)

    @property
    def head_dims(self) -> tuple[int, ...]:
        return self.config.head_dims

    def _tower(self, name: str) -> torch.nn.Module:
        network = self._network
        if network is None or getattr(network, f"{name}_model") is None:
            loaded = load_model(self.weights_path, self.config, (name,), self._attend(), self.device, self.dtype)
            if network is None:
                self._network = network = loaded
            else:
                setattr(network, f"{name}_model", getattr(loaded, f"{name}_model"))
        return getattr(network, f"{name}_model")

    @property
    def vision_model(self) -> torch.nn.Module:
        return self._tower("vision")

    @property
    def text_model(self) -> torch.nn.Module:
        return self._tower("text")

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_folder(self.resolved.folder, self.config.text_length)
        return self._tokenizer

    def set_attention(self, attn: str) -> None:
        """Switch the attention backend of the loaded towers (and of any loaded later)."""
        fn = attention_backends.resolve(attn, self.device, self.dtype, self.head_dims)
        self.attn = attn
        if self._network is not None:
            self._network.set_attention(fn)

    def _scale_and_bias(self) -> tuple[float, float]:
        # Read once: on CUDA every read waits for the device, which would stall the pipeline.
        if self._scale_bias is None:
            if self._network is None:
                self._tower("vision")
            network = self._network
            self._scale_bias = (
                float(network.logit_scale.detach().float().exp().cpu()),
                float(network.logit_bias.detach().float().cpu()),
            )
        return self._scale_bias

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale): the learned temperature, already exponentiated."""
        return self._scale_and_bias()[0]

    @property
    def logit_bias(self) -> float:
        return self._scale_and_bias()[1]

    @property
    def embed_dim(self) -> int:
        return self.config.vision.hidden_size

    # ------------------------------------------------------------------ texts
    @torch.inference_mode()
    def _compute_text_features(self, texts: Sequence[str]) -> np.ndarray:
        chunk = TEXT_BATCH.get(self.device.type, 64)
        out = []
        for start in range(0, len(texts), chunk):
            ids = torch.tensor(self.tokenizer(texts[start : start + chunk]), dtype=torch.long, device=self.device)
            out.append(self.text_model(ids).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.config.text.embed_dim), np.float32)

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        """Un-normalised text-tower outputs (N, D) float32 for already-templated texts, served
        from the on-disk cache where possible."""
        texts = list(texts)
        result: list[np.ndarray | None] = [None] * len(texts)
        if self.text_cache is not None:
            result = [self.text_cache.get(t) for t in texts]
        todo = list(dict.fromkeys(t for t, r in zip(texts, result) if r is None))
        if todo:
            computed = dict(zip(todo, self._compute_text_features(todo)))
            for i, text in enumerate(texts):
                if result[i] is None:
                    result[i] = computed[text]
            if self.text_cache is not None:
                for text, vector in computed.items():
                    self.text_cache.put(text, vector)
        if not texts:
            return np.zeros((0, self.config.text.embed_dim), np.float32)
        return np.stack(result).astype(np.float32)

    def embed_texts(
        self, texts: Sequence[str], template: str | Sequence[str] | None = None, normalize: bool = True
    ) -> np.ndarray:
        """(N, D) text embeddings, L2-normalised unless `normalize=False`. With `template` (one
        or several, each holding `{}`), each text is a label placed in the template(s); several
        templates are averaged as a prompt ensemble."""
        if isinstance(texts, str):
            texts = [texts]
        templates = resolve_templates(template, use_template=template is not None)
        if not normalize and len(templates) > 1:
            raise UsageError("un-normalised text embeddings need a single template (an ensemble averages normalised ones)")
        prompts = [fill(t, text) for text in texts for t in templates]
        features = self.text_features(prompts)
        if not normalize:
            return features
        return ensemble(l2_normalize(features), len(texts), len(templates))

    def label_embeddings(self, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """(labels, D) normalised classifier weights from already-resolved templates."""
        prompts = [fill(t, label) for label in labels for t in templates]
        return ensemble(l2_normalize(self.text_features(prompts)), len(labels), len(templates))

    # ------------------------------------------------------------------ images
    def _normalization_table(self) -> torch.Tensor:
        if self._table is None:
            self._table = torch.from_numpy(normalization_table(self.config.preprocess)).to(self.device)
        return self._table

    def _decoded(self, sources: Sequence[Any], names: Sequence[str], workers: int, batch_size: int) -> Iterator[tuple]:
        """(index, name, uint8 pixels or None, error or None) in input order, decoded ahead."""
        pre, options = self.config.preprocess, self.image_options

        def work(item):
            index, source, name = item
            if isinstance(source, InputError):  # an input that failed before decoding (e.g. an unlistable folder)
                return index, name, None, str(source)
            try:
                return index, name, load_pixels(source, name, pre, options), None
            except InputError as exc:
                return index, name, None, str(exc)
            except Exception as exc:  # an odd file must not stop a batch job: report and go on
                return index, name, None, f"{name}: cannot read ({type(exc).__name__}: {exc})"

        items = ((i, s, n) for i, (s, n) in enumerate(zip(sources, names)))
        if workers <= 0:
            yield from map(work, items)
            return
        window = max(2 * batch_size, 4 * workers)
        pool = ThreadPoolExecutor(workers, thread_name_prefix="siglip-decode")
        pending: collections.deque = collections.deque()
        try:
            for item in items:
                pending.append(pool.submit(work, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    @torch.inference_mode()
    def _launch(self, pixels: list[np.ndarray], normalize_output: bool, pinned: torch.Tensor | None):
        """Queue one batch; returns a handle for `_collect`. On CUDA nothing here waits for the
        GPU: pixels go up from pinned memory, results come back into pinned memory, and an event
        marks when they are there."""
        if pinned is None:
            batch = torch.from_numpy(np.stack(pixels)).to(self.device)
        else:
            host = pinned[: len(pixels)]
            np.stack(pixels, out=host.numpy())
            batch = host.to(self.device, non_blocking=True)
        outputs = self.vision_model(pixels_to_model_input(batch, self._normalization_table()))
        outputs = normalize(outputs) if normalize_output else outputs.float()
        if self.device.type != "cuda":
            return outputs.cpu(), None
        result = torch.empty(outputs.shape, dtype=outputs.dtype, pin_memory=True)
        result.copy_(outputs, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return result, done

    @staticmethod
    def _collect(handle) -> np.ndarray:
        result, done = handle
        if done is not None:
            done.synchronize()
        return result.numpy()

    def iter_image_features(
        self,
        sources: Iterable[Any],
        names: Sequence[str] | None = None,
        normalize_output: bool = True,
        batch_size: int | None = None,
        workers: int | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> Iterator[Embedded]:
        """One `Embedded` per input, in input order: its image embedding (L2-normalised unless
        `normalize_output=False`), or the error that made it skip."""
        sources = list(sources)
        names = list(names) if names is not None else [describe(s, i) for i, s in enumerate(sources)]
        batch_size = batch_size or self.batch_size
        workers = self.workers if workers is None else workers
        self._tower("vision")
        pre = self.config.preprocess
        use_pinned = self.device.type == "cuda"
        ring = [
            torch.empty((batch_size, pre.height, pre.width, 3), dtype=torch.uint8).pin_memory() if use_pinned else None
            for _ in range(2)
        ]
        waiting: collections.deque[Embedded] = collections.deque()  # in input order
        batch: list[np.ndarray] = []
        batch_items: list[Embedded] = []
        in_flight = None  # (handle, items) of the batch the device is working on
        launches = 0

        def launch() -> None:
            nonlocal in_flight, launches, batch, batch_items
            handle = self._launch(batch, normalize_output, ring[launches % 2])
            launches += 1
            if in_flight is not None:
                finish(*in_flight)
                in_flight = None
            if use_pinned:  # CUDA: collect this batch after the next one is queued
                in_flight = (handle, batch_items)
            else:  # CPU/MPS: the work is done already; hand the results out now
                finish(handle, batch_items)
            batch, batch_items = [], []

        def finish(handle, items: list[Embedded]) -> None:
            for item, vector in zip(items, self._collect(handle)):
                item.vector = vector

        def drain() -> Iterator[Embedded]:
            while waiting and (waiting[0].vector is not None or waiting[0].error is not None):
                item = waiting.popleft()
                if on_progress:
                    on_progress(1)
                yield item

        for index, name, pixels, error in self._decoded(sources, names, workers, batch_size):
            item = Embedded(index=index, name=name, error=error)
            waiting.append(item)
            if pixels is not None:
                batch.append(pixels)
                batch_items.append(item)
            if len(batch) == batch_size:
                launch()
            yield from drain()
        if batch:
            launch()
        if in_flight is not None:
            finish(*in_flight)
        yield from drain()

    def embed_images(self, images: Iterable[Any], normalize: bool = True, batch_size: int | None = None) -> np.ndarray:
        """(N, D) image embeddings for paths, URLs, bytes, PIL images or uint8 arrays;
        L2-normalised unless `normalize=False`. A bad input raises InputError naming it."""
        results = list(self.iter_image_features(images, normalize_output=normalize, batch_size=batch_size))
        for item in results:
            if item.error:
                raise InputError(item.error)
        if not results:
            return np.zeros((0, self.embed_dim), np.float32)
        return np.stack([item.vector for item in results])

    # ------------------------------------------------------------------ scores
    def logits(self, image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
        return logits(np.asarray(image_embeddings, np.float32), np.asarray(text_embeddings, np.float32), self.logit_scale, self.logit_bias)

    def probabilities(self, logit_matrix: np.ndarray, use_softmax: bool = False) -> np.ndarray:
        return softmax(logit_matrix) if use_softmax else sigmoid(logit_matrix)

    def classify(
        self,
        images: Iterable[Any],
        labels: Sequence[str],
        template: str | Sequence[str] | None = DEFAULT_TEMPLATE,
        softmax: bool = False,
    ) -> np.ndarray:
        """(N_images, N_labels) probabilities: SigLIP's per-label sigmoid (they do not sum to 1),
        or with `softmax=True` a distribution over the labels."""
        labels = [labels] if isinstance(labels, str) else list(labels)
        templates = resolve_templates(template, use_template=template is not None)
        text = self.label_embeddings(labels, templates)
        image = self.embed_images(images)
        return self.probabilities(self.logits(image, text), softmax)

    def iter_classify(
        self,
        sources: Sequence[Any],
        names: Sequence[str],
        labels: Sequence[str],
        templates: Sequence[str],
        use_softmax: bool = False,
        top_k: int | None = None,
        threshold: float | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> Iterator[ImageScores]:
        """One ImageScores per input in order, labels best first (cut by top-k and threshold),
        or the error that kept the image from being scored."""
        text = self.label_embeddings(labels, templates)
        for item in self.iter_image_features(sources, names, on_progress=on_progress):
            if item.error is not None:
                yield ImageScores(path=item.name, error=item.error)
                continue
            logit_row = self.logits(item.vector[None, :], text)
            probs = self.probabilities(logit_row, use_softmax)[0]
            yield ImageScores(
                path=item.name,
                labels=[LabelScore(labels[i], float(probs[i]), float(logit_row[0, i])) for i in rank(probs, top_k, threshold)],
            )

    def describe(self) -> dict:
        return {
            "model": self.resolved.name,
            "revision": self.resolved.revision,
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
            "attn": self.attn,
        }


def load(
    name_or_path: str | os.PathLike | None = None,
    device: str = "auto",
    dtype: str = "auto",
    attn: str = "auto",
    offline: bool | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    max_pixels: int | None = ImageOptions.max_pixels,
    batch_size: int | None = None,
    workers: int | None = None,
) -> Engine:
    """Open a SigLIP checkpoint (local folder or hub id; default google/siglip-base-patch16-224).

    Nothing heavy happens here beyond reading the config: weights load on first use, one
    tower at a time."""
    name = str(name_or_path or os.environ.get("SIGLIP_MODEL") or DEFAULT_MODEL)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    resolved = resolve_model(name, offline=offline, revision=revision)
    config = config_from_folder(resolved.folder)
    attn_name = resolve_attention(attn, torch_device, torch_dtype, config.head_dims)
    return Engine(
        resolved,
        config,
        torch_device,
        torch_dtype,
        attn_name,
        cache_dir=Path(cache_dir) if cache_dir else None,
        use_cache=use_cache,
        image_options=ImageOptions(max_pixels=max_pixels),
        batch_size=batch_size,
        workers=workers,
    )


__all__ = ["Engine", "load", "SiglipError"]
