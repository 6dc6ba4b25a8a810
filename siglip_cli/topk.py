"""Exact nearest rows: the cosine of every query with every row of a store, best K kept.

One pass over the rows, a block at a time, keeping a running top-K per query, so memory stays
flat however large the store is. Measured on a 2-core VM over 1,000,000 x 768 float32 rows
(A/B runs in fresh processes, noted in docs/benchmarks.md):

- Every core reads its own part of the file (threads: numpy releases the GIL), through memory
  maps of 8 MB windows, each unmapped once scored. One map of the whole file is ~10% faster
  but leaves its 3 GB in the process's resident set; `pread` into a cache-sized buffer costs
  twice the kernel time (it copies the 3 GB), which a busy machine is short of.
- The dot products are numpy's `vecdot`, not a BLAS matrix product: OpenBLAS starts its own
  threads for every call, and those fight ours (and anything else on the machine) -- up to 10x
  slower under load.

Ties are broken by row number, so a ranking never depends on how the rows were split.
"""

from __future__ import annotations

import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .store import RowFile, Store, check_rows
from .store_meta import NORM_TOLERANCE

READ_BYTES = 8 << 20  # one window: large enough that Python's and the syscalls' share is nil
BLOCK_ROWS = 1 << 16  # rows scored before they are merged into the running top-K
MIN_ROWS_PER_THREAD = 1 << 16  # below this a thread costs more than it saves


@dataclass
class Ranking:
    """One query's best rows, best first."""

    rows: np.ndarray  # (k,) int64 row numbers in the store
    cosines: np.ndarray  # (k,) float32


def threads_available() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def top_k(store: Store, queries: np.ndarray, k: int, start: int = 0, stop: int | None = None, threads: int | None = None) -> list[Ranking]:
    """The best `k` rows of `store[start:stop]` for each of the L2-normalised `queries` (Q, D)."""
    stop = store.count if stop is None else stop
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    normalized = bool(store.meta.get("normalized", True))
    if stop <= start or k <= 0:
        return [Ranking(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in queries]
    threads = threads or threads_available()
    threads = max(1, min(threads, (stop - start) // MIN_ROWS_PER_THREAD))
    if not store.mapped:
        threads = 1  # rows come from a reader that is not safe to share
    bounds = np.linspace(start, stop, threads + 1).astype(np.int64)
    parts = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))

    def scan(part: tuple[int, int]) -> list[tuple[np.ndarray, np.ndarray]]:
        return _scan(store, queries, k, part[0], part[1], normalized)

    if len(parts) == 1:
        found = [scan(parts[0])]
    else:
        with ThreadPoolExecutor(len(parts)) as pool:
            found = list(pool.map(scan, parts))
    rankings = []
    for q in range(len(queries)):
        rows = np.concatenate([part[q][0] for part in found])
        cosines = np.concatenate([part[q][1] for part in found])
        order = np.lexsort((rows, -cosines))[:k]  # best first; equal cosines by row number
        rankings.append(Ranking(rows[order], cosines[order]))
    _check_hits(store, rankings)
    return rankings


def _check_hits(store: Store, rankings: list[Ranking]) -> None:
    """The hits' rows read again through the store's checked reader: a normalized store's row
    of the wrong length is refused before its cosine is shown (a few rows: nothing to pay)."""
    hits = np.unique(np.concatenate([ranking.rows for ranking in rankings])) if rankings else []
    if len(hits):
        store.row_source[hits]


def _scan(store: Store, queries: np.ndarray, k: int, start: int, stop: int, normalized: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """The best (at least) k rows of `start:stop` per query, as (rows, cosines). Scores gather in
    a block of BLOCK_ROWS before each merge into the running top-K, so merges stay rare."""
    best = [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in queries]
    scores = np.empty((BLOCK_ROWS, len(queries)), np.float32)
    filled, block_first = 0, start

    def merge() -> None:
        block = scores[:filled]
        for q in range(len(queries)):
            keep = _best(block[:, q], k)
            rows = np.concatenate([best[q][0], keep + block_first])
            cosines = np.concatenate([best[q][1], block[keep, q]])
            again = _best(cosines, k)
            best[q] = (rows[again], cosines[again])

    for first, rows in _reads(store, start, stop):
        if filled + len(rows) > BLOCK_ROWS:
            merge()
            filled, block_first = 0, first
        scores[filled : filled + len(rows)] = _cosines(store, first, rows, queries, normalized)
        filled += len(rows)
    if filled:
        merge()
    return best


def _best(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k highest scores, plus any that tie with the k-th (so that ties can be
    broken by row number later, whatever block they came in)."""
    if len(scores) <= k:
        return np.arange(len(scores))
    kth = np.partition(scores, len(scores) - k)[len(scores) - k]
    return np.flatnonzero(scores >= kth)


def _cosines(store: Store, first: int, block: np.ndarray, queries: np.ndarray, normalized: bool) -> np.ndarray:
    """(rows, queries) cosines. float16 rows are widened first: numpy's float16 dot products
    have no fast kernel.

    Damage shows here (store.check_rows names the row): a row that is not numbers, and in a
    normalized store a row whose cosine is not one (|cosine| > 1). Checking every row's length
    would cost a second dot product per row (measured 1.4x the search, benchmarks/
    row_check_cost.py); a row too short to show here is caught among the hits (top_k checks
    their lengths), and `Store.chunks()` / `row_source` check every row they read."""
    rows = block if block.dtype == np.float32 else block.astype(np.float32)
    if len(queries) == 1:
        scores = np.vecdot(rows, queries[0])[:, None]
    else:
        scores = np.vecdot(rows[:, None, :], queries[None, :, :])
    if not normalized:
        with np.errstate(over="ignore", invalid="ignore"):
            squares = np.vecdot(rows, rows)
        check_rows(store.path, store.meta, first, block, squares)
        scores /= np.sqrt(squares)[:, None]
        return scores
    bound = 1 + 2 * NORM_TOLERANCE[store.meta["dtype"]]
    suspect = ~(np.abs(scores) <= bound).all(axis=1)  # NaN too
    if suspect.any():
        for position in np.flatnonzero(suspect).tolist():
            check_rows(store.path, store.meta, first + position, block[position : position + 1])
    return scores


def rows_per_read(store: Store) -> int:
    return max(1, min(BLOCK_ROWS, READ_BYTES // (store.dim * np.dtype(store.meta["dtype"]).itemsize or 1)))


def _reads(store: Store, start: int, stop: int):
    """(first row, rows) pieces of about READ_BYTES covering start:stop."""
    if store.row_file is not None:
        yield from _mapped_windows(store, store.row_file, start, stop)
        return
    yield from store.unchecked_chunks(rows_per_read(store), start, stop)  # _cosines checks them


def _mapped_windows(store: Store, row_file: RowFile, start: int, stop: int):
    """The rows of a file mapped one window at a time: each window is unmapped once its rows
    are scored (the last reference to it goes), so the process never holds more than a few
    windows however large the file is; the pages stay in the OS's cache for the next search.
    The map is of the file that open_store opened and checked, never of its name: a store
    replaced since by `embed --update` does not show through."""
    dtype = np.dtype(store.meta["dtype"]).newbyteorder("<")
    row_bytes = store.dim * dtype.itemsize
    per_window = rows_per_read(store)
    fileno = row_file.file.fileno()
    for first in range(start, stop, per_window):
        count = min(per_window, stop - first)
        begin = row_file.offset + first * row_bytes
        aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
        window = mmap.mmap(fileno, begin - aligned + count * row_bytes, prot=mmap.PROT_READ, offset=aligned)
        yield first, np.frombuffer(window, dtype, count * store.dim, begin - aligned).reshape(count, store.dim)
