"""The model handle behind `siglip_cli.load()`: the towers (loaded on first use), the tokenizer,
the on-disk text cache and the scoring constants, with the embedding and scoring API.

Scoring images against cached label embeddings never reads the text tower's weights or the
tokenizer. Images go through an `ImagePipeline` (pipeline.py), which decodes ahead in threads
and keeps the device busy; this module only says what the model does with the pixels.

Texts longer than the model's length are truncated as the reference does (end-of-text kept
last). The engine records each one with its length in tokens (`truncated`) and tells
`on_truncated` once per call that found some, so that the command line can say so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .cache import TextCache, default_cache_dir
from .core import attention as attention_backends
from .core.config import SiglipConfig, config_from_folder
from .core.errors import InputError, ModelUnavailable, UsageError
from .core.images import DEFAULT_MAX_PIXELS, DecodeOptions
from .core.logit_scalars import read_logit_scalars
from .core.model import Siglip, normalize
from .core.quantize import quantize_int8
from .core.video import VideoSampling
from .core.scoring import ensemble, l2_normalize, logits, sigmoid, softmax
from .core.tokenizer import TextTokenizer, load_tokenizer
from .core.weights import load_model
from .hub import DEFAULT_MODEL, ResolvedModel, resolve_model
from .pipeline import DEFAULT_BATCH, ImagePipeline, ImageResult, as_sources, default_workers
from .prompts import DEFAULT_TEMPLATE, fill, resolve_templates
from .runtime import Precision, dtype_name, ieee_fp32, resolve_attention, resolve_decode, resolve_device, resolve_precision
from .sources import Source

TEXT_BATCH = {"cuda": 512, "mps": 128, "cpu": 64}


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
        decode_options: DecodeOptions = DecodeOptions(),
        batch_size: int | None = None,
        workers: int | None = None,
        network: Siglip | None = None,
        quantize: str | None = None,
    ):
        """`network`: an already built model (e.g. random weights for `bench`); otherwise each
        tower loads from `resolved.folder` on first use. `quantize="int8"`: every tower's Linear
        layers run in int8 (`dtype` must then be fp32)."""
        self.resolved = resolved
        self.config = config
        self.device = device
        self.dtype = dtype
        self.attn = attn
        self.quantize = quantize
        self.decode_options = decode_options
        self.video = VideoSampling()  # which frames of a video input become images
        self.batch_size = batch_size or DEFAULT_BATCH.get(device.type, 16)
        self.workers = default_workers(device) if workers is None else workers
        self.text_cache = (
            TextCache(cache_dir or default_cache_dir(), resolved.revision, f"{device.type}-{self.precision}", config.text.embed_dim)
            if use_cache
            else None
        )
        self._network = network
        self._tokenizer: TextTokenizer | None = None
        self._scale_bias: tuple[float, float] | None = None
        self.truncated: dict[str, int] = {}  # text -> its length in tokens, for texts cut to fit
        self.on_truncated: Callable[[dict[str, int], int], None] | None = None
        if network is not None:
            network.set_attention(self._attend())
            for tower in (network.text_model, network.vision_model):
                if tower is not None:
                    self._quantized(tower)

    # ------------------------------------------------------------------ the model
    @property
    def precision(self) -> str:
        """fp32, fp16, bf16 or int8: what the results depend on (int8 keeps fp32 storage)."""
        return self.quantize or dtype_name(self.dtype)

    @property
    def decode(self) -> str:
        return "fast" if self.decode_options.draft_jpeg else "exact"

    def _quantized(self, tower: torch.nn.Module) -> torch.nn.Module:
        return quantize_int8(tower) if self.quantize == "int8" else tower

    def _attend(self):
        return attention_backends.resolve(self.attn, self.device, self.dtype, self.config.head_dims, self.masked)

    @property
    def masked(self) -> bool:
        """Whether attention needs key masks: NaFlex batches pad images to the longest."""
        return self.config.vision.naflex

    @property
    def network(self) -> Siglip | None:
        """The model with whichever towers are loaded so far (None before the first)."""
        return self._network

    def tower(self, name: str) -> torch.nn.Module:
        """The `text` or `vision` tower, loaded on first use."""
        return self._tower(name)

    def _tower(self, name: str) -> torch.nn.Module:
        network = self._network
        if network is None or getattr(network, f"{name}_model") is None:
            weights = self.resolved.folder / "model.safetensors"
            loaded = load_model(weights, self.config, (name,), self._attend(), self.device, self.dtype)
            self._quantized(getattr(loaded, f"{name}_model"))
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
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.resolved.folder, self.config.model_type, self.config.text_length,
                                             self.config.text.vocab_size)
        return self._tokenizer

    def set_attention(self, attn: str) -> None:
        """Switch the attention backend of the loaded towers (and of any loaded later)."""
        fn = attention_backends.resolve(attn, self.device, self.dtype, self.config.head_dims, self.masked)
        self.attn = attn
        if self._network is not None:
            self._network.set_attention(fn)

    def _scale_and_bias(self) -> tuple[float, float]:
        # Read once: on CUDA every read waits for the device, which would stall the pipeline.
        if self._scale_bias is None and self._network is None:
            # Two numbers need no tower: read them from the file (a bf16 file falls through).
            try:
                self._scale_bias = read_logit_scalars(self.resolved.folder / "model.safetensors")
            except ModelUnavailable:
                self._tower("vision")
        if self._scale_bias is None:
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
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Text-tower outputs (N, D) float32 for already-templated texts; no cache."""
        chunk = TEXT_BATCH.get(self.device.type, 64)
        out = []
        truncated: dict[str, int] = {}
        for start in range(0, len(texts), chunk):
            part = texts[start : start + chunk]
            tokens = self.tokenizer.tokenize(part)
            truncated.update(tokens.truncated(part, self.tokenizer.max_length))
            ids = torch.tensor(tokens.ids, dtype=torch.long, device=self.device)
            with ieee_fp32(self.device, self.dtype):
                out.append(self.text_model(ids).float().cpu().numpy())
        if truncated:
            self.truncated.update(truncated)
            if self.on_truncated is not None:
                self.on_truncated(truncated, self.tokenizer.max_length)
        return np.concatenate(out) if out else np.zeros((0, self.config.text.embed_dim), np.float32)

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        """Un-normalised text-tower outputs (N, D) float32 for already-templated texts, served
        from the on-disk cache where possible."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.config.text.embed_dim), np.float32)
        result: list[np.ndarray | None] = [None] * len(texts)
        if self.text_cache is not None:
            result = [self.text_cache.get(t) for t in texts]
        todo = list(dict.fromkeys(t for t, r in zip(texts, result) if r is None))
        if todo:
            computed = dict(zip(todo, self.encode_texts(todo)))
            for text, vector in computed.items():
                if not np.isfinite(vector).all():
                    raise ModelUnavailable(
                        f"{self.resolved.name}: the text tower produced non-finite values (NaN or infinity) "
                        f"for {text!r}; the checkpoint's weights are broken"
                    )
            result = [computed[t] if r is None else r for t, r in zip(texts, result)]
            if self.text_cache is not None:
                for text, vector in computed.items():
                    self.text_cache.put(text, vector)
        return np.stack(result).astype(np.float32)

    def embed_texts(
        self, texts: Sequence[str], template: str | Sequence[str] | None = None, normalize: bool = True
    ) -> np.ndarray:
        """(N, D) text embeddings, L2-normalised unless `normalize=False`. With `template` (one
        or several, each holding `{}`), each text is a label placed in the template(s); several
        templates are averaged as a prompt ensemble."""
        texts = _text_list(texts)
        templates = resolve_templates(template, use_template=template is not None)
        if not normalize and len(templates) > 1:
            raise UsageError("un-normalised text embeddings need a single template (an ensemble averages normalised ones)")
        features = self.text_features([fill(t, text) for text in texts for t in templates])
        if not normalize:
            return features
        return ensemble(l2_normalize(features), len(texts), len(templates))

    def label_embeddings(self, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """(labels, D) normalised classifier weights from already-resolved templates."""
        prompts = [fill(t, label) for label in labels for t in templates]
        return ensemble(l2_normalize(self.text_features(prompts)), len(labels), len(templates))

    # ------------------------------------------------------------------ images
    def image_pipeline(self, batch_size: int | None = None, workers: int | None = None) -> ImagePipeline:
        return ImagePipeline(
            self.config.preprocess,
            self.device,
            batch_size or self.batch_size,
            self.workers if workers is None else workers,
            self.decode_options,
            vision=self.config.vision,
            video=self.video,
        )

    def encode_images(self, batch, normalized: bool = True) -> torch.Tensor:
        """A batch on the device (`PixelBatch`, or NaFlex's `PatchBatch`) -> image features
        (N, D) on the device."""
        with ieee_fp32(self.device, self.dtype):
            features = self.vision_model(*batch.model_inputs())
        return normalize(features) if normalized else features.float()

    def iter_image_features(
        self,
        sources: Sequence[Source],
        normalized: bool = True,
        batch_size: int | None = None,
        workers: int | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> Iterator[ImageResult]:
        """One ImageResult per source, in input order: its embedding (L2-normalised unless
        `normalized=False`), or the error that kept it out."""
        self._tower("vision")
        pipeline = self.image_pipeline(batch_size, workers)
        with torch.inference_mode():
            yield from pipeline.run(sources, lambda pixels: self.encode_images(pixels, normalized), on_progress)

    def embed_images(self, images: Iterable[Any], normalize: bool = True, batch_size: int | None = None) -> np.ndarray:
        """(N, D) image embeddings for paths, URLs, bytes, PIL images or uint8 arrays;
        L2-normalised unless `normalize=False`. A bad input raises InputError naming it."""
        results = list(self.iter_image_features(as_sources(images), normalize, batch_size))
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
        labels = _text_list(labels)
        templates = resolve_templates(template, use_template=template is not None)
        text = self.label_embeddings(labels, templates)
        image = self.embed_images(images)
        return self.probabilities(self.logits(image, text), softmax)

    def describe(self) -> dict:
        """What the results depend on: the model's identity and how it runs (and for NaFlex the
        patch budget, which changes every image embedding)."""
        described = {
            "model": self.resolved.name,
            "revision": self.resolved.revision,
            "device": str(self.device),
            "dtype": self.precision,
            "decode": self.decode,
            "attn": self.attn,
        }
        if self.config.vision.naflex:
            described["max_patches"] = self.config.preprocess.max_num_patches
        return described


def _text_list(texts: str | Sequence[str]) -> list[str]:
    """A text or a list of texts; anything that is not a string is refused by name."""
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text #{index} is {type(text).__name__}, not a string: {text!r:.60}")
    return texts


def load(
    name_or_path: str | os.PathLike | None = None,
    device: str = "auto",
    dtype: str = "auto",
    attn: str = "auto",
    offline: bool | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    batch_size: int | None = None,
    workers: int | None = None,
    max_patches: int | None = None,
    decode: str = "auto",
    exact: bool = False,
    video: VideoSampling | None = None,
) -> Engine:
    """Open a SigLIP checkpoint (local folder or hub id; default google/siglip-base-patch16-224).

    `dtype`: auto, fp32, fp16, bf16 or int8 (auto: bf16 on CPUs with native bf16, fp16 on CUDA,
    else fp32). `decode`: auto (exact with fp32, else fast), exact or fast (large JPEGs decode
    at reduced scale). `exact=True`: fp32 and exact decoding, i.e. transformers' numbers.
    `max_patches`: SigLIP 2 NaFlex only, the most patches per image (default: the checkpoint's
    `max_num_patches`); more keeps more detail and costs time. `video`: which frames of video
    inputs become images (default: one every 2 seconds; needs PyAV, the `[video]` extra).

    Nothing heavy happens here beyond reading the config: weights load on first use, one
    tower at a time."""
    name = str(name_or_path or os.environ.get("SIGLIP_MODEL") or DEFAULT_MODEL)
    torch_device = resolve_device(device)
    precision, decode = resolve_exactness(dtype, decode, exact, torch_device)
    resolved = resolve_model(name, offline=offline, revision=revision)
    config = config_from_folder(resolved.folder)
    if max_patches is not None and not config.vision.naflex:
        size = config.vision.image_size
        raise UsageError(
            f"--max-patches: {name} is a fixed-resolution checkpoint ({size}x{size} pixels, "
            f"{config.vision.num_patches} patches); only SigLIP 2 NaFlex checkpoints take a patch budget"
        )
    config = config.with_max_patches(max_patches)
    attn_name = resolve_attention(attn, torch_device, precision.dtype, config.head_dims, masked=config.vision.naflex)
    engine = Engine(
        resolved,
        config,
        torch_device,
        precision.dtype,
        attn_name,
        cache_dir=Path(cache_dir) if cache_dir else None,
        use_cache=use_cache,
        decode_options=DecodeOptions(max_pixels=max_pixels, draft_jpeg=decode == "fast"),
        batch_size=batch_size,
        workers=workers,
        quantize=precision.quantize,
    )
    if video is not None:
        engine.video = video
    return engine


def resolve_exactness(dtype: str, decode: str, exact: bool, device: torch.device) -> tuple[Precision, str]:
    """(precision, decode mode) for the options; `exact` is fp32 with exact decoding, and any
    other dtype or decode mode beside it is a contradiction, refused."""
    if exact:
        if (dtype or "auto").lower() not in ("auto", "fp32"):
            raise UsageError(f"--exact computes in fp32 (transformers' numbers); drop --dtype {dtype} or --exact")
        if (decode or "auto").lower() not in ("auto", "exact"):
            raise UsageError(f"--exact decodes images exactly; drop --decode {decode} or --exact")
        dtype, decode = "fp32", "exact"
    precision = resolve_precision(dtype, device)
    return precision, resolve_decode(decode, precision)


__all__ = ["Engine", "load"]
