"""On-disk cache of text features, so repeated runs with the same labels skip the text tower
(and never load its weights or the tokenizer).

Layout: <cache dir>/text/<model revision>/<device type>-<dtype>/<sha256 of the prompt>.npy,
one float32 vector (un-normalised text features) per prompt. The model revision is the hub
commit or a fingerprint of a local folder's weights, so new weights never meet old vectors.
Files are written under a temporary name and renamed, so concurrent runs are safe; a file that
cannot be read, or holds a vector of the wrong shape, a NaN or a zero vector, is recomputed and
rewritten. The whole folder is safe to delete at any time.

Cache dir: $SIGLIP_CACHE_DIR, else $XDG_CACHE_HOME/siglip-cli, else ~/.cache/siglip-cli.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from .safefiles import atomic_write_bytes, make_directory, open_regular


def default_cache_dir() -> Path:
    if os.environ.get("SIGLIP_CACHE_DIR"):
        return Path(os.environ["SIGLIP_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "siglip-cli"


def _safe(part: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in part)


class TextCache:
    kind = "text"

    def __init__(self, root: Path, revision: str, variant: str, dim: int | None = None):
        self.root, self.revision = root, revision
        self.folder = root / self.kind / _safe(revision) / _safe(variant)
        self.dim = dim

    def _path(self, prompt: str) -> Path:
        return self.folder / (hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:40] + ".npy")

    def get(self, prompt: str) -> np.ndarray | None:
        """The cached vector, or None when there is none or it is damaged (wrong shape or dtype,
        not a plain array, non-finite or zero): the caller recomputes it and `put` repairs it."""
        try:
            # our own entry: a FIFO or a planted link there is refused at once (never a hang)
            with open_regular(self._path(prompt), follow_symlinks=False) as fh:
                vector = np.load(fh, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if not isinstance(vector, np.ndarray) or vector.ndim != 1 or vector.dtype != np.float32:
            return None
        if self.dim is not None and vector.shape[0] != self.dim:
            return None
        if not np.isfinite(vector).all() or not np.linalg.norm(vector) > 0:
            return None
        return vector

    def put(self, prompt: str, vector: np.ndarray) -> None:
        """Store `vector` atomically (a planted link at the entry is replaced, never followed)."""
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(vector, dtype=np.float32))
        try:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            make_directory(self.folder)
            atomic_write_bytes(self._path(prompt), buffer.getvalue())
        except OSError:  # a read-only or full disk (or a hostile folder) only costs speed, never results
            pass


class ImageCache(TextCache):
    """Normalised embeddings of example images (`classify --examples`) in
    <cache dir>/images/<revision>/<variant>/, keyed by the file's SHA-256: renaming or moving an
    example costs nothing, editing it makes a new entry. The variant holds the device, the
    precision and everything else that changes the pixels the model sees (decoding, patch budget)."""

    kind = "images"
