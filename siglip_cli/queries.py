"""Query embeddings for `siglip search`, made by the model that made the index.

An index's meta names its model, revision and dtype; a query embedded by any other model would
be compared with rows it has nothing in common with, so that is refused. A text query whose
embedding is in the on-disk cache is answered without the model at all: no torch import, no
weights, no tokenizer (the score's two scalars are in the meta). Anything else loads the
model, on the CPU unless told otherwise: one query through one tower is a single forward pass,
which a CPU does faster than a GPU can be started.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .cache import TextCache, default_cache_dir
from .core.errors import ModelUnavailable, UsageError
from .core.scoring import ensemble, l2_normalize
from .paths import stored_model
from .prompts import fill

DTYPES = ("fp32", "fp16", "bf16", "int8")


def made_by(meta: dict) -> str:
    return f"{meta.get('model')} (revision {meta.get('revision')})"


class IndexModel:
    """The model behind an index: its text cache, its scalars, and (only when needed) its towers."""

    def __init__(
        self,
        index: Path,
        meta: dict,
        model: str | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        attn: str = "auto",
        offline: bool = False,
        use_cache: bool = True,
        max_pixels: int | None = None,
    ):
        if not meta.get("model") or not meta.get("revision"):
            raise UsageError(f"{index}: its meta does not say which model made it; re-create it with siglip embed")
        self.index = index
        self.meta = meta
        self.override = model
        self.device = device
        # The meta was checked by store_meta.validate_meta: its model_dtype is one we run.
        self.dtype = meta.get("model_dtype", "fp32") if dtype == "auto" else dtype
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype {self.dtype}: use auto (the dtype that made {index}), {', '.join(DTYPES)}")
        self.attn = attn
        self.offline = offline
        self.use_cache = use_cache
        self.max_pixels = max_pixels
        self._engine = None
        self.on_truncated = None  # told of text queries cut to the model's length, as the engine's
        if model is not None:
            self._resolve()  # a wrong --model is refused before any work

    # ------------------------------------------------------------------ which model
    def _hub_revision(self, name: str) -> str | None:
        """A hub id is asked for the exact commit that made the index; a folder is what it is."""
        return None if Path(name).expanduser().is_dir() else self.meta["revision"]

    def _resolve(self) -> str:
        """The name (as `load` takes it) of a checkpoint with the index's revision."""
        from .hub import resolve_model

        revision = self.meta["revision"]
        if self.override is not None:
            resolved = resolve_model(self.override, offline=self.offline or None, revision=self._hub_revision(self.override))
            if resolved.revision != revision:
                raise UsageError(
                    f"--model {self.override} is revision {resolved.revision}, but {self.index} was made with "
                    f"{made_by(self.meta)}; a query must be embedded by the model that made the rows: leave out "
                    "--model, or name a copy of that model"
                )
            return self.override
        # an older index may name a local folder relative to where embed ran: also look beside it
        candidates = list(dict.fromkeys([self.meta["model"], stored_model(self.meta, self.index)]))
        if os.environ.get("SIGLIP_MODEL") and os.environ["SIGLIP_MODEL"] not in candidates:
            candidates.append(os.environ["SIGLIP_MODEL"])  # the meta's path may be relative to elsewhere
        causes = []
        for name in candidates:
            try:
                resolved = resolve_model(name, offline=self.offline or None, revision=self._hub_revision(name))
            except ModelUnavailable as exc:
                causes.append(str(exc))
                continue
            if resolved.revision == revision:
                return name
            causes.append(f"{name} is revision {resolved.revision} now")
        raise ModelUnavailable(
            f"{self.index} was made with {made_by(self.meta)}, which is not here ({'; '.join(causes)}); "
            "pass --model with that checkpoint"
        )

    @property
    def engine(self):
        if self._engine is None:
            from .engine import load

            name = self._resolve()
            self._engine = load(
                name,
                device=self.device,
                dtype=self.dtype,
                attn=self.attn,
                offline=True if self.offline else None,
                revision=self._hub_revision(name),
                use_cache=self.use_cache,
                max_pixels=self.max_pixels,
                # An image query is embedded exactly as the index's rows were: the same decoding
                # (fast decoding shrinks large JPEGs first) and NaFlex patch budget.
                decode=self.meta.get("decode", "exact"),  # stores from before --decode decoded exactly
                max_patches=self.meta.get("max_patches"),
            )
            self._engine.on_truncated = self.on_truncated
            if self._engine.embed_dim != self.meta["dim"]:
                raise ModelUnavailable(f"{name} makes {self._engine.embed_dim}-d embeddings, {self.index} holds {self.meta['dim']}-d rows")
        return self._engine

    # ------------------------------------------------------------------ scores
    def scale_and_bias(self) -> tuple[float, float]:
        """exp(logit_scale) and logit_bias: from the meta, else from the checkpoint's file."""
        if "logit_scale" in self.meta and "logit_bias" in self.meta:
            return float(self.meta["logit_scale"]), float(self.meta["logit_bias"])
        return self.engine.logit_scale, self.engine.logit_bias

    # ------------------------------------------------------------------ queries
    def _cached_features(self, prompts: Sequence[str]) -> np.ndarray | None:
        """The cached text features of every prompt, or None if any is missing. Only for a
        device named without asking torch (auto would need it to know what it means)."""
        device_type = self.device.split(":")[0]
        if not self.use_cache or device_type not in ("cpu", "cuda", "mps"):
            return None
        cache = TextCache(default_cache_dir(), self.meta["revision"], f"{device_type}-{self.dtype}")
        vectors = [cache.get(prompt) for prompt in prompts]
        if any(v is None or v.shape != (self.meta["dim"],) for v in vectors):
            return None
        return np.stack(vectors)

    def text_embeddings(self, texts: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """(N, D) normalised: each text through the templates (several are averaged), as
        classify builds its labels."""
        prompts = [fill(t, text) for text in texts for t in templates]
        features = self._cached_features(prompts)
        if features is None:
            features = self.engine.text_features(prompts)
        return ensemble(l2_normalize(features), len(texts), len(templates))

    def image_embeddings(self, sources) -> Iterator:
        """One ImageResult per source, in order: its normalised embedding or its error."""
        return self.engine.iter_image_features(sources, True)
