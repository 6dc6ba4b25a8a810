"""Image sources -> decoded pixels (threads, ahead of the model) -> device batches -> features.

Two layouts, chosen from the model: `SquareImages` (SigLIP, fixed-resolution SigLIP 2) resizes
every image to the model's square and batches (B, H, W, 3); `PatchSequences` (SigLIP 2 NaFlex)
cuts each image into as many patches as its aspect ratio and the budget give, and batches
them padded to the longest image in the batch, with a mask of the real patches and each
image's grid. The model gets a typed batch (`PixelBatch` or `PatchBatch`) and unpacks its
`model_inputs()`; nothing downstream asks which kind it is.

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
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .core.config import PreprocessConfig, VisionConfig
from .core.errors import InputError
from .core.images import (
    DRAFT_GAP,
    DecodeOptions,
    Patches,
    load_patches,
    load_pixels,
    normalization_table,
    normalize_channels_last,
    pixels_to_model_input,
)
from .core.video import VideoSampling, frame_name, is_video_name, looks_like_video, sample_frames
from .sources import Source
from .urls import DEFAULT_URL_MAX_BYTES, DEFAULT_URL_TIMEOUT, fetch_url, is_url

DEFAULT_BATCH = {"cuda": 128, "mps": 32, "cpu": 16}
DECODER_STOP_WAIT = 2.0  # seconds an abandoned run waits for its decoders to finish the image in hand


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
    """One source after the CPU's share of the work: uint8 pixels (NaFlex: `Patches`), or why
    there are none."""

    index: int
    name: str
    pixels: np.ndarray | Patches | None = None
    error: str | None = None
    time: float = -1.0  # a video frame's time in seconds; -1 for a still image


_END = object()  # a source's last item has been queued


@dataclass
class PixelBatch:
    """Fixed resolution: normalised pixels (B, 3, H, W) on the device."""

    pixels: torch.Tensor

    def model_inputs(self) -> tuple:
        return (self.pixels,)


@dataclass
class PatchBatch:
    """NaFlex: normalised patches (B, N, p*p*3) on the device, padded to the longest image of the
    batch; the mask (B, N) of real patches, on the device; each image's (rows, columns) of
    patches (B, 2), on the host, where the position tables are resized without waiting for the
    device."""

    patches: torch.Tensor
    mask: torch.Tensor
    spatial_shapes: torch.Tensor

    def model_inputs(self) -> tuple:
        return (self.patches, self.mask, self.spatial_shapes)


class SquareImages:
    """Fixed resolution: each image resized to the model's square, uint8 (H, W, 3)."""

    def __init__(self, preprocess: PreprocessConfig):
        self.preprocess = preprocess

    def prepare(self, value: Any, name: str, options: DecodeOptions) -> np.ndarray:
        return load_pixels(value, name, self.preprocess, options)

    def host_buffer(self, batch_size: int) -> torch.Tensor:
        return torch.empty((batch_size, self.preprocess.height, self.preprocess.width, 3), dtype=torch.uint8)

    def collate(self, items: list[np.ndarray], buffer: torch.Tensor | None) -> tuple:
        if buffer is None:
            return (torch.from_numpy(np.stack(items)),)
        host = buffer[: len(items)]
        np.stack(items, out=host.numpy())
        return (host,)

    def to_device(self, host: tuple, device: torch.device, table: torch.Tensor) -> PixelBatch:
        return PixelBatch(pixels_to_model_input(host[0].to(device, non_blocking=True), table))


class PatchSequences:
    """SigLIP 2 NaFlex: each image as its own number of patches (at most the budget), uint8
    (n, p*p*3); a batch is padded to its longest image, so the padding an image gets, and with
    the mask its result, does not depend on its neighbours."""

    def __init__(self, preprocess: PreprocessConfig, vision: VisionConfig):
        self.preprocess = preprocess
        self.patch_size = vision.patch_size
        self.patch_values = vision.patch_values

    def prepare(self, value: Any, name: str, options: DecodeOptions) -> Patches:
        return load_patches(value, name, self.preprocess, self.patch_size, options)

    def host_buffer(self, batch_size: int) -> torch.Tensor:
        return torch.empty(batch_size * self.preprocess.max_num_patches * self.patch_values, dtype=torch.uint8)

    def collate(self, items: list[Patches], buffer: torch.Tensor | None) -> tuple:
        batch, longest = len(items), max(item.values.shape[0] for item in items)
        shape = (batch, longest, self.patch_values)
        host = torch.empty(shape, dtype=torch.uint8) if buffer is None else buffer[: math.prod(shape)].view(shape)
        values = host.numpy()
        mask = torch.zeros((batch, longest), dtype=torch.bool)
        for row, item in enumerate(items):
            count = item.values.shape[0]
            values[row, :count] = item.values  # the rest is padding, masked; its bytes never matter
            mask[row, :count] = True
        return host, mask, torch.tensor([item.grid for item in items], dtype=torch.long)

    def to_device(self, host: tuple, device: torch.device, table: torch.Tensor) -> PatchBatch:
        values, mask, grids = host
        patches = normalize_channels_last(values.to(device, non_blocking=True), table)
        return PatchBatch(patches, mask.to(device, non_blocking=True), grids)


def image_layout(preprocess: PreprocessConfig, vision: VisionConfig | None) -> SquareImages | PatchSequences:
    return PatchSequences(preprocess, vision) if vision is not None and vision.naflex else SquareImages(preprocess)


@dataclass
class ImageResult:
    """One source after the model: its feature vector (float32), or why it has none."""

    index: int  # the source's position; a video's frames (and its error, if any) share it
    name: str
    vector: np.ndarray | None = None
    error: str | None = None
    time: float = -1.0  # a video frame's time in seconds (its name ends in #t=...); -1 for a still

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


def _failure(name: str, exc: Exception) -> str:
    """The one line a source that cannot be decoded gets."""
    if isinstance(exc, InputError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return f"{name}: too large to decode in memory"
    return f"{name}: cannot read ({type(exc).__name__}: {exc})"


@dataclass
class ImagePipeline:
    preprocess: PreprocessConfig
    device: torch.device
    batch_size: int
    workers: int
    decode_options: DecodeOptions = DecodeOptions()
    fetch_options: FetchOptions = FetchOptions()
    vision: VisionConfig | None = None  # the model's vision config; NaFlex picks the patch layout
    video: VideoSampling = VideoSampling()  # which frames of a video become inputs
    _table: torch.Tensor | None = field(default=None, repr=False)
    _ring: list | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.layout = image_layout(self.preprocess, self.vision)

    # ------------------------------------------------------------------ CPU side
    def load(self, source: Source) -> np.ndarray | Patches:
        value = source.value
        if isinstance(value, str) and is_url(value):
            value = fetch_url(value, self.fetch_options.timeout, self.fetch_options.max_bytes)
        return self.layout.prepare(value, source.name, self.decode_options)

    def _decode_one(self, index: int, source: Source) -> Decoded:
        try:
            return Decoded(index, source.name, pixels=self.load(source))
        except Exception as exc:  # an odd file must not stop a batch job: report it and go on
            return Decoded(index, source.name, error=_failure(source.name, exc))

    @staticmethod
    def _readable(source: Source) -> bool:
        """A local file, or bytes held in memory (an upload to `siglip serve`): what a video can be."""
        value = source.value
        return isinstance(value, (bytes, bytearray)) or isinstance(value, str) and not is_url(value)

    def _is_video(self, source: Source) -> bool:
        if isinstance(source.value, (bytes, bytearray)):
            return is_video_name(source.name)  # an upload: its file name's suffix
        return self._readable(source) and is_video_name(source.value)

    def _decode_items(self, index: int, source: Source, video: VideoSampling | None = None) -> Iterator[Decoded]:
        """What one source gives: an image (or its error); a video's sampled frames, then the
        error that ended them, if any. A file whose suffix says image but whose bytes say video
        is read as a video. `video`: this call's sampling instead of the pipeline's."""
        if not self._is_video(source):
            item = self._decode_one(index, source)
            if item.error is None or not (self._readable(source) and looks_like_video(source.value)):
                yield item
                return
        yield from self._video_frames(index, source, video or self.video)

    def _video_frames(self, index: int, source: Source, video: VideoSampling) -> Iterator[Decoded]:
        draft = None
        if self.decode_options.draft_jpeg and isinstance(self.layout, SquareImages) and self.preprocess.do_resize:
            draft = (DRAFT_GAP * self.preprocess.width, DRAFT_GAP * self.preprocess.height)
        try:
            for frame in sample_frames(source.value, source.name, video, self.decode_options.max_pixels, draft):
                name = frame_name(source.name, frame.time)
                try:
                    pixels = self.layout.prepare(frame.image, name, self.decode_options)
                except InputError as exc:
                    yield Decoded(index, name, error=str(exc), time=frame.time)
                    continue
                yield Decoded(index, name, pixels=pixels, time=frame.time)
        except Exception as exc:  # an odd file must not stop a batch job: report it and go on
            yield Decoded(index, source.name, error=_failure(source.name, exc))

    def decoded(self, sources: Sequence[Source], video: VideoSampling | None = None) -> Iterator[Decoded]:
        """Every source decoded, in input order, up to a window of sources ahead of the
        consumer. A video streams its frames through a small queue of its own, so memory holds
        a few frames per video, never a whole video. `video`: the sampling of this call (a
        served request's), else the pipeline's."""
        if self.workers <= 0:
            for index, source in enumerate(sources):
                yield from self._decode_items(index, source, video)
            return
        window = max(2 * self.batch_size, 4 * self.workers)
        todo: queue.Queue = queue.Queue()
        slots: dict[int, queue.Queue] = {}
        for index in range(min(window, len(sources))):
            slots[index] = queue.Queue(maxsize=4)
            todo.put(index)

        stopped = threading.Event()  # the consumer left: a worker must not wait on a full slot forever

        def put(slot: queue.Queue, item) -> bool:
            while not stopped.is_set():
                try:
                    slot.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            while True:
                index = todo.get()
                if index is None:
                    return
                items = self._decode_items(index, sources[index], video)
                for item in items:
                    if not put(slots[index], item):
                        items.close()  # a video's file is closed now, not when collected
                        return
                put(slots[index], _END)

        threads = [threading.Thread(target=work, name="siglip-decode", daemon=True) for _ in range(self.workers)]
        for thread in threads:
            thread.start()
        interrupted = False
        try:
            for index in range(len(sources)):
                slot = slots[index]
                item = slot.get()
                ahead = index + window
                if ahead < len(sources):
                    slots[ahead] = queue.Queue(maxsize=4)
                    todo.put(ahead)
                while item is not _END:
                    yield item
                    item = slot.get()
                del slots[index]
        except KeyboardInterrupt:
            interrupted = True  # Ctrl-C ends the process at once (os._exit): nothing to wait for
            raise
        finally:
            # Stop the decoders, and wait (briefly) for those still decoding: a daemon thread
            # that is inside Pillow or numpy when the interpreter shuts down is ended with
            # pthread_exit, which aborts the process through C++ frames (exit 134). A decoder
            # stuck on a slow URL is not waited for long: its read times out on its own.
            stopped.set()
            for _ in threads:
                todo.put(None)
            deadline = time.monotonic() + (0.0 if interrupted else DECODER_STOP_WAIT)
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ device side
    def _normalization_table(self) -> torch.Tensor:
        if self._table is None:
            self._table = torch.from_numpy(normalization_table(self.preprocess)).to(self.device)
        return self._table

    def _device_scope(self):
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    @torch.inference_mode()
    def _launch(self, results: list[ImageResult], items: list, pinned: torch.Tensor | None, encode) -> _InFlight:
        """Queue one batch. On CUDA nothing here waits for the GPU."""
        with self._device_scope():
            host = self.layout.collate(items, pinned)
            batch = self.layout.to_device(host, self.device, self._normalization_table())
            features = encode(batch).float()
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
            self._ring = [
                self.layout.host_buffer(self.batch_size).pin_memory() if self.device.type == "cuda" else None
                for _ in range(2)
            ]
        return self._ring

    def embed_pixels(self, frames: list, encode: Callable[[Any], torch.Tensor]) -> np.ndarray:
        """Already prepared frames (uint8 pixels, or NaFlex `Patches`) through the same device path
        as `run` (one batch)."""
        results = [ImageResult(i, "") for i in range(len(frames))]
        self._launch(results, frames, self._pinned_ring()[0], encode).collect()
        return np.stack([r.vector for r in results])

    def run(
        self,
        sources: Sequence[Source],
        encode: Callable[[Any], torch.Tensor],
        on_progress: Callable[[int], None] | None = None,
    ) -> Iterator[ImageResult]:
        """One ImageResult per source, in input order. `encode` maps a batch on the device
        (`PixelBatch` or `PatchBatch`) to features (N, D)."""
        ring = self._pinned_ring()
        waiting: collections.deque[ImageResult] = collections.deque()
        batch_results: list[ImageResult] = []
        batch_pixels: list[np.ndarray] = []
        in_flight: _InFlight | None = None
        launches = 0
        counted = [None]
        for decoded in self.decoded(sources):
            result = ImageResult(decoded.index, decoded.name, error=decoded.error, time=decoded.time)
            waiting.append(result)
            if decoded.pixels is not None:
                batch_results.append(result)
                batch_pixels.append(decoded.pixels)
            if len(batch_pixels) == self.batch_size:
                in_flight = self._advance(in_flight, self._launch(batch_results, batch_pixels, ring[launches % 2], encode))
                launches += 1
                batch_results, batch_pixels = [], []
            yield from _ready(waiting, on_progress, counted)
        if batch_pixels:
            in_flight = self._advance(in_flight, self._launch(batch_results, batch_pixels, ring[launches % 2], encode))
        if in_flight is not None:
            in_flight.collect()
        yield from _ready(waiting, on_progress, counted)

    def _advance(self, previous: _InFlight | None, launched: _InFlight) -> _InFlight | None:
        """On CUDA the new batch stays in flight while the previous one is collected; elsewhere
        the work is already done, so the new batch is collected at once."""
        if previous is not None:
            previous.collect()
        if self.device.type == "cuda":
            return launched
        launched.collect()
        return None


def _ready(waiting: collections.deque, on_progress: Callable[[int], None] | None, counted: list) -> Iterator[ImageResult]:
    """Finished results from the front; progress counts sources (a video's frames count once:
    `counted` holds the index of the source counted last)."""
    while waiting and waiting[0].ready:
        result = waiting.popleft()
        if on_progress and result.index != counted[0]:
            counted[0] = result.index
            on_progress(1)
        yield result


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
