"""Nearest neighbours of every row among the others (a self-join): THE neighbour module.

Two ways, one call (`self_neighbours`), the choice made here only:

- exact: blocked matrix products. A block of QUERY_BLOCK rows is multiplied with
  COLUMN_BLOCK rows at a time; each row keeps its best `k` at or above a floor, and its single
  nearest neighbour (for `dedupe --histogram`). Memory is the rows once plus one
  QUERY_BLOCK x COLUMN_BLOCK block of scores, whatever the number of rows. The work is N^2 * D:
  on a 2-core EPYC (~110 GFLOP/s fp32 through numpy's BLAS) 25,000 x 768 rows take ~9 s,
  100,000 rows would take ~140 s (benchmarks/dedupe_knn.py, docs/dedupe.md).
- approximate: an inverted-file index from faiss (the optional extra `[ann]`), above
  EXACT_MAX_ROWS. Built once from the rows, saved beside the store (`<store>.faiss`, with a `.json` that
  names the store's meta it was built from) and reused while the store is unchanged; rebuilt
  when the store changed. No hand-written approximate index.

Whichever way: a row whose `k` neighbours are all at or above the floor may have more; those
rows are asked again exactly with a larger `k` (one row against all, cheap), so a group of
many copies is never cut at `k`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .core.errors import BackendUnavailable, UsageError
from .safefiles import atomic_write_text, read_regular

EXACT_MAX_ROWS = 25_000  # above this, the approximate index (when faiss is installed)
QUERY_BLOCK = 512
COLUMN_BLOCK = 16_384  # 512 x 16,384 float32 scores = 32 MB
REFINE_BLOCK = 256  # saturated rows asked again this many at a time
SEARCH_BLOCK = 2048  # index queries per call: their neighbours' rows are gathered (2048 x 17 x D floats)
INDEX_SUFFIX = ".faiss"
INDEX_VERSION = 2
TRAIN_PER_CELL = 40  # k-means sample rows per cell (faiss asks for at least 39)
KMEANS_ITERATIONS = 10
NPROBE = 6  # cells searched per row
METHODS = ("auto", "exact", "approximate")


@dataclass
class Neighbours:
    """Per row: its best `k` other rows at or above the floor, best first (padded with -1 and
    -inf), and the cosine of its nearest other row, whatever it is (-inf with a single row)."""

    indices: np.ndarray  # (N, k) int64
    cosines: np.ndarray  # (N, k) float32
    nearest: np.ndarray  # (N,) float32
    method: str  # exact | approximate

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, neighbour, cosine) of every kept entry."""
        rows, slots = np.nonzero(self.indices >= 0)
        return rows, self.indices[rows, slots], self.cosines[rows, slots]


def ann_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def choose_method(method: str, count: int) -> str:
    if method not in METHODS:
        raise UsageError(f"--neighbours {method}: choose auto, exact or approximate")
    if method == "auto":
        return "approximate" if count > EXACT_MAX_ROWS and ann_available() else "exact"
    if method == "approximate" and not ann_available():
        raise BackendUnavailable("the approximate neighbour index needs faiss: pip install 'siglip-cli[ann]'")
    return method


def self_neighbours(
    rows: np.ndarray,
    k: int,
    floor: float = -1.0,
    method: str = "auto",
    index_path: Path | None = None,
    store_identity: str | None = None,
    note: Callable[[str], None] | None = None,
) -> Neighbours:
    """For every row of `rows` (N, D), L2-normalised, its best `k` other rows with a cosine of
    at least `floor`, and its nearest other row. `index_path`: where the approximate index is
    saved and looked for, tied to `store_identity` (rebuilt when that differs)."""
    count = len(rows)
    chosen = choose_method(method, count)
    if count > EXACT_MAX_ROWS and chosen == "exact" and method == "auto" and note:
        note(f"{count:,} rows: exact neighbours take a while; pip install 'siglip-cli[ann]' for the approximate index")
    if chosen == "exact":
        found = exact_neighbours(rows, k, floor)
    else:
        found = approximate_neighbours(rows, k, floor, index_path, store_identity, note)
    refine_saturated(rows, found, floor)
    return found


# ============================================================================ exact
def _as_float32(block: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(block, dtype=np.float32)


def exact_neighbours(rows: np.ndarray, k: int, floor: float = -1.0) -> Neighbours:
    count = len(rows)
    indices = np.full((count, k), -1, np.int64)
    cosines = np.full((count, k), -np.inf, np.float32)
    nearest = np.full(count, -np.inf, np.float32)
    for q0 in range(0, count, QUERY_BLOCK):
        queries = _as_float32(rows[q0 : q0 + QUERY_BLOCK])
        q1 = q0 + len(queries)
        best_rows, best_cos = indices[q0:q1], cosines[q0:q1]
        for c0 in range(0, count, COLUMN_BLOCK):
            columns = _as_float32(rows[c0 : c0 + COLUMN_BLOCK])
            scores = queries @ columns.T
            _mask_self(scores, q0, c0)
            np.maximum(nearest[q0:q1], scores.max(axis=1), out=nearest[q0:q1])
            _merge_block(scores, c0, best_rows, best_cos, k, floor)
    return Neighbours(indices, cosines, nearest, "exact")


def _mask_self(scores: np.ndarray, q0: int, c0: int) -> None:
    """A row is not its own neighbour: its cell in this block (if any) is set to -inf."""
    rows = np.arange(q0, q0 + scores.shape[0])
    inside = (rows >= c0) & (rows < c0 + scores.shape[1])
    scores[np.flatnonzero(inside), rows[inside] - c0] = -np.inf


def _mask_rows(scores: np.ndarray, rows: np.ndarray, c0: int) -> None:
    """Each of `rows` (the queries of `scores`) is not its own neighbour."""
    inside = (rows >= c0) & (rows < c0 + scores.shape[1])
    scores[np.flatnonzero(inside), rows[inside] - c0] = -np.inf


def _merge_block(scores: np.ndarray, c0: int, best_rows: np.ndarray, best_cos: np.ndarray, k: int, floor: float) -> None:
    """Merge the block's entries at or above the floor (and above each row's current k-th) into
    the running top-k. Only rows with such entries are touched: duplicates are rare, so this
    stays a small fraction of the matrix product."""
    threshold = np.maximum(best_cos[:, -1], np.float32(floor))
    hit = scores >= threshold[:, None]
    touched = np.flatnonzero(hit.any(axis=1))
    if not len(touched):
        return
    sub = scores[touched]
    sub = np.where(hit[touched], sub, -np.inf).astype(np.float32)
    merged_cos = np.concatenate([best_cos[touched], sub], axis=1)
    column_rows = np.broadcast_to(np.arange(c0, c0 + scores.shape[1], dtype=np.int64), sub.shape)
    merged_rows = np.concatenate([best_rows[touched], column_rows], axis=1)
    # best first; equal cosines by row number, so the result never depends on the blocking
    order = np.lexsort((np.where(np.isfinite(merged_cos), merged_rows, np.iinfo(np.int64).max), -merged_cos), axis=1)[:, :k]
    new_cos = np.take_along_axis(merged_cos, order, axis=1)
    new_rows = np.take_along_axis(merged_rows, order, axis=1)
    new_rows[~np.isfinite(new_cos)] = -1
    best_cos[touched] = new_cos
    best_rows[touched] = new_rows


def refine_saturated(rows: np.ndarray, found: Neighbours, floor: float) -> None:
    """Rows whose k-th neighbour is still at or above the floor may have more: ask them again,
    exactly, against every row, and keep them all (the arrays widen to the largest count)."""
    k = found.indices.shape[1]
    if k == 0:
        return
    saturated = np.flatnonzero(found.cosines[:, -1] >= floor)
    if not len(saturated):
        return
    extra: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for start in range(0, len(saturated), REFINE_BLOCK):
        chosen = saturated[start : start + REFINE_BLOCK]
        queries = _as_float32(rows[chosen])
        hits: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for c0 in range(0, len(rows), COLUMN_BLOCK):  # one block of scores at a time: memory stays flat
            scores = queries @ _as_float32(rows[c0 : c0 + COLUMN_BLOCK]).T
            _mask_rows(scores, chosen, c0)
            which, where = np.nonzero(scores >= floor)
            hits.append((which, where + c0, scores[which, where]))
        which = np.concatenate([h[0] for h in hits])
        columns = np.concatenate([h[1] for h in hits]).astype(np.int64)
        values = np.concatenate([h[2] for h in hits]).astype(np.float32)
        for i, row in enumerate(chosen.tolist()):
            mine = which == i
            order = np.lexsort((columns[mine], -values[mine]))
            extra[row] = (columns[mine][order], values[mine][order])
    width = max(k, max(len(v[0]) for v in extra.values()))
    if width > k:
        pad = width - k
        found.indices = np.concatenate([found.indices, np.full((len(rows), pad), -1, np.int64)], axis=1)
        found.cosines = np.concatenate([found.cosines, np.full((len(rows), pad), -np.inf, np.float32)], axis=1)
    for row, (idx, cos) in extra.items():
        found.indices[row] = -1
        found.cosines[row] = -np.inf
        found.indices[row, : len(idx)] = idx
        found.cosines[row, : len(cos)] = cos


# ============================================================================ approximate
def _index_settings(count: int, dim: int) -> dict:
    """An inverted-file index (faiss IVF) with float16 rows: `nlist` k-means cells, each row
    looked for in its `nprobe` nearest cells. Near-copies (cosine >= 0.9) nearly always share
    their nearest cell, so a few cells find them; the work per row is nprobe/nlist of the rows.

    Measured with benchmarks/dedupe_knn.py (768-d embedding-like rows, 1% planted near-copies at
    cosine 0.96-0.995) on a quiet 2-core AMD EPYC, whole neighbour step: 100,000 rows 17 s,
    recall 1.0; 1,000,000 rows 3.9 min, recall 0.9999 (benchmarks/knn_settings.py for other
    settings: 4 cells probed found 0.9993 at a million rows, 8 found 0.9999).
    usearch's HNSW graph (bf16, connectivity 16) found 0.996 at 100,000 rows but 0.695 at a
    million in 27 CPU-minutes: a greedy graph walk has no gradient to follow towards a copy
    among unrelated rows, while the copy's cell is the row's own cell.
    Every cosine reported is recomputed from the float32 rows."""
    if count < 2 * TRAIN_PER_CELL:  # too few rows to train cells on (faiss would warn): one flat list
        return {"version": INDEX_VERSION, "library": "faiss", "count": count, "dim": dim, "metric": "ip", "kind": "Flat"}
    nlist = max(1, min(int(round(4 * count**0.5)), count // TRAIN_PER_CELL))
    return {"version": INDEX_VERSION, "library": "faiss", "count": count, "dim": dim, "metric": "ip",
            "kind": "IVF,SQfp16", "nlist": nlist, "nprobe": min(nlist, NPROBE), "train_rows": min(count, TRAIN_PER_CELL * nlist),
            "kmeans_iterations": KMEANS_ITERATIONS}


def _description(index_path: Path) -> Path:
    return index_path.with_name(index_path.name + ".json")


def load_saved_index(index_path: Path | None, settings: dict, store_identity: str | None):
    """The saved index when it was built from this very store with these settings, else None."""
    if index_path is None or store_identity is None:
        return None
    from .safefiles import NotRegularFile, open_regular

    try:
        described = json.loads(read_regular(_description(index_path)).decode("utf-8"))
    except (OSError, ValueError, NotRegularFile):
        return None
    if described != {**settings, "store": store_identity}:
        return None
    import faiss

    try:
        with open_regular(index_path) as fh:
            index = faiss.read_index(faiss.PyCallbackIOReader(fh.read))
    except (OSError, NotRegularFile, RuntimeError):  # a damaged or foreign file: rebuilt below, never trusted
        return None
    if getattr(index, "ntotal", None) != settings["count"] or index.d != settings["dim"]:
        return None
    if hasattr(index, "nprobe") != (settings["kind"] != "Flat"):
        return None
    return index


def build_index(rows: np.ndarray, settings: dict):
    import faiss

    count, dim = len(rows), settings["dim"]
    if settings["kind"] == "Flat":
        index = faiss.IndexFlatIP(dim)
        index.add(_as_float32(rows))
        return index
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFScalarQuantizer(quantizer, dim, settings["nlist"], faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = settings["kmeans_iterations"]
    # the k-means sample: rows spread over the whole store, in order (a memory map reads them forward)
    sample = np.sort(np.random.default_rng(0).choice(count, settings["train_rows"], replace=False))
    index.train(_as_float32(rows[sample]))
    for start in range(0, count, COLUMN_BLOCK):
        index.add(_as_float32(rows[start : start + COLUMN_BLOCK]))
    index.nprobe = settings["nprobe"]
    return index


def save_index(index, index_path: Path, settings: dict, store_identity: str) -> None:
    """Saved beside the store under a temporary name (created O_EXCL, never a planted link), then
    renamed; its description last, so a half-written pair is never taken for a good one."""
    import faiss

    from .safefiles import replace_into_place, remove_file, temporary_beside

    tmp = temporary_beside(index_path)
    try:
        with open(tmp, "r+b") as fh:  # our own new file (temporary_beside made it O_EXCL)
            writer = faiss.PyCallbackIOWriter(fh.write)
            faiss.write_index(index, writer)
            del writer
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        remove_file(tmp)
        raise
    replace_into_place(tmp, index_path)
    atomic_write_text(_description(index_path), json.dumps({**settings, "store": store_identity}, indent=2) + "\n")


def approximate_neighbours(rows: np.ndarray, k: int, floor: float, index_path: Path | None, store_identity: str | None,
                           note: Callable[[str], None] | None = None) -> Neighbours:
    count, dim = rows.shape
    settings = _index_settings(count, dim)
    index = load_saved_index(index_path, settings, store_identity)
    if index is None:
        if note:
            note(f"building the approximate neighbour index over {count:,} rows")
        index = build_index(rows, settings)
        if index_path is not None and store_identity is not None:
            try:
                save_index(index, index_path, settings, store_identity)
            except OSError as exc:  # a read-only folder costs the reuse, not the run
                if note:
                    note(f"{index_path}: cannot save the index ({exc.strerror or exc}); it is built again next time")
    elif note:
        note(f"reusing the neighbour index {index_path}")
    if "nprobe" in settings:
        index.nprobe = settings["nprobe"]
    indices = np.full((count, k), -1, np.int64)
    cosines = np.full((count, k), -np.inf, np.float32)
    nearest = np.full(count, -np.inf, np.float32)
    for start in range(0, count, SEARCH_BLOCK):
        block = _as_float32(rows[start : start + SEARCH_BLOCK])
        _, keys = index.search(block, min(k + 1, count))
        keys = np.asarray(keys, np.int64).reshape(len(block), -1)
        # cosines from the float32 rows, not the index's float16 scores: exact values for
        # the pairs found, the same numbers the exact path reports
        own = np.arange(start, start + len(block))[:, None]
        valid = (keys >= 0) & (keys < count) & (keys != own)
        safe = np.where(valid, keys, 0)
        found = np.einsum("id,ijd->ij", block, _as_float32(rows[safe.ravel()]).reshape(*safe.shape, dim))
        found = np.where(valid, found, -np.inf).astype(np.float32)
        order = np.lexsort((np.where(valid, keys, np.iinfo(np.int64).max), -found), axis=1)
        found = np.take_along_axis(found, order, axis=1)[:, :k]
        keys = np.take_along_axis(keys, order, axis=1)[:, :k]
        nearest[start : start + len(block)] = found[:, 0] if found.shape[1] else -np.inf
        kept = found >= floor
        width = found.shape[1]
        indices[start : start + len(block), :width] = np.where(kept, keys, -1)
        cosines[start : start + len(block), :width] = np.where(kept, found, -np.inf)
    return Neighbours(indices, cosines, nearest, "approximate")
