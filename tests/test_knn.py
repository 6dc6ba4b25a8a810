"""knn.py: the exact self-join against brute force (whatever the blocking), saturated rows asked
again so that no group is cut at k, and the approximate index: same pairs as the exact path on
planted near-copies, saved beside the store, reused, and rebuilt when the store changed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from siglip_cli import knn


def _rows(count: int, dim: int = 24, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _planted(count: int, pairs: int, dim: int = 32, seed: int = 1) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """Random unit rows, and `pairs` of them each given a near-copy at cosine ~0.97-0.995."""
    rng = np.random.default_rng(seed)
    rows = _rows(count, dim, seed)
    planted = set()
    for a, b in rng.choice(count, (pairs, 2), replace=False):
        noise = rng.standard_normal(dim).astype(np.float32)
        noise -= (noise @ rows[a]) * rows[a]
        noise /= np.linalg.norm(noise)
        cosine = rng.uniform(0.97, 0.995)
        rows[b] = cosine * rows[a] + np.sqrt(1 - cosine**2) * noise
        planted.add((min(a, b), max(a, b)))
    return rows, planted


def _brute(rows: np.ndarray, floor: float) -> tuple[list[list[int]], np.ndarray]:
    scores = rows.astype(np.float64) @ rows.T.astype(np.float64)
    np.fill_diagonal(scores, -np.inf)
    lists = [np.flatnonzero(scores[i] >= floor) for i in range(len(rows))]
    return [sorted(l.tolist(), key=lambda j: (-scores[i, j], j)) for i, l in enumerate(lists)], scores.max(axis=1)


def _lists(found: knn.Neighbours) -> list[set[int]]:
    return [set(row[row >= 0].tolist()) for row in found.indices]


@pytest.mark.parametrize("query_block, column_block", [(7, 11), (64, 1000), (512, 16384)])
def test_exact_equals_brute_force_whatever_the_blocks(monkeypatch, query_block, column_block):
    monkeypatch.setattr(knn, "QUERY_BLOCK", query_block)
    monkeypatch.setattr(knn, "COLUMN_BLOCK", column_block)
    rows = _rows(300, 8)  # low dimension: many pairs above the floor
    found = knn.self_neighbours(rows, 4, floor=0.7, method="exact")
    expected, nearest = _brute(rows, 0.7)
    assert _lists(found) == [set(l) for l in expected]
    np.testing.assert_allclose(found.nearest, nearest, atol=1e-5)
    for i in range(len(rows)):  # best first, cosines as stored
        kept = found.indices[i] >= 0
        np.testing.assert_allclose(found.cosines[i][kept], rows[found.indices[i][kept]] @ rows[i], atol=1e-5)
        assert np.all(np.diff(found.cosines[i][kept]) <= 1e-7)


@pytest.mark.parametrize("column_block", [7, 16384])
def test_a_row_with_more_than_k_copies_keeps_them_all(monkeypatch, column_block):
    monkeypatch.setattr(knn, "COLUMN_BLOCK", column_block)
    rows = _rows(100)
    rows[10:60] = rows[10]  # 50 copies of one row: 49 neighbours each, k is 4
    found = knn.self_neighbours(rows, 4, floor=0.99, method="exact")
    assert _lists(found)[10] == set(range(11, 60))
    assert _lists(found)[59] == set(range(10, 59))


def test_a_single_row_has_no_neighbour():
    found = knn.self_neighbours(_rows(1), 4, floor=0.5, method="exact")
    assert (found.indices == -1).all() and found.nearest[0] == -np.inf


@pytest.fixture()
def faiss():
    return pytest.importorskip("faiss", reason="the approximate index needs faiss: pip install 'siglip-cli[ann]'")


def test_approximate_finds_the_planted_pairs_and_the_exact_pairs(faiss):
    rows, planted = _planted(3000, 60)
    exact = knn.self_neighbours(rows, 8, floor=0.95, method="exact")
    approximate = knn.self_neighbours(rows, 8, floor=0.95, method="approximate")
    assert approximate.method == "approximate"
    found = {(min(a, b), max(a, b)) for a, b in zip(*approximate.pairs()[:2])}
    exact_pairs = {(min(a, b), max(a, b)) for a, b in zip(*exact.pairs()[:2])}
    assert planted <= exact_pairs
    assert found == exact_pairs
    np.testing.assert_allclose(approximate.nearest[approximate.nearest >= 0.95], exact.nearest[approximate.nearest >= 0.95], atol=1e-6)


def test_the_index_is_saved_reused_and_rebuilt_when_the_store_changed(faiss, tmp_path):
    rows, _ = _planted(500, 10)
    path = tmp_path / "vecs.npy.faiss"
    notes: list[str] = []
    first = knn.self_neighbours(rows, 8, 0.95, "approximate", path, "store-1", notes.append)
    assert path.is_file() and json.loads((tmp_path / "vecs.npy.faiss.json").read_text())["store"] == "store-1"
    assert notes[-1].startswith("building")
    again = knn.self_neighbours(rows, 8, 0.95, "approximate", path, "store-1", notes.append)
    assert notes[-1].startswith("reusing")
    np.testing.assert_array_equal(first.indices, again.indices)
    changed = rows.copy()
    changed[0] = changed[1]  # the store changed: its identity too
    other = knn.self_neighbours(changed, 8, 0.95, "approximate", path, "store-2", notes.append)
    assert notes[-1].startswith("building")
    assert 1 in set(other.indices[0].tolist())
    path.write_bytes(b"garbage")  # a damaged index is rebuilt, never trusted
    knn.self_neighbours(changed, 8, 0.95, "approximate", path, "store-2", notes.append)
    assert notes[-1].startswith("building")


def test_auto_is_exact_up_to_the_switch(monkeypatch):
    assert knn.choose_method("auto", knn.EXACT_MAX_ROWS) == "exact"
    monkeypatch.setattr(knn, "ann_available", lambda: False)
    assert knn.choose_method("auto", knn.EXACT_MAX_ROWS + 1) == "exact"
    with pytest.raises(knn.BackendUnavailable, match=r"siglip-cli\[ann\]"):
        knn.choose_method("approximate", 10)


def test_a_handful_of_rows_is_searched_without_faiss_warnings(faiss, capfd):
    """Too few rows to train cells on: one flat list, the same pairs as exact, and nothing on
    stderr (faiss's C++ side prints "WARNING clustering 12 points to 1 centroids")."""
    rows, _ = _planted(12, 2)
    exact = knn.self_neighbours(rows, 4, floor=0.95, method="exact")
    approximate = knn.self_neighbours(rows, 4, floor=0.95, method="approximate")
    assert {tuple(p) for p in zip(*approximate.pairs()[:2])} == {tuple(p) for p in zip(*exact.pairs()[:2])}
    assert capfd.readouterr().err == ""


def test_a_link_planted_where_the_index_goes_is_replaced_not_written_through(faiss, tmp_path):
    rows, _ = _planted(500, 10)
    target = tmp_path / "theirs.txt"
    target.write_text("theirs")
    path = tmp_path / "vecs.npy.faiss"
    path.symlink_to(target)
    (tmp_path / "vecs.npy.faiss.json").symlink_to(target)
    knn.self_neighbours(rows, 8, 0.95, "approximate", path, "store-1")
    assert target.read_text() == "theirs"
    assert not path.is_symlink() and path.stat().st_size > 0
    assert not (tmp_path / "vecs.npy.faiss.json").is_symlink()
