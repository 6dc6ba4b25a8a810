"""The warm model and the loaded indexes behind `siglip serve`.

`ServedEngine` is the engine as the command modules use it (`label_embeddings`,
`iter_image_features`, `embed_texts`, `logits`, ...), so that every endpoint runs the very code
of its command: images (and a video's sampled frames) go through the micro-batcher, text work
is serialised (the text cache and the lazily loaded tower are not thread-safe), the rest is the
engine's own.

`ServedIndexes` holds the indexes (read-only stores) by number. `reload()` re-opens the ones a
later `embed --update` replaced (another inode or modification time): a request already holding
the old store finishes on it, the next one gets the new, so no request is dropped.

Thumbnails are read only for image rows of loaded indexes, by (index, row) number: a client
never names a path. The file must still be the regular file that was indexed (same size and
modification time when the index recorded them), which a planted symlink or a swapped file is
not. A video's frame row is its video file, decoded at the row's time through core/video.py.
"""

from __future__ import annotations

import collections
import io
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..core.errors import InputError, UsageError
from ..core.images import DecodeOptions, open_image, to_rgb
from ..core.scoring import ensemble, l2_normalize
from ..core.video import VideoSampling
from ..pipeline import ImageResult
from ..prompts import fill
from ..queries import made_by
from ..sources import Source
from ..store import Store, open_store
from .batcher import MicroBatcher


THUMBNAIL_SIDE = 256
THUMBNAIL_CACHE = 1024  # thumbnails kept in memory (about 10-20 KB each)


class NotFound(Exception):
    """An index or row that is not there: 404."""


class Unsupported(Exception):
    """What this server cannot do without an optional extra (PyAV for video frames): 501."""


class ServedEngine:
    def __init__(self, engine, batch_size: int, window: float, queue_size: int):
        import torch

        self.engine = engine
        self._torch = torch
        self.text_lock = threading.Lock()
        engine.tower("vision")  # warm: the first request pays nothing
        self.pipeline = engine.image_pipeline(batch_size=batch_size, workers=0)  # requests decode in their own threads
        self.batcher = MicroBatcher(self._run_batch, batch_size, window, queue_size)
        # a request's images waiting at once: two batches keep the model busy while the request
        # decodes on; never the whole queue, which other requests share
        self.in_flight = max(1, min(2 * batch_size, queue_size // 2))

    def __getattr__(self, name):  # logit_scale, logits, probabilities, describe, resolved, ...
        return getattr(self.engine, name)

    def warm_text(self) -> None:
        with self.text_lock:
            self.engine.encode_texts(["warm"])

    def _run_batch(self, frames: list, normalized: bool) -> np.ndarray:
        with self._torch.inference_mode():
            return self.pipeline.embed_pixels(frames, lambda batch: self.engine.encode_images(batch, normalized))

    # ------------------------------------------------------------------ texts (serialised)
    def label_embeddings(self, labels, templates):
        with self.text_lock:
            return self.engine.label_embeddings(labels, templates)

    def embed_texts(self, texts, template=None, normalize: bool = True):
        with self.text_lock:
            return self.engine.embed_texts(texts, template, normalize)

    def text_features(self, prompts):
        with self.text_lock:
            return self.engine.text_features(prompts)

    # ------------------------------------------------------------------ images (batched)
    def iter_image_features(self, sources: Sequence[Source], normalized: bool = True, batch_size=None, workers=None,
                            on_progress=None, video: VideoSampling | None = None) -> Iterator[ImageResult]:
        """As Engine.iter_image_features: one result per image, a video's frames (with their
        times) in its place, in order. Decoding happens here, in the request's thread (a video
        with `video`'s sampling, else the server's); the forward pass in the batcher's. At most
        `in_flight` images of one request wait for the model at once, so a long video streams
        through the bounded queue instead of filling it."""
        pending: collections.deque = collections.deque()
        counted = None

        def finished(decoded, future) -> ImageResult:
            nonlocal counted
            if on_progress and decoded.index != counted:
                counted = decoded.index
                on_progress(1)
            if future is None:
                return ImageResult(decoded.index, decoded.name, error=decoded.error, time=decoded.time)
            vector = future.result()
            if not np.isfinite(vector).all():
                return ImageResult(decoded.index, decoded.name, error=f"{decoded.name}: the model produced non-finite values",
                                   time=decoded.time)
            return ImageResult(decoded.index, decoded.name, vector=vector, time=decoded.time)

        for decoded in self.pipeline.decoded(sources, video):
            future = self.batcher.submit(decoded.pixels, normalized) if decoded.pixels is not None else None
            pending.append((decoded, future))
            while len(pending) > self.in_flight:
                yield finished(*pending.popleft())
        while pending:
            yield finished(*pending.popleft())

    def close(self) -> None:
        self.batcher.close()


# ============================================================================ indexes
def _identity(path: Path) -> tuple:
    info = os.stat(path)
    return info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size


@dataclass
class ServedIndex:
    number: int
    path: Path
    store: Store
    identity: tuple
    _rows: dict | None = None

    def row_of(self, name: str) -> int:
        """The row of an image by its name (built on first use: a page asks, scripts rarely)."""
        if self._rows is None:
            self._rows = self.store.image_rows()
        return self._rows[name]

    def describe(self) -> dict:
        return {"index": self.number, "path": str(self.path), "rows": self.store.count,
                "images": self.store.image_count, "texts": self.store.count - self.store.image_count,
                "dim": self.store.dim}


def model_key(meta: dict) -> tuple:
    """What rows of two indexes need in common to be searched by one model."""
    return meta.get("revision"), meta.get("model_dtype", "fp32"), meta.get("dim"), meta.get("max_patches")


class ServedIndexes:
    def __init__(self, paths: Sequence[Path]):
        self._lock = threading.Lock()
        self.items: list[ServedIndex] = []
        for number, path in enumerate(paths):
            store = open_store(path)
            if self.items and model_key(store.meta) != model_key(self.items[0].store.meta):
                first = self.items[0]
                raise UsageError(f"{path} was made with {made_by(store.meta)} ({store.meta.get('model_dtype', 'fp32')}), "
                                 f"{first.path} with {made_by(first.store.meta)} ({first.store.meta.get('model_dtype', 'fp32')}); "
                                 "one server serves one model: start one server per model")
            self.items.append(ServedIndex(number, Path(os.path.abspath(path)), store, _identity(path)))
        self._thumbnails: collections.OrderedDict = collections.OrderedDict()
        self._thumbnail_lock = threading.Lock()

    @property
    def meta(self) -> dict | None:
        return self.items[0].store.meta if self.items else None

    def get(self, number: int) -> ServedIndex:
        items = self.items  # one read: a reload swaps the list
        if not 0 <= number < len(items):
            raise NotFound(f"no index {number}: this server has {len(items)} (0 to {len(items) - 1})" if items
                           else f"no index {number}: this server was started without indexes")
        return items[number]

    def reload(self) -> list[str]:
        """Re-open the indexes whose files were replaced; one line per index, for the log. A
        replacement that cannot be read, or that another model made, is refused: the old one
        keeps serving."""
        lines = []
        with self._lock:
            items = list(self.items)
            for position, item in enumerate(items):
                try:
                    identity = _identity(item.path)
                    if identity == item.identity:
                        continue
                    store = open_store(item.path)
                    if model_key(store.meta) != model_key(item.store.meta):
                        raise UsageError(f"now made with {made_by(store.meta)}, not {made_by(item.store.meta)}")
                except Exception as exc:  # noqa: BLE001 whatever is wrong with the new file, the old one keeps serving
                    lines.append(f"{item.path}: kept the loaded index ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
                    continue
                items[position] = ServedIndex(item.number, item.path, store, identity)
                lines.append(f"{item.path}: reloaded, {store.count} rows (was {item.store.count})")
            self.items = items
        return lines

    # ------------------------------------------------------------------ thumbnails
    def image_row(self, number: int, row: int) -> tuple[ServedIndex, str]:
        index = self.get(number)
        store = index.store
        if not 0 <= row < store.count:
            raise NotFound(f"index {number} has rows 0 to {store.count - 1}; no row {row}")
        if store.kind(row) != "image":
            raise NotFound(f"row {row} of index {number} is a text, not an image")
        return index, store.names_at([row])[0]

    def thumbnail(self, number: int, row: int, max_pixels: int | None) -> bytes:
        index, name = self.image_row(number, row)
        key = (number, index.identity, row)
        with self._thumbnail_lock:
            if key in self._thumbnails:
                self._thumbnails.move_to_end(key)
                return self._thumbnails[key]
        data = make_thumbnail(name, _stamp(index.store, row), max_pixels, _time(index.store, row))
        with self._thumbnail_lock:
            self._thumbnails[key] = data
            while len(self._thumbnails) > THUMBNAIL_CACHE:
                self._thumbnails.popitem(last=False)
        return data


def _stamp(store: Store, row: int) -> tuple[int, int] | None:
    try:
        record = store.stamps[row]
        size, mtime = int(record["size"]), int(record["mtime_ns"])
    except Exception:  # noqa: BLE001 a format without stamps: the regular-file check still holds
        return None
    return (size, mtime) if size >= 0 else None


def _time(store: Store, row: int) -> float:
    """A frame row's time in seconds; -1 for a still (only a store with frames has times)."""
    return float(store.times[row]) if "video" in store.meta else -1.0


def make_thumbnail(name: str, stamp: tuple[int, int] | None, max_pixels: int | None, seconds: float = -1.0) -> bytes:
    """A JPEG at most THUMBNAIL_SIDE pixels on a side of the indexed file `name`; of a video's
    frame row (`seconds` >= 0, `name` is `clip.mp4#t=12.5`), the frame shown at that time."""
    if "://" in name:
        raise NotFound(f"{name}: a URL row; the server fetches nothing")
    if seconds >= 0:
        return _frame_thumbnail(name, stamp, max_pixels, seconds)
    path = Path(name)
    _checked_file(path, name, stamp)
    try:
        image = to_rgb(open_image(str(path), name, DecodeOptions(max_pixels=max_pixels), (THUMBNAIL_SIDE, THUMBNAIL_SIDE)), name)
    except InputError as exc:
        raise NotFound(str(exc)) from None
    return _jpeg(image)


def _checked_file(path: Path, name: str, stamp: tuple[int, int] | None) -> None:
    """The indexed file is still the regular file that was indexed, else NotFound."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise NotFound(f"{name}: not readable now ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise NotFound(f"{name}: not a regular file now")
    if stamp is not None and (info.st_size, info.st_mtime_ns) != stamp:
        raise NotFound(f"{name}: changed since it was indexed (size or modification time)")


def _frame_thumbnail(name: str, stamp: tuple[int, int] | None, max_pixels: int | None, seconds: float) -> bytes:
    """The frame of a video row, decoded at its time through the video module (the frame rows
    of a video share the video file's stamp)."""
    from ..core import video

    split = video.split_frame_name(name)
    if split is None:
        raise NotFound(f"{name}: a frame row without a #t= time in its name")
    path = Path(split[0])
    _checked_file(path, split[0], stamp)
    if video._av() is None:
        raise Unsupported(f"{name}: {video.VIDEO_EXTRA} (on the server)")
    image = video.read_frame(str(path), seconds, max_pixels)
    if image is None:
        raise NotFound(f"{name}: the frame at {video.format_seconds(seconds)} s cannot be decoded now")
    return _jpeg(image)


def _jpeg(image) -> bytes:
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


# ============================================================================ queries
@dataclass(frozen=True)
class IndexedRow:
    """A query by an indexed image ("more like this"): its stored row is the query vector."""

    index: ServedIndex
    row: int


class IndexQueries:
    """The `model` that `search` asks for query vectors (as queries.IndexModel): texts through
    the served engine and its cache, uploads through the batcher, indexed rows from the store."""

    def __init__(self, served: ServedEngine, index: ServedIndex):
        self.served = served
        self.meta = index.store.meta

    def text_embeddings(self, texts, templates) -> np.ndarray:
        prompts = [fill(t, text) for text in texts for t in templates]
        return ensemble(l2_normalize(self.served.text_features(prompts)), len(texts), len(templates))

    def scale_and_bias(self) -> tuple[float, float]:
        if "logit_scale" in self.meta and "logit_bias" in self.meta:
            return float(self.meta["logit_scale"]), float(self.meta["logit_bias"])
        return self.served.logit_scale, self.served.logit_bias

    def image_embeddings(self, sources: Sequence[Source]) -> Iterator[ImageResult]:
        """One result per query image, in order (a video: one per sampled frame, as `search`
        samples a video query locally); indexed rows from the store, the rest computed."""
        uploads = [position for position, source in enumerate(sources) if not isinstance(source.value, IndexedRow)]
        computed = self.served.iter_image_features([sources[position] for position in uploads])
        ahead = next(computed, None)
        for position, source in enumerate(sources):
            if isinstance(source.value, IndexedRow):
                vector = source.value.index.store.rows[source.value.row].astype(np.float32)
                yield ImageResult(position, source.name, vector=l2_normalize(vector[None, :])[0])
                continue
            while ahead is not None and uploads[ahead.index] == position:
                yield ImageResult(position, ahead.name, ahead.vector, ahead.error, ahead.time)
                ahead = next(computed, None)
