"""Image sources -> decoded pixels (threads, ahead of the model) -> device batches -> features.

Pillow releases the GIL while it decodes and resizes, so a pool of threads keeps the next
batches ready while the model runs. Pixels travel to the device as uint8 (a quarter of the
bytes of float32) and are normalised there. On CUDA one batch is in flight while the previous
one's results come back: pixels go up from pinned memory, features come back into pinned
memory, and an event recorded on the device's own stream says when they are there.

Results come out in input order, one per source: its feature vector, or the error that kept it
out. A bad input never costs the rest of its batch. Decode threads are daemons and every read
is of a regular file, so Ctrl-C always ends the process promptly.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .core.config import PreprocessConfig
from .core.errors import InputError
from .core.images import DecodeOptions, load_pixels, normalization_table, pixels_to_model_input
from .sources import Source
from .urls import DEFAULT_URL_MAX_BYTES, DEFAULT_URL_TIMEOUT, fetch_url, is_url

DEFAULT_BATCH = {"cuda": 128, "mps": 32, "cpu": 16}


def default_workers(device: torch.device) -> int:
    """Decode threads. On a CPU the model needs every core and decoding is a few per cent of the
    work, so one thread keeps a batch ready without fighting the matrix multiplies; a GPU eats
    images faster than one core decodes them, so it gets up to 16."""
    cores = os.cpu_count() or 1
    return 1 if device.type == "cpu" else max(1, min(16, cores))


@dataclass(frozen=True)
class FetchOptions:
    timeout: float = DEFAULT_URL_TIMEOUT
    max_bytes: int = DEFAULT_URL_MAX_BYTES


@dataclass
class Decoded:
    """One source after the CPU's share of the work: uint8 pixels, or why there are none."""

    index: int
    name: str
    pixels: np.ndarray | None = None
    error: str | None = None


@dataclass
class ImageResult:
    """One source after the model: its feature vector (float32), or why it has none."""

    index: int
    name: str
    vector: np.ndarray | None = None
    error: str | None = None

    @property
    def ready(self) -> bool:
        return self.vector is not None or self.error is not None


@dataclass
class _InFlight:
    """A launched batch: where its features land, and the event that says they are there."""

    results: list[ImageResult]
    host: torch.Tensor
    done: Any = None  # torch.cuda.Event on CUDA

    def collect(self) -> None:
        if self.done is not None:
            self.done.synchronize()
        vectors = self.host.numpy()
        finite = np.isfinite(vectors).all(axis=1)
        for result, vector, ok in zip(self.results, vectors, finite):
            if ok:
                result.vector = vector
            else:
                result.error = (f"{result.name}: the model produced non-finite values (NaN or infinity); "
                                "the checkpoint's weights or preprocessing (e.g. image_std 0) are broken")


@dataclass
class ImagePipeline:
    preprocess: PreprocessConfig
    device: torch.device
    batch_size: int
    workers: int
    decode_options: DecodeOptions = DecodeOptions()
    fetch_options: FetchOptions = FetchOptions()
    _table: torch.Tensor | None = field(default=None, repr=False)
    _ring: list | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ CPU side
    def load(self, source: Source) -> np.ndarray:
        value = source.value
        if isinstance(value, str) and is_url(value):
            value = fetch_url(value, self.fetch_options.timeout, self.fetch_options.max_bytes)
        return load_pixels(value, source.name, self.preprocess, self.decode_options)

    def _decode_one(self, index: int, source: Source) -> Decoded:
        try:
            return Decoded(index, source.name, pixels=self.load(source))
        except InputError as exc:
            return Decoded(index, source.name, error=str(exc))
        except MemoryError:
            return Decoded(index, source.name, error=f"{source.name}: too large to decode in memory")
        except Exception as exc:  # an odd file must not stop a batch job: report it and go on
            return Decoded(index, source.name, error=f"{source.name}: cannot read ({type(exc).__name__}: {exc})")

    def decoded(self, sources: Sequence[Source]) -> Iterator[Decoded]:
        """Every source decoded, in input order, up to a window ahead of the consumer."""
        if self.workers <= 0:
            for index, source in enumerate(sources):
                yield self._decode_one(index, source)
            return
        window = max(2 * self.batch_size, 4 * self.workers)
        todo: queue.Queue = queue.Queue()
        slots: dict[int, queue.Queue] = {}
        for index in range(min(window, len(sources))):
            slots[index] = queue.Queue(maxsize=1)
            todo.put(index)

        def work() -> None:
            while True:
                index = todo.get()
                if index is None:
                    return
                slots[index].put(self._decode_one(index, sources[index]))

        threads = [threading.Thread(target=work, name="siglip-decode", daemon=True) for _ in range(self.workers)]
        for thread in threads:
            thread.start()
        try:
            for index in range(len(sources)):
                item = slots[index].get()
                del slots[index]
                ahead = index + window
                if ahead < len(sources):
                    slots[ahead] = queue.Queue(maxsize=1)
                    todo.put(ahead)
                yield item
        finally:
            for _ in threads:
                todo.put(None)

    # ------------------------------------------------------------------ device side
    def _normalization_table(self) -> torch.Tensor:
        if self._table is None:
            self._table = torch.from_numpy(normalization_table(self.preprocess)).to(self.device)
        return self._table

    def _device_scope(self):
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    @torch.inference_mode()
    def _launch(self, results: list[ImageResult], pixels: list[np.ndarray], pinned: torch.Tensor | None, encode) -> _InFlight:
        """Queue one batch. On CUDA nothing here waits for the GPU."""
        with self._device_scope():
            if pinned is None:
                batch = torch.from_numpy(np.stack(pixels)).to(self.device)
            else:
                host = pinned[: len(pixels)]
                np.stack(pixels, out=host.numpy())
                batch = host.to(self.device, non_blocking=True)
            features = encode(pixels_to_model_input(batch, self._normalization_table())).float()
            if self.device.type != "cuda":
                return _InFlight(results, features.cpu())
            host_out = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
            host_out.copy_(features, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            return _InFlight(results, host_out, done)

    def _pinned_ring(self) -> list[torch.Tensor | None]:
        """Two host buffers on CUDA: one batch in flight, the next one being filled."""
        if self._ring is None:
            pre = self.preprocess
            self._ring = [
                torch.empty((self.batch_size, pre.height, pre.width, 3), dtype=torch.uint8).pin_memory()
                if self.device.type == "cuda" else None
                for _ in range(2)
            ]
        return self._ring

    def embed_pixels(self, frames: list[np.ndarray], encode: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
        """Already decoded uint8 frames through the same device path as `run` (one batch)."""
        results = [ImageResult(i, "") for i in range(len(frames))]
        self._launch(results, frames, self._pinned_ring()[0], encode).collect()
        return np.stack([r.vector for r in results])

    def run(
        self,
        sources: Sequence[Source],
        encode: Callable[[torch.Tensor], torch.Tensor],
        on_progress: Callable[[int], None] | None = None,
    ) -> Iterator[ImageResult]:
        """One ImageResult per source, in input order. `encode` maps normalised pixels
        (N, 3, H, W) on the device to features (N, D)."""
        ring = self._pinned_ring()
        waiting: collections.deque[ImageResult] = collections.deque()
        batch_results: list[ImageResult] = []
        batch_pixels: list[np.ndarray] = []
        in_flight: _InFlight | None = None
        launches = 0
        for decoded in self.decoded(sources):
            result = ImageResult(decoded.index, decoded.name, error=decoded.error)
            waiting.append(result)
            if decoded.pixels is not None:
                batch_results.append(result)
                batch_pixels.append(decoded.pixels)
            if len(batch_pixels) == self.batch_size:
                in_flight = self._advance(in_flight, self._launch(batch_results, batch_pixels, ring[launches % 2], encode))
                launches += 1
                batch_results, batch_pixels = [], []
            yield from _ready(waiting, on_progress)
        if batch_pixels:
            in_flight = self._advance(in_flight, self._launch(batch_results, batch_pixels, ring[launches % 2], encode))
        if in_flight is not None:
            in_flight.collect()
        yield from _ready(waiting, on_progress)

    def _advance(self, previous: _InFlight | None, launched: _InFlight) -> _InFlight | None:
        """On CUDA the new batch stays in flight while the previous one is collected; elsewhere
        the work is already done, so the new batch is collected at once."""
        if previous is not None:
            previous.collect()
        if self.device.type == "cuda":
            return launched
        launched.collect()
        return None


def _ready(waiting: collections.deque, on_progress: Callable[[int], None] | None) -> Iterator[ImageResult]:
    while waiting and waiting[0].ready:
        if on_progress:
            on_progress(1)
        yield waiting.popleft()


def as_sources(images: Iterable[Any]) -> list[Source]:
    """Python API inputs (paths, URLs, bytes, PIL images, uint8 arrays) as named Sources."""
    if isinstance(images, (str, os.PathLike, bytes, bytearray)):
        raise TypeError(
            f"expected a list of images, got a single {type(images).__name__}; wrap it in a list: [{images!r:.60}]"
        )
    sources = []
    for index, image in enumerate(images):
        if isinstance(image, os.PathLike):
            image = os.fspath(image)
        if isinstance(image, str):
            name = image
        elif isinstance(image, (bytes, bytearray, memoryview)):
            name = f"<bytes #{index}>"
        else:
            name = f"<image #{index}>"
        sources.append(Source(name, image))
    return sources
