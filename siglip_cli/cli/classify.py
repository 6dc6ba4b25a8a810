"""`siglip classify`: images x labels -> SigLIP's per-label scores, image by image.

A video gives one record per sampled frame (its name ends in `#t=SECONDS`), then one summary
record: each label's best frame and its time, and with --threshold the time ranges where the
label stays at or above it (runs of consecutive samples).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

from ..core.scoring import rank
from ..results import ImageScores, LabelOverTime, LabelScore, VideoSummary
from ..sources import Listing


def classify(
    engine,
    listing: Listing,
    labels: Sequence[str],
    templates: Sequence[str],
    use_softmax: bool = False,
    top_k: int | None = None,
    threshold: float | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Iterator[ImageScores | VideoSummary]:
    """One ImageScores per input (per frame for a video, then its VideoSummary), in input
    order: labels best first (cut by top-k and threshold), or the error that kept the input out."""
    text = engine.label_embeddings(labels, templates) if listing.sources else None
    images = engine.iter_image_features(listing.sources, on_progress=on_progress) if listing.sources else []
    video = _VideoScores(labels, top_k, threshold)
    for failure, item in listing.in_order(images):
        if item is None or item.index != video.index:
            yield from video.summary()
        if failure is not None:
            yield ImageScores(path=failure.name, error=failure.error)
            continue
        if item.error is not None:
            yield ImageScores(path=item.name, error=item.error, time=item.time)
            continue
        logit_row = engine.logits(item.vector[None, :], text)
        probs = engine.probabilities(logit_row, use_softmax)[0]
        if item.time >= 0:
            video.add(item.index, item.name, item.time, probs)
        yield ImageScores(
            path=item.name,
            labels=[LabelScore(labels[i], float(probs[i]), float(logit_row[0, i])) for i in rank(probs, top_k, threshold)],
            time=item.time,
        )
    yield from video.summary()


class _VideoScores:
    """The scores of the current video's frames, summarised when its frames end."""

    def __init__(self, labels: Sequence[str], top_k: int | None, threshold: float | None):
        self.labels, self.top_k, self.threshold = list(labels), top_k, threshold
        self.index: int | None = None
        self.path = ""
        self.times: list[float] = []
        self.scores: list[np.ndarray] = []

    def add(self, index: int, frame_name: str, seconds: float, probs: np.ndarray) -> None:
        if index != self.index:
            self.index, self.times, self.scores = index, [], []
            self.path = frame_name.rpartition("#t=")[0]
        self.times.append(seconds)
        self.scores.append(np.asarray(probs, dtype=np.float64))

    def summary(self) -> Iterator[VideoSummary]:
        if self.scores:
            yield summarize(self.path, self.times, np.stack(self.scores), self.labels, self.top_k, self.threshold)
        self.index, self.times, self.scores = None, [], []


def summarize(path: str, times: Sequence[float], scores: np.ndarray, labels: Sequence[str], top_k: int | None,
              threshold: float | None) -> VideoSummary:
    """(frames, labels) scores -> each label's best frame and its runs at or above `threshold`."""
    best_rows = scores.argmax(axis=0)
    best = scores.max(axis=0)
    items = []
    for column in rank(best, top_k, threshold):
        ranges = None
        if threshold is not None:
            ranges, start, previous = [], None, None
            for seconds, above in zip(times, scores[:, column] >= threshold):
                if above and start is None:
                    start = seconds
                if not above and start is not None:
                    ranges.append((start, previous))
                    start = None
                previous = seconds
            if start is not None:
                ranges.append((start, previous))
        items.append(LabelOverTime(labels[column], float(best[column]), float(times[best_rows[column]]), ranges))
    return VideoSummary(path, len(times), items)
