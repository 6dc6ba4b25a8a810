"""Duplicate groups from embeddings and file contents: levels, the grouping rule, keep rules.

No CLI words here: `cli/dedupe.py` lists and embeds the inputs and prints what this returns.

Levels of a pair (the kept image and one duplicate):
- exact: the same bytes (same size, then the same SHA-256);
- near: cosine >= the near threshold (the same picture re-encoded, resized, lightly edited);
- similar: cosine >= the similar threshold (the same scene; only when asked for).

The grouping rule, "groups, not chains": images are visited best first by the keep rule; an
image not yet in a group starts one and keeps itself, and every image not yet in a group that
is within the threshold of it (or has its bytes) joins as a duplicate. So an image joins a
group only when it is close to that group's kept image: A~B and B~C never glue A and C
together unless A~C. A duplicate is never itself a kept image; each image is in one group.

Videos: one item per video file, its vector the L2-normalised mean of its sampled frames'
embeddings (`mean_vector`), grouped by the same levels, thresholds and rule, but only with
other videos: stills and videos are two separate runs of the rule, so neither is ever set
aside for looking like the other. The mean weighs every sampled frame alike, so two videos
that share an intro (black, a title card) but differ after it are as alike as the share of
their samples the intro takes, not identical as their first frames are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Sequence

import numpy as np

from .embedding import file_hash  # the same SHA-256 that embed --update stamps files with
from .knn import Neighbours
from .results import Duplicate, DuplicateGroup

LEVELS = ("exact", "near", "similar")
# Defaults: see docs/dedupe.md for where each number comes from (Immich's tuned CLIP distances,
# imagededup's and clip-retrieval's defaults) and why a user should check them with --histogram.
NEAR_THRESHOLD = 0.98
SIMILAR_THRESHOLD = 0.90
KEEP_RULES = ("largest", "oldest", "newest", "first")
_EXIF_IFD = 0x8769
_DATETIME_ORIGINAL = 36867
_DATETIME = 306


@dataclass(frozen=True)
class Thresholds:
    near: float = NEAR_THRESHOLD
    similar: float | None = None  # None: the similar level is off

    @property
    def floor(self) -> float:
        return self.similar if self.similar is not None else self.near

    def level(self, cosine: float, same_bytes: bool) -> str | None:
        if same_bytes:
            return "exact"
        if cosine >= self.near:
            return "near"
        if self.similar is not None and cosine >= self.similar:
            return "similar"
        return None


# ============================================================================ exact copies
def exact_classes(paths: Sequence[str], sizes: Sequence[int], on_error: Callable[[str], None] | None = None) -> np.ndarray:
    """A class number per file: equal numbers for the same bytes, -1 for a file without a copy.
    Sizes first: only files that share a size are read (SHA-256), so a library of distinct
    photos is never read twice."""
    by_size: dict[int, list[int]] = {}
    for i, size in enumerate(sizes):
        if size >= 0:
            by_size.setdefault(int(size), []).append(i)
    classes = np.full(len(paths), -1, np.int64)
    next_class = 0
    for members in by_size.values():
        if len(members) < 2:
            continue
        by_digest: dict[bytes, list[int]] = {}
        for i in members:
            try:
                by_digest.setdefault(file_hash(paths[i]), []).append(i)
            except OSError as exc:
                if on_error:
                    on_error(f"{paths[i]}: cannot read ({exc.strerror or exc}); not compared byte for byte")
        for same in by_digest.values():
            if len(same) > 1:
                classes[same] = next_class
                next_class += 1
    return classes


def mean_vector(frames: np.ndarray) -> np.ndarray:
    """A video's vector: the L2-normalised mean of its frames' unit embeddings (each frame made
    unit first, so a store kept unnormalised weighs every frame alike too)."""
    frames = np.asarray(frames, np.float32)
    frames = frames / np.maximum(np.linalg.norm(frames, axis=1, keepdims=True), 1e-12)
    mean = frames.mean(axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


# ============================================================================ keep rules
@dataclass(frozen=True)
class FileFacts:
    """What the keep rules look at."""

    pixels: int  # width x height; 0 when the header cannot be read
    size: int  # bytes
    taken: float  # EXIF DateTimeOriginal as a POSIX time, else the modification time
    stamp: tuple[int, int] = (-1, -1)  # (size, mtime_ns) when scanned: a move skips a file changed since


def _exif_time(image) -> float | None:
    try:
        exif = image.getexif()
        value = exif.get_ifd(_EXIF_IFD).get(_DATETIME_ORIGINAL) or exif.get(_DATETIME)
    except Exception:  # a damaged EXIF block: fall back to the file's time
        return None
    if not isinstance(value, str):
        return None
    try:
        return datetime.strptime(value.strip().rstrip("\x00")[:19], "%Y:%m:%d %H:%M:%S").timestamp()
    except ValueError:
        return None


def file_facts(path: str) -> FileFacts:
    """Pixels and capture time from the image's header (no pixels decoded), bytes and
    modification time from the file. Raises OSError when the file is gone."""
    st = os.stat(path)
    pixels, taken = 0, None
    try:
        from PIL import Image

        with Image.open(path) as image:
            pixels = image.width * image.height
            taken = _exif_time(image)
    except Exception:  # not readable as an image any more: bytes and time still count
        pass
    return FileFacts(pixels, st.st_size, taken if taken is not None else st.st_mtime, (st.st_size, st.st_mtime_ns))


def video_facts(path: str) -> FileFacts:
    """A video's facts for the keep rules: pixels of one frame (from the stream header), bytes,
    and the modification time (a container's creation_time is not read: editors and copies
    rewrite it, and it has no agreed meaning as EXIF DateTimeOriginal has). Raises OSError
    when the file is gone."""
    from .core.video import frame_size

    st = os.stat(path)
    size = frame_size(path)
    pixels = size[0] * size[1] if size else 0
    return FileFacts(pixels, st.st_size, st.st_mtime, (st.st_size, st.st_mtime_ns))


def keep_order(rule: str, candidates: Sequence[int], facts: dict[int, FileFacts]) -> list[int]:
    """`candidates` (input positions) best first by `rule`; ties by input order."""
    if rule == "largest":
        key = lambda i: (-facts[i].pixels, -facts[i].size, i)  # noqa: E731
    elif rule == "oldest":
        key = lambda i: (facts[i].taken, i)  # noqa: E731
    elif rule == "newest":
        key = lambda i: (-facts[i].taken, i)  # noqa: E731
    elif rule == "first":
        key = lambda i: i  # noqa: E731
    else:
        raise ValueError(rule)
    return sorted(candidates, key=key)


# ============================================================================ groups
def candidate_links(count: int, neighbours: Neighbours, classes: np.ndarray, thresholds: Thresholds) -> dict[int, set[int]]:
    """Every image -> the images it may be grouped with (both directions): neighbours at or
    above the lowest threshold in use, and files with the same bytes."""
    links: dict[int, set[int]] = {}
    rows, others, cosines = neighbours.pairs()
    keep = cosines >= thresholds.floor
    for a, b in zip(rows[keep].tolist(), others[keep].tolist()):
        links.setdefault(a, set()).add(b)
        links.setdefault(b, set()).add(a)
    order = np.argsort(classes, kind="stable")
    sorted_classes = classes[order]
    starts = np.flatnonzero(np.r_[True, sorted_classes[1:] != sorted_classes[:-1]])
    for start, stop in zip(starts.tolist(), np.r_[starts[1:], len(order)].tolist()):
        if sorted_classes[start] < 0:
            continue
        members = order[start:stop].tolist()
        for a in members:
            links.setdefault(a, set()).update(m for m in members if m != a)
    return links


def form_groups(
    order: Sequence[int],
    links: dict[int, set[int]],
    rows,
    classes: np.ndarray,
    thresholds: Thresholds,
    names: Sequence[str],
    sizes: dict[int, int],
) -> list[DuplicateGroup]:
    """The grouping rule (module docstring), visiting `order` (best first by the keep rule).
    Cosines are recomputed from the rows for each (kept, duplicate) pair, so every number
    reported is exact whichever neighbour method found the pair."""
    taken: set[int] = set()
    groups: list[DuplicateGroup] = []
    for keeper in order:
        if keeper in taken:
            continue
        taken.add(keeper)
        free = sorted(i for i in links.get(keeper, ()) if i not in taken)
        if not free:
            continue
        kept_row = np.asarray(rows[keeper], dtype=np.float32)
        cosines = np.asarray(rows[free], dtype=np.float32) @ kept_row
        members = []
        for other, cosine in zip(free, cosines.tolist()):
            same = classes[keeper] >= 0 and classes[other] == classes[keeper]
            level = thresholds.level(cosine, same)
            if level is not None:
                members.append((other, level, cosine))
        if not members:
            continue
        members.sort(key=lambda m: (LEVELS.index(m[1]), -m[2], m[0]))
        for other, _, _ in members:
            taken.add(other)
        groups.append(DuplicateGroup(
            len(groups) + 1, names[keeper],
            [Duplicate(names[other], level, cosine, sizes.get(other, -1)) for other, level, cosine in members],
            keep_bytes=sizes.get(keeper, -1),
        ))
    return groups


def nearest_histogram(nearest: np.ndarray, thresholds: Thresholds, bins: int = 20):
    """Every image's nearest-neighbour cosine counted in `bins` equal bins from the lowest
    value (rounded down to 0.05) up to 1."""
    from .results import NeighbourHistogram

    values = nearest[np.isfinite(nearest)].astype(np.float64)
    low = float(np.floor((values.min() if len(values) else 0.0) * 20) / 20)
    low = min(low, thresholds.floor - 0.05)
    edges = np.linspace(low, 1.0, bins + 1)
    counts, _ = np.histogram(np.clip(values, low, 1.0), edges)
    marks = {"near": thresholds.near}
    if thresholds.similar is not None:
        marks["similar"] = thresholds.similar
    return NeighbourHistogram(edges.tolist(), counts.tolist(), marks, int(len(values)))
