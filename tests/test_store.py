"""The store: every format written by `write_store` reads back through `open_store` the same,
and Parquet files are what DuckDB-style readers expect."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from siglip_cli.store import _CHUNK_ROWS, NO_STAMP, Entry, open_store, write_store

NAMES = ["photos/a.jpg", "photos/ünïcödé 猫.png", "photos/caf\udce9.jpg", "photos/with\u2028separator.webp"]
TEXTS = ["a cat", "a dog, on a beach", "emoji 🐱"]


def _entries(rows: np.ndarray, names: list[str], texts: list[str]) -> list[Entry]:
    entries = []
    for i, name in enumerate(names):
        stamp = (1000 + i, 1_700_000_000_000_000_000 + i, bytes([i % 256]) * 32 if i % 2 else b"")
        entries.append(Entry("image", name, stamp, rows, i))
    for j, text in enumerate(texts):
        entries.append(Entry("text", text, NO_STAMP, rows, len(names) + j))
    return entries


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("suffix", [".npy", ".npz", ".jsonl", ".parquet"])
def test_every_format_round_trips(tmp_path, suffix, dtype):
    names = NAMES if suffix != ".parquet" else NAMES[:2] + NAMES[3:]  # Parquet strings must be UTF-8
    rows = np.random.default_rng(1).standard_normal((len(names) + len(TEXTS), 24)).astype(np.float32)
    out = tmp_path / f"s{suffix}"
    written = write_store(out, _entries(rows, names, TEXTS), 24, dtype, {"model": "m", "revision": "r", "normalized": False})
    store = open_store(out)

    assert store.names == names + TEXTS
    assert store.names_at([len(names), 1]) == [TEXTS[0], names[1]]
    assert store.kinds.tolist() == [False] * len(names) + [True] * len(TEXTS)
    assert store.count == len(names) + len(TEXTS) and store.image_count == len(names) and store.dim == 24
    expected = rows.astype(dtype)
    if suffix == ".jsonl":  # JSON carries float32's 7 significant digits
        np.testing.assert_allclose(store.rows, expected, rtol=1e-6)
    else:
        np.testing.assert_array_equal(store.rows, expected)
        assert store.rows.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(np.concatenate(list(store.chunks(3, 2, 6))), store.rows[2:6])
    stamps = store.stamps
    assert stamps["size"].tolist() == [1000 + i for i in range(len(names))] + [-1] * len(TEXTS)
    assert [bytes(h) for h in stamps["sha256"][: len(names)]] == [bytes([i % 256]) * 32 if i % 2 else b"" for i in range(len(names))]
    assert stamps["mtime_ns"][0] == 1_700_000_000_000_000_000
    for key in ("model", "revision", "normalized", "count", "image_rows", "text_rows", "dim", "dtype"):
        assert store.meta[key] == written[key]
    assert store.image_rows() == {name: i for i, name in enumerate(names)}


def test_parquet_is_what_duckdb_style_readers_expect(tmp_path):
    """Columns path, kind and embedding as a fixed-size list (DuckDB reads it as FLOAT[D], Arrow
    as a tensor column), the meta in the key-value metadata, row groups of at most _CHUNK_ROWS
    (a reader, and our update, never holds more than one of them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    count = 2 * _CHUNK_ROWS + 100
    rows = np.random.default_rng(2).standard_normal((count, 8)).astype(np.float32)
    names = [f"img{i}.jpg" for i in range(count - 1)]
    out = tmp_path / "v.parquet"
    write_store(out, _entries(rows, names, ["a cat"]), 8, "float32", {"model": "m", "revision": "r", "normalized": False})

    schema = pq.read_schema(out)
    assert schema.field("embedding").type == pa.list_(pa.float32(), 8)
    assert schema.field("kind").type == pa.string() and schema.field("path").type == pa.string()
    assert json.loads(schema.metadata[b"siglip"])["count"] == count
    handle = pq.ParquetFile(out)
    assert handle.metadata.num_row_groups == 3
    assert max(handle.metadata.row_group(g).num_rows for g in range(3)) <= _CHUNK_ROWS
    table = pq.read_table(out, filters=[("kind", "=", "text")])
    assert table.column("path").to_pylist() == ["a cat"]
    np.testing.assert_array_equal(np.array(table.column("embedding").to_pylist()), rows[-1:])

    store = open_store(out)
    picks = [count - 1, 0, _CHUNK_ROWS, _CHUNK_ROWS - 1, 5, 2 * _CHUNK_ROWS + 1]
    np.testing.assert_array_equal(store.row_source[picks], rows[picks])  # across row groups, any order


def test_a_store_from_another_format_version_or_tool_is_refused(tmp_path):
    from siglip_cli.core.errors import OutputError, UsageError

    out = tmp_path / "v.npy"
    np.save(out, np.zeros((2, 4), np.float32))
    with pytest.raises(OutputError, match="no v.npy.meta.json beside it"):
        open_store(out)
    Path(f"{out}.meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(OutputError, match="no siglip meta"):
        open_store(out)
    with pytest.raises(UsageError, match="not an embedding file"):
        open_store(tmp_path / "v.txt")
