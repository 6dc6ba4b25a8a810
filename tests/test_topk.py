"""Exact top-K over a store: equal to sorting every cosine, whatever the blocks and threads."""

from __future__ import annotations

import numpy as np
import pytest

from siglip_cli import topk
from siglip_cli.core.errors import OutputError
from siglip_cli.store import Entry, open_store, write_store

COUNT, DIM = 1000, 16


@pytest.fixture()
def small_blocks(monkeypatch):
    """Blocks of 64 rows, reads of 10 and a thread per 100 rows: a thousand rows cross every
    boundary the code has."""
    monkeypatch.setattr(topk, "BLOCK_ROWS", 64)
    monkeypatch.setattr(topk, "READ_BYTES", 10 * DIM * 4)
    monkeypatch.setattr(topk, "MIN_ROWS_PER_THREAD", 100)


def _rows(normalized: bool = True) -> np.ndarray:
    rows = np.random.default_rng(3).standard_normal((COUNT, DIM)).astype(np.float32)
    if normalized:
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    rows[[10, 500, 990]] = rows[700]  # exact ties, in different blocks and threads
    return rows


def _store(tmp_path, rows: np.ndarray, suffix: str, dtype: str = "float32", normalized: bool = True):
    out = tmp_path / f"s{suffix}"
    entries = [Entry("image", f"img{i}", (1, 1, b""), rows, i) for i in range(COUNT - 50)]
    entries += [Entry("text", f"text{i}", (-1, -1, b""), rows, i) for i in range(COUNT - 50, COUNT)]
    write_store(out, entries, DIM, dtype, {"normalized": normalized})
    return open_store(out)


def _expected(rows: np.ndarray, query: np.ndarray, k: int, start: int, stop: int, normalized: bool = True):
    """Every cosine sorted (rows of a normalised store are taken as unit length, as stored)."""
    part = rows[start:stop].astype(np.float64)
    cosines = part @ query
    if not normalized:
        cosines /= np.linalg.norm(part, axis=1)
    order = np.lexsort((np.arange(len(part)), -cosines))[:k]  # ties by row number
    return order + start, cosines[order]


@pytest.mark.parametrize("suffix, dtype", [(".npy", "float32"), (".npz", "float16"), (".parquet", "float32"), (".jsonl", "float32")])
@pytest.mark.parametrize("threads", [1, 2, 7])
def test_top_k_equals_sorting_every_cosine(small_blocks, tmp_path, suffix, dtype, threads):
    rows = _rows()
    store = _store(tmp_path, rows, suffix, dtype)
    stored = store.rows.astype(np.float32)
    queries = np.random.default_rng(4).standard_normal((3, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    queries[0] = stored[700] / np.linalg.norm(stored[700])  # its four copies tie for first place
    for k, start, stop in ((5, 0, COUNT), (40, 0, store.image_count), (2000, 100, 900)):
        rankings = topk.top_k(store, queries, k, start, stop, threads=threads)
        for query, ranking in zip(queries, rankings):
            order, cosines = _expected(stored, query, k, start, stop)
            assert ranking.rows.tolist() == order.tolist()
            np.testing.assert_allclose(ranking.cosines, cosines, atol=1e-5)
    for k in (1, 2, 4):  # equal cosines in different blocks and threads: the lowest rows win
        assert topk.top_k(store, queries[:1], k, threads=threads)[0].rows.tolist() == [10, 500, 700, 990][:k]


def test_rows_that_are_not_normalised_are_compared_by_cosine(small_blocks, tmp_path):
    rows = _rows(normalized=False) * np.linspace(0.5, 3, COUNT, dtype=np.float32)[:, None]
    store = _store(tmp_path, rows, ".npy", normalized=False)
    query = np.random.default_rng(5).standard_normal(DIM).astype(np.float32)
    query /= np.linalg.norm(query)
    ranking = topk.top_k(store, query[None], 20, threads=2)[0]
    order, cosines = _expected(rows, query, 20, 0, COUNT, normalized=False)
    assert ranking.rows.tolist() == order.tolist()
    np.testing.assert_allclose(ranking.cosines, cosines, atol=1e-5)


def test_a_row_of_nan_is_named(small_blocks, tmp_path):
    rows = _rows()
    rows[333, 5] = np.nan
    store = _store(tmp_path, rows, ".npy")
    with pytest.raises(OutputError, match="row 333 holds values that are not numbers"):
        topk.top_k(store, rows[:1], 3, threads=2)
