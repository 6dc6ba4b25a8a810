"""Micro-batching: images of concurrent requests gathered into one forward pass.

Request threads decode their own uploads (Pillow releases the GIL, so decoding runs in
parallel) and hand the uint8 pixels to `MicroBatcher.submit`, which returns a Future. One
model thread takes the first waiting image, waits at most `window` seconds for more (never past
`batch_size`), and runs them through the vision tower at once: many single-image clients
together get the throughput of `siglip embed`'s batches. The queue is bounded: past
`queue_size` waiting images `submit` raises `Busy` (the server answers 503 with Retry-After)
instead of holding unbounded memory.

Images of one batch share the same device path as `siglip embed` (`ImagePipeline.embed_pixels`),
so a row does not depend on which requests happened to share its batch beyond the float
rounding of a different batch size.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable


_STOP = object()  # put by close(): the model thread ends after the jobs before it


class Busy(Exception):
    """The queue is full: try again shortly."""


@dataclass
class _Job:
    pixels: Any  # uint8 (H, W, 3), or NaFlex `Patches`
    normalized: bool
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """`run_batch(frames, normalized) -> (N, D) float32 array` is called on one thread only."""

    def __init__(self, run_batch: Callable[[list, bool], Any], batch_size: int, window: float = 0.005, queue_size: int = 256):
        self.run_batch = run_batch
        self.batch_size = max(1, batch_size)
        self.window = window
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._held: collections.deque[_Job] = collections.deque()  # taken, but of the other kind
        self.batches = 0  # forward passes run, and images through them: for /v1/info and the tests
        self.images = 0
        self._thread = threading.Thread(target=self._loop, name="siglip-batcher", daemon=True)
        self._thread.start()

    def submit(self, pixels, normalized: bool = True) -> Future:
        job = _Job(pixels, normalized)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Busy() from None
        return job.future

    def embed(self, pixels, normalized: bool = True, timeout: float | None = None):
        """One image's feature vector (blocking)."""
        return self.submit(pixels, normalized).result(timeout)

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + len(self._held)

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the model thread
    def _next(self, timeout: float | None) -> _Job | None:
        if self._held:
            return self._held.popleft()
        try:
            return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _gather(self, first: _Job) -> list[_Job]:
        """`first` and whatever of its kind arrives within the window, at most a batch."""
        jobs, others = [first], []
        deadline = time.monotonic() + self.window
        while len(jobs) < self.batch_size:
            job = self._next(deadline - time.monotonic())
            if job is None:
                break
            if job is _STOP:
                others.append(job)
                break
            (jobs if job.normalized == first.normalized else others).append(job)
        self._held.extend(others)
        return jobs

    def _loop(self) -> None:
        while True:
            first = self._next(None)
            if first is _STOP:
                return
            jobs = self._gather(first)
            try:
                vectors = self.run_batch([job.pixels for job in jobs], first.normalized)
            except BaseException as exc:  # a failed batch fails its requests, never the thread
                for job in jobs:
                    job.future.set_exception(exc)
                continue
            self.batches += 1
            self.images += len(jobs)
            for job, vector in zip(jobs, vectors):
                job.future.set_result(vector)

