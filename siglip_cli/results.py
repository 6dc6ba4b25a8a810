"""Plain results the commands return and `cli/render.py` prints (no torch objects here).

Floats stay full precision; rounding for output happens in one place, the renderer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class LabelScore:
    label: str
    score: float
    logit: float


@dataclass
class ImageScores:
    """`classify`: one image's scores, labels best first; or the error that kept it out."""

    path: str
    labels: list[LabelScore] = field(default_factory=list)
    error: str | None = None
    actions: list["FileAction"] = field(default_factory=list)  # --sort-into, --write-xmp
    time: float = -1.0  # a video frame's time in seconds (path ends in #t=...); -1 for a still

    def to_record(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        record = {"path": self.path, "labels": [vars(s) for s in self.labels]}
        if self.time >= 0:
            record = {"path": self.path, "time": self.time, "labels": record["labels"]}
        if self.actions:
            record["actions"] = [a.to_record() for a in self.actions]
        return record


@dataclass
class LabelOverTime:
    """One label across a video's sampled frames."""

    label: str
    score: float  # the best frame's score
    time: float  # that frame's time, seconds
    ranges: list[tuple[float, float]] | None = None  # (first, last) frame times of each run of
    # consecutive samples scoring at least --threshold; None without --threshold

    def to_record(self) -> dict:
        record = {"label": self.label, "score": self.score, "time": self.time}
        if self.ranges is not None:
            record["ranges"] = [list(r) for r in self.ranges]
        return record


@dataclass
class VideoSummary:
    """`classify` on a video: each label's best frame and the time ranges above --threshold,
    labels best first (cut by --top-k and --threshold)."""

    path: str
    frames: int
    labels: list[LabelOverTime] = field(default_factory=list)
    error: str | None = None  # always None: a fault is its own error record; kept for renderers
    actions: list["FileAction"] = field(default_factory=list)  # --sort-into, --write-xmp act on the video

    def to_record(self) -> dict:
        record = {"path": self.path, "summary": "video", "frames": self.frames, "labels": [item.to_record() for item in self.labels]}
        if self.actions:
            record["actions"] = [a.to_record() for a in self.actions]
        return record


@dataclass
class Item:
    """An input of `similarity`: an image (by path) or a text."""

    name: str
    kind: str  # image | text


@dataclass
class SimilarityCell:
    row: Item
    col: Item
    cosine: float
    logit: float | None = None  # image-text pairs only
    probability: float | None = None

    def to_record(self) -> dict:
        record = {"row": self.row.name, "row_kind": self.row.kind, "col": self.col.name, "col_kind": self.col.kind, "cosine": self.cosine}
        if self.logit is not None:
            record["logit"], record["probability"] = self.logit, self.probability
        return record


@dataclass
class InputFailure:
    """An input that could not be read; printed as an error record."""

    path: str
    error: str

    def to_record(self) -> dict:
        return {"path": self.path, "error": self.error}


@dataclass
class SimilarityMatrix:
    """`similarity`: the cosine of every row with every column, and the SigLIP probability of
    each image-text pair. Holds the (normalised) vectors and computes cells on demand, so JSON
    lines stream row by row without a full matrix in memory."""

    rows: list[Item]
    cols: list[Item]
    row_vectors: Any  # np.ndarray (R, D)
    col_vectors: Any  # np.ndarray (C, D)
    images: list[Item]
    texts: list[Item]
    image_vectors: Any
    text_vectors: Any
    scale: float  # exp(logit_scale)
    bias: float

    @property
    def cosine(self) -> list[list[float]]:
        return (self.row_vectors @ self.col_vectors.T).tolist()

    def _pair_logits(self):
        return (self.image_vectors @ self.text_vectors.T) * self.scale + self.bias

    @property
    def pair_logits(self) -> list[list[float]]:
        return self._pair_logits().tolist()

    @property
    def pair_probabilities(self) -> list[list[float]]:
        import numpy as np

        return (1.0 / (1.0 + np.exp(-self._pair_logits().astype(np.float64)))).tolist()

    def cells(self):
        import math

        image_pos = {id(item): p for p, item in enumerate(self.images)}
        text_pos = {id(item): q for q, item in enumerate(self.texts)}
        for a, row in enumerate(self.rows):
            cosines = (self.col_vectors @ self.row_vectors[a]).tolist()
            for b, col in enumerate(self.cols):
                cell = SimilarityCell(row, col, cosines[b])
                if row.kind != col.kind:
                    image, text = (row, col) if row.kind == "image" else (col, row)
                    p, q = image_pos[id(image)], text_pos[id(text)]
                    cosine = float(self.image_vectors[p] @ self.text_vectors[q])
                    cell.logit = cosine * self.scale + self.bias
                    cell.probability = 1.0 / (1.0 + math.exp(-cell.logit)) if cell.logit > -700 else 0.0
                yield cell

    def to_record(self) -> dict:
        logits, probabilities = self.pair_logits, self.pair_probabilities
        return {
            "rows": [vars(item) for item in self.rows],
            "cols": [vars(item) for item in self.cols],
            "cosine": self.cosine,
            "pairs": [
                {"image": image.name, "text": text.name, "logit": logits[p][q], "probability": probabilities[p][q]}
                for p, image in enumerate(self.images)
                for q, text in enumerate(self.texts)
            ],
        }


@dataclass
class EmbeddingRow:
    """`embed --format jsonl`: one row on stdout."""

    kind: str
    name: str
    embedding: list[float]
    time: float = -1.0  # a video frame's time in seconds; -1 for a still

    def to_record(self) -> dict:
        record = {"kind": self.kind, "path" if self.kind == "image" else "text": self.name, "embedding": self.embedding}
        if self.time >= 0:
            record["time"] = self.time
        return record


@dataclass
class BenchRow:
    """`bench`: one (dtype, tower, batch size, backend) measurement, or why it has none."""

    model: str
    weights: str
    device: str
    dtype: str
    attn: str
    tower: str
    batch_size: int
    status: str = "ok"  # ok | unavailable | failed
    reason: str | None = None
    items_per_s: float | None = None
    ms_per_batch: float | None = None
    ms_min: float | None = None
    ms_max: float | None = None
    runs: int = 0
    speedup_vs_eager: float | None = None
    max_abs_diff_vs_eager: float | None = None
    peak_mem_mb: float | None = None
    peak_mem_kind: str | None = None
    tflops: float | None = None
    pct_of_peak: float | None = None
    ours_sdpa_speedup: float | None = None  # transformers rows: our sdpa's speed / theirs
    max_patches: int | None = None  # SigLIP 2 NaFlex: the patch budget each image fills
    cpu_features: list[str] | None = None  # the speed-relevant CPU flags present (avx2, avx512*, amx*)
    dtype_auto: str | None = None  # set on rows of the dtype `--dtype auto` picks here: why

    def to_record(self) -> dict:
        return dict(vars(self))


@dataclass
class SearchHit:
    path: str  # the image's path, or the text of a text row
    score: float | None  # SigLIP's sigmoid probability; None for image-image and text-text pairs
    cosine: float
    rank: int  # place in the query's ranking, from 1
    kind: str = "image"  # the row's kind
    time: float = -1.0  # a video frame's time in seconds (path ends in #t=...); -1 for a still

    def to_record(self) -> dict:
        record = {"path": self.path, "score": self.score, "cosine": self.cosine, "rank": self.rank, "kind": self.kind}
        if self.time >= 0:
            record["time"] = self.time
        return record


@dataclass
class SearchResult:
    """`search`: one query's ranking, best first; or the error that kept the query out."""

    query: str
    hits: list[SearchHit] = field(default_factory=list)
    error: str | None = None
    kind: str = "text"  # the query's kind
    threshold: float | None = None  # the --threshold the hits were cut by, if any

    def to_record(self) -> dict:
        if self.error is not None:
            return {"query": self.query, "error": self.error}
        return {"query": self.query, "results": [h.to_record() for h in self.hits]}


@dataclass
class StoreFile:
    path: str
    bytes: int


@dataclass
class IndexInfo:
    """`info`: what an index holds and how it was made, from its meta and its files."""

    path: str
    format: str  # npy | npz | jsonl | parquet
    files: list[StoreFile]
    bytes: int  # all its files together
    model: str | None
    revision: str | None
    model_dtype: str | None
    decode: str | None
    max_patches: int | None  # SigLIP 2 NaFlex only
    normalized: bool | None
    templates: list[str]
    image_rows: int
    text_rows: int
    dim: int
    dtype: str  # of the stored rows
    paths: str  # absolute | relative | mixed | none: how its image rows name their files
    skipped: list[dict]  # {path, error} of every input left out
    created: str | None
    partial: str | None = None  # an interrupted run's folder beside it

    def to_record(self) -> dict:
        record = dict(vars(self))
        record["files"] = [vars(f) for f in self.files]
        record["rows"] = {"image": self.image_rows, "text": self.text_rows}
        del record["image_rows"], record["text_rows"]
        return record


@dataclass
class FileAction:
    """What `classify --sort-into` / `--write-xmp` did (or, with `planned`, would do) for one image:
    `action` copy, move, link or xmp; `destination` the file written; `method` how (rename,
    copy+delete, hardlink, symlink; merged or new for a sidecar); `skipped` why nothing was done;
    `label` the label whose folder a sort put it in (None for _unsorted and for sidecars)."""

    action: str
    destination: str | None = None
    method: str = ""
    planned: bool = False
    skipped: str | None = None
    label: str | None = None

    def to_record(self) -> dict:
        record = {"action": self.action, "destination": self.destination}
        if self.label is not None:
            record["label"] = self.label
        if self.method:
            record["method"] = self.method
        if self.planned:
            record["planned"] = True
        if self.skipped is not None:
            record["skipped"] = self.skipped
        return record


@dataclass
class Duplicate:
    path: str
    level: str  # exact | near | similar
    cosine: float  # with the group's kept image
    size: int = -1  # bytes; -1 when unknown
    destination: str | None = None  # --move-to: where it went (or, with `planned`, would go)
    planned: bool = False  # --dry-run

    def to_record(self) -> dict:
        record = {"path": self.path, "level": self.level, "cosine": self.cosine}
        if self.destination is not None:
            record["would_move_to" if self.planned else "moved_to"] = self.destination
        return record


@dataclass
class DuplicateGroup:
    """`dedupe`: one kept image and its duplicates (exact first, then by cosine)."""

    group: int
    keep: str
    duplicates: list[Duplicate] = field(default_factory=list)
    keep_bytes: int = -1

    def to_record(self) -> dict:
        return {"group": self.group, "keep": self.keep, "duplicates": [d.to_record() for d in self.duplicates]}


@dataclass
class NeighbourHistogram:
    """`dedupe --histogram`: every image's nearest-neighbour cosine, counted in bins."""

    edges: list[float]  # bins + 1 edges, ascending
    counts: list[int]
    thresholds: dict[str, float]  # level -> cosine
    images: int
