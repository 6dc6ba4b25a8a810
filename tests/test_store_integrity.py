"""The store's integrity (issue 17): a search sees one snapshot; a hand-edited or damaged store is
one line naming the file and the cause (never a traceback, never a shifted or impossible row);
queries are embedded as the index's rows were; `--update=hash` survives a vanished file; Ray
shards are checked on resume. Each test here failed before its fix."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from siglip_cli.core.errors import OutputError
from siglip_cli.store import NO_STAMP, Entry, open_store, sample_positions, write_store
from siglip_cli.topk import top_k

from .search_fixtures import ROOT, cli, make_photos, one_error_line, records

FORMATS = [".npy", ".npz", ".jsonl", ".parquet"]
DIM = 16


def _unit_rows(count: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _meta(**extra) -> dict:
    return {"model": "m", "revision": "r", "model_dtype": "fp32", "decode": "exact", "normalized": True,
            "templates": [], "logit_scale": 10.0, "logit_bias": -10.0, **extra}


def _write(out: Path, rows: np.ndarray, texts: int = 1, prefix: str = "img", **meta) -> list[str]:
    """A store of len(rows) rows: images named prefix0.png.. then `texts` texts. Returns the names."""
    images = len(rows) - texts
    names = [f"{prefix}{i}.png" for i in range(images)] + [f"text {j}" for j in range(texts)]
    entries = [Entry("image", names[i], (100 + i, 1_700_000_000_000_000_000 + i, b""), rows, i) for i in range(images)]
    entries += [Entry("text", names[images + j], NO_STAMP, rows, images + j) for j in range(texts)]
    write_store(out, entries, rows.shape[1], "float32", _meta(**meta))
    return names


def _damage_line(exc: pytest.ExceptionInfo, *fragments: str) -> str:
    text = str(exc.value)
    assert "\n" not in text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    return text


# ============================================================================ the meta, in one place
def _edit_meta(out: Path, change) -> None:
    """Change the meta that the reader of `out`'s format reads (the sidecar, or the copy inside)."""
    if out.suffix in (".npy", ".jsonl"):
        path = Path(f"{out}.meta.json")
        path.write_text(change(path.read_text()))
    elif out.suffix == ".npz":
        with zipfile.ZipFile(out) as archive:
            members = {name: archive.read(name) for name in archive.namelist()}
        meta = str(np.load(io.BytesIO(members["meta.npy"]), allow_pickle=False))
        buffer = io.BytesIO()
        np.save(buffer, np.array(change(meta)))
        members["meta.npy"] = buffer.getvalue()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
            for name, data in members.items():
                archive.writestr(name, data)
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(out)
        metadata = dict(table.schema.metadata)
        metadata[b"siglip"] = change(metadata[b"siglip"].decode()).encode()
        pq.write_table(table.replace_schema_metadata(metadata), out)


def _set(key, value):
    def change(text: str) -> str:
        meta = json.loads(text)
        meta[key] = value
        return json.dumps(meta)

    return change


HAND_EDITS = {
    "digests a text": (_set("digests", "x"), "digests"),
    "logit_scale a text": (_set("logit_scale", "abc"), "logit_scale"),
    "logit_scale null": (_set("logit_scale", None), "logit_scale"),
    "logit_scale a list": (_set("logit_scale", [1]), "logit_scale"),
    "logit_scale 1e308": (_set("logit_scale", 1e308), "logit_scale"),
    "logit_scale 0": (_set("logit_scale", 0), "logit_scale"),
    "logit_bias NaN": (_set("logit_bias", float("nan")), "logit_bias"),
    "revision a number": (_set("revision", 5), "revision"),
    "model_dtype a number": (_set("model_dtype", 5), "model_dtype"),
    "decode unknown": (_set("decode", "turbo"), "decode"),
    "normalized a text": (_set("normalized", "yes"), "normalized"),
    "templates a text": (_set("templates", "x"), "templates"),
    "skipped a text": (_set("skipped", "x"), "skipped"),
    "max_patches huge": (_set("max_patches", 10**9), "max_patches"),
    "a newer format version": (_set("version", 99), "version"),
    "dim a text": (_set("dim", "16"), "dim"),
    "count negative": (_set("count", -1), "count"),
    "nested 100,000 deep": (lambda text: "[" * 100_000 + "]" * 100_000, "nested too deep"),
}


@pytest.mark.parametrize("edit", list(HAND_EDITS))
@pytest.mark.parametrize("suffix", FORMATS)
def test_a_hand_edited_meta_is_one_line_naming_the_key(tmp_path, suffix, edit):
    out = tmp_path / f"vecs{suffix}"
    _write(out, _unit_rows(5))
    change, fragment = HAND_EDITS[edit]
    _edit_meta(out, change)
    with pytest.raises(OutputError) as exc:
        open_store(out)
    _damage_line(exc, str(out), fragment)


@pytest.mark.parametrize("value, fragment", [(None, "size"), ("abc", "size"), (2**70, "size"), ([1], "size")])
def test_jsonl_stamps_that_are_not_numbers_are_one_line(tmp_path, value, fragment):
    out = tmp_path / "vecs.jsonl"
    _write(out, _unit_rows(4))
    lines = out.read_text().splitlines()
    record = json.loads(lines[1])
    record["size"] = value
    lines[1] = json.dumps(record)
    out.write_text("\n".join(lines) + "\n")
    # (the meta records the file's digest; a hand edit that keeps it must still be one line)
    meta = json.loads(Path(f"{out}.meta.json").read_text())
    del meta["digests"]
    Path(f"{out}.meta.json").write_text(json.dumps(meta))
    with pytest.raises(OutputError) as exc:
        open_store(out)
    _damage_line(exc, str(out), "line 2", fragment)


def test_a_jsonl_meta_of_another_run_is_refused(tmp_path):
    out, other = tmp_path / "vecs.jsonl", tmp_path / "other.jsonl"
    _write(out, _unit_rows(4, seed=1))
    _write(other, _unit_rows(4, seed=2), prefix="other")
    shutil.copy(f"{other}.meta.json", f"{out}.meta.json")
    with pytest.raises(OutputError) as exc:
        open_store(out)
    _damage_line(exc, str(out), "not those its meta describes")


@pytest.mark.parametrize("member", ["kinds", "paths"])
def test_npz_with_a_scalar_instead_of_a_column_is_one_line(tmp_path, member):
    out = tmp_path / "vecs.npz"
    _write(out, _unit_rows(4))
    with zipfile.ZipFile(out) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    buffer = io.BytesIO()
    np.save(buffer, np.array("text"))
    members[f"{member}.npy"] = buffer.getvalue()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(OutputError) as exc:
        open_store(out)
    _damage_line(exc, str(out), member)


# ============================================================================ Parquet: nulls and columns
def _rewrite_parquet(out: Path, change) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    pq.write_table(change(table).replace_schema_metadata(table.schema.metadata), out)


def _with_null(column: str, row: int, inside: bool = False):
    import pyarrow as pa

    def change(table):
        values = table.column(column).to_pylist()
        if inside:
            values[row] = [None] + values[row][1:]
        else:
            values[row] = None
        index = table.schema.get_field_index(column)
        return table.set_column(index, table.schema.field(column), pa.array(values, table.schema.field(column).type))

    return change


@pytest.mark.parametrize("column, inside, fragment", [
    ("embedding", False, "row 1 has no embedding"),
    ("embedding", True, "row 1 has a null in its embedding"),
    ("path", False, "row 1 has no path"),
    ("kind", False, "row 1 has no kind"),
    ("size", False, "row 1 has no size"),
])
def test_a_null_in_a_parquet_store_is_damage_not_a_shift(tmp_path, column, inside, fragment):
    """Arrow's flatten() drops a null list: every later row moved onto another's name."""
    out = tmp_path / "vecs.parquet"
    _write(out, _unit_rows(5))
    _rewrite_parquet(out, _with_null(column, 1, inside))
    with pytest.raises(OutputError) as exc:
        store = open_store(out)
        list(store.chunks())
        store.row_source[[0, 2, 3]]
        store.stamps
    _damage_line(exc, str(out), fragment)


@pytest.mark.parametrize("column", ["path", "kind", "embedding"])
def test_a_parquet_store_without_a_column_is_one_line(tmp_path, column):
    out = tmp_path / "vecs.parquet"
    _write(out, _unit_rows(4))
    _rewrite_parquet(out, lambda table: table.drop_columns([column]))
    with pytest.raises(OutputError) as exc:
        open_store(out)
    _damage_line(exc, str(out), column)


@pytest.mark.parametrize("page", ["dictionary", "data"])
def test_flipped_bytes_in_a_parquet_page_never_score(tmp_path, page):
    """400 bytes flipped in the middle of the rows' dictionary page (the values) or data page
    (which value goes where): unreadable, or rows that are not of length 1; never a cosine of 105."""
    import pyarrow.parquet as pq

    out = tmp_path / "vecs.parquet"
    _write(out, _unit_rows(300, dim=64))
    column = pq.ParquetFile(out).metadata.row_group(0).column(2)
    assert column.path_in_schema == "embedding.list.element" and column.dictionary_page_offset
    end = column.dictionary_page_offset + column.total_compressed_size
    begin, end = (column.dictionary_page_offset, column.data_page_offset) if page == "dictionary" else (column.data_page_offset, end)
    start = (begin + end) // 2 - 200
    data = bytearray(out.read_bytes())
    data[start : start + 400] = bytes(b ^ 0x5A for b in data[start : start + 400])
    out.write_bytes(bytes(data))
    with pytest.raises(OutputError) as exc:
        store = open_store(out)
        top_k(store, _unit_rows(1, dim=64), 5)
    _damage_line(exc, str(out))


# ============================================================================ impossible rows
@pytest.mark.parametrize("suffix", FORMATS)
def test_a_row_that_is_not_of_length_1_in_a_normalized_store_is_refused_as_read(tmp_path, suffix):
    """One row scaled by 100 where the .npy fingerprint does not look: only reading it can tell."""
    rows = _unit_rows(40)
    bad = next(i for i in range(39) if i not in sample_positions(40))
    rows[bad] *= 100
    out = tmp_path / f"vecs{suffix}"
    _write(out, rows)
    with pytest.raises(OutputError) as exc:
        top_k(open_store(out), _unit_rows(1, seed=9), 3)
    _damage_line(exc, str(out), f"row {bad} ", "length 100")
    if suffix != ".jsonl":  # (a .jsonl store is read whole, checked when opened)
        with pytest.raises(OutputError):
            open_store(out).row_source[[bad]]
        open_store(out).row_source[[bad - 1, bad + 1]]  # the others read fine


def test_rows_of_a_store_that_is_not_normalized_are_not_held_to_length_1(tmp_path):
    rows = np.random.default_rng(3).standard_normal((20, DIM)).astype(np.float32) * 7
    out = tmp_path / "vecs.npy"
    _write(out, rows, normalized=False)
    ranking = top_k(open_store(out), _unit_rows(1, seed=4), 20, 0, 19)[0]
    expected = rows[:19] @ _unit_rows(1, seed=4)[0] / np.linalg.norm(rows[:19], axis=1)
    np.testing.assert_allclose(np.sort(ranking.cosines)[::-1], np.sort(expected)[::-1], rtol=1e-5)


# ============================================================================ names by row number
@pytest.mark.parametrize("suffix", FORMATS)
def test_negative_row_numbers_count_from_the_end_and_others_are_refused(tmp_path, suffix):
    out = tmp_path / f"vecs{suffix}"
    names = _write(out, _unit_rows(6), texts=2)
    store = open_store(out)
    assert store.names_at([-1, -6, 0]) == [names[-1], names[0], names[0]]
    assert store.names_at([]) == []
    np.testing.assert_array_equal(store.row_source[[-1]], store.row_source[[5]])
    for wrong in (6, -7):
        with pytest.raises(IndexError):
            store.names_at([wrong])


@pytest.mark.parametrize("suffix", FORMATS)
def test_an_empty_store_answers_with_no_names(tmp_path, suffix):
    """A search with nothing to name (a 0-row index, or only a broken --image) asks for no names."""
    out = tmp_path / f"vecs{suffix}"
    write_store(out, [], DIM, "float32", _meta())
    store = open_store(out)
    assert store.count == 0 and store.names_at([]) == [] and store.names == []
    assert top_k(store, _unit_rows(1), 3)[0].rows.tolist() == []


# ============================================================================ one snapshot
@pytest.mark.parametrize("suffix", FORMATS)
def test_an_opened_store_stays_the_snapshot_it_was_when_the_files_are_replaced(tmp_path, suffix):
    out = tmp_path / f"vecs{suffix}"
    old_rows = _unit_rows(30, seed=1)
    old_names = _write(out, old_rows, prefix="old")
    store = open_store(out)
    query = old_rows[7:8]
    _write(out, _unit_rows(50, seed=2), prefix="new")  # replaced, as `embed --update` does

    ranking = top_k(store, query, 3)[0]
    assert ranking.rows[0] == 7 and abs(ranking.cosines[0] - 1) < 1e-5
    assert store.names_at(ranking.rows.tolist()) == [old_names[int(r)] for r in ranking.rows]
    assert store.names == old_names
    assert store.stamps["size"][:3].tolist() == [100, 101, 102]
    np.testing.assert_array_equal(np.concatenate(list(store.chunks())), store.rows)
    np.testing.assert_allclose(store.row_source[[7]], old_rows[7:8], atol=1e-6)
    assert open_store(out).count == 50  # and a new open sees the new store


def test_a_npy_store_read_while_its_parts_are_being_replaced_is_read_again(tmp_path):
    """The moment between the sidecars' renames and the rows' rename: the parts disagree, and
    open_store looks again instead of reporting damage."""
    import threading

    out = tmp_path / "vecs.npy"
    _write(out, _unit_rows(30, seed=1), prefix="old")
    newer = tmp_path / "newer"
    newer.mkdir()
    _write(newer / "vecs.npy", _unit_rows(50, seed=2), prefix="new")
    for name in ("vecs.npy.paths.txt", "vecs.npy.stamps.npy", "vecs.npy.meta.json"):
        os.replace(newer / name, tmp_path / name)  # half-way through a replacement
    threading.Timer(0.03, os.replace, (newer / "vecs.npy", out)).start()
    store = open_store(out)
    assert store.count == 50 and store.names_at([0]) == ["new0.png"]


# ============================================================================ with the model
@pytest.fixture()
def env(tmp_path, tiny_checkpoint):
    return {"SIGLIP_CACHE_DIR": str(tmp_path / "cache"), "SIGLIP_MODEL": str(tiny_checkpoint)}


def _siglip(*args, env: dict) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.Popen([sys.executable, "-m", "siglip_cli", *map(str, args)], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ranking(result) -> list[tuple[str, float]]:
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr
    return [(hit["path"], hit["cosine"]) for hit in records(result.stdout)[0]["results"]]


def _same_ranking(found: list, expected: list) -> bool:
    return [n for n, _ in found] == [n for n, _ in expected] and all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(found, expected))


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_search_while_update_replaces_the_index_sees_the_old_or_the_new_store(tmp_path, env, suffix):
    """A writer switches the folder between two states and runs `embed --update` after each;
    searches run all the while. Every answer is one state's answer, whole, with exit 0."""
    folder = tmp_path / "photos"
    make_photos(folder, 8)
    extra = make_photos(tmp_path / "extra", 4, start=40)
    out = tmp_path / f"vecs{suffix}"
    query = ["search", out, "a red car", "--json", "--top-k", "6"]
    assert cli("embed", folder, "--out", out, env=env).exit_code == 0
    answers = {"fewer": _ranking(cli(*query, env=env))}  # (also puts the query in the text cache)
    for path in extra:
        shutil.copy(path, folder / f"more-{path.name}")
    assert cli("embed", folder, "--out", out, "--update", env=env).exit_code == 0
    answers["more"] = _ranking(cli(*query, env=env))
    assert answers["more"] != answers["fewer"]  # the extra photos rank: the two states differ

    searches, deadline = 0, time.time() + 600
    for update in range(4):
        for path in extra:
            target = folder / f"more-{path.name}"
            target.unlink() if update % 2 == 0 else shutil.copy(path, target)
        writer = _siglip("embed", folder, "--out", out, "--update", env=env)
        while writer.poll() is None and time.time() < deadline:
            found = _ranking(cli(*query, env=env))
            assert any(_same_ranking(found, answer) for answer in answers.values()), found
            searches += 1
        _, stderr = writer.communicate(timeout=120)
        assert writer.returncode == 0, stderr
    assert searches >= 4


def test_an_int8_index_is_searched_with_int8_queries(tmp_path, env):
    folder = tmp_path / "photos"
    photos = make_photos(folder, 5)
    out = tmp_path / "vecs.npy"
    result = cli("embed", folder, "--out", out, "--dtype", "int8", env=env)
    assert result.exit_code == 0, result.stderr
    assert open_store(out).meta["model_dtype"] == "int8"
    found = _ranking(cli("search", out, "--image", photos[2], "--json", env=env))
    # int8 quantizes each batch's activations with one scale: a row moves with its batch
    # (docs/formats.md gives the bound); the image's own row is still the nearest.
    assert found[0][0] == str(photos[2]) and 1 - found[0][1] <= BATCH_BOUNDS["int8"], found
    assert _ranking(cli("search", out, "a cat", "--json", "--dtype", "int8", env=env))


def test_a_fast_decoded_index_is_searched_with_fast_decoded_images(tmp_path, env):
    """JPEGs far larger than the model's input decode at reduced scale with --decode fast; an
    image query must decode the same way, or its own row is not its nearest."""
    from .conftest import random_image

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        random_image(200 + i, (640, 480)).save(folder / f"big{i}.jpg", quality=95)
    out = tmp_path / "vecs.npy"
    result = cli("embed", folder, "--out", out, "--dtype", "fp32", "--decode", "fast", env=env)
    assert result.exit_code == 0, result.stderr
    assert open_store(out).meta["decode"] == "fast"
    found = _ranking(cli("search", out, "--image", folder / "big1.jpg", "--json", env=env))
    assert found[0][0] == str(folder / "big1.jpg") and abs(found[0][1] - 1) < 1e-5, found


def test_a_naflex_index_is_searched_with_its_own_patch_budget(tmp_path, tmp_path_factory):
    from .conftest import random_image
    from .siglip2_fixtures import siglip2_naflex

    checkpoint = siglip2_naflex(tmp_path_factory)
    env = {"SIGLIP_CACHE_DIR": str(tmp_path / "cache"), "SIGLIP_MODEL": str(checkpoint)}
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        random_image(300 + i, (90, 40)).save(folder / f"wide{i}.png")
    out = tmp_path / "vecs.npy"
    result = cli("embed", folder, "--out", out, "--max-patches", "8", env=env)
    assert result.exit_code == 0, result.stderr
    assert open_store(out).meta["max_patches"] == 8
    found = _ranking(cli("search", out, "--image", folder / "wide0.png", "--json", env=env))
    assert found[0][0] == str(folder / "wide0.png") and abs(found[0][1] - 1) < 1e-5, found


def test_update_of_a_store_with_an_impossible_meta_is_one_line_and_writes_nothing(tmp_path, env):
    folder = tmp_path / "photos"
    make_photos(folder, 3)
    out = tmp_path / "vecs.npy"
    assert cli("embed", folder, "--out", out, env=env).exit_code == 0
    meta_path = Path(f"{out}.meta.json")
    meta_path.write_text(_set("model_dtype", 5)(meta_path.read_text()))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    result = cli("embed", folder, "--out", out, "--update", env=env)
    assert result.exit_code == 1
    one_error_line(result.stderr, str(out), "model_dtype")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_update_of_a_parquet_store_with_a_null_row_writes_nothing(tmp_path, env):
    folder = tmp_path / "photos"
    make_photos(folder, 4)
    out = tmp_path / "vecs.parquet"
    assert cli("embed", folder, "--out", out, env=env).exit_code == 0
    _rewrite_parquet(out, _with_null("embedding", 1))
    make_photos(folder, 1, start=20)  # something to add
    before = out.read_bytes()
    result = cli("embed", folder, "--out", out, "--update", env=env)
    assert result.exit_code == 1
    one_error_line(result.stderr, str(out), "row 1 has no embedding")
    assert out.read_bytes() == before
    assert not Path(f"{out}.partial").exists() or not any(Path(f"{out}.partial").iterdir())


def test_parquet_search_with_only_a_broken_image_query_is_one_line(tmp_path, env):
    folder = tmp_path / "photos"
    make_photos(folder, 3)
    out = tmp_path / "vecs.parquet"
    assert cli("embed", folder, "--out", out, env=env).exit_code == 0
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    result = cli("search", out, "--image", broken, "--json", env=env)
    assert result.exit_code == 1
    one_error_line(result.stderr, "broken.png")


def test_searching_a_jsonl_index_says_it_is_an_exchange_format(tmp_path, env):
    folder = tmp_path / "photos"
    make_photos(folder, 3)
    out = tmp_path / "vecs.jsonl"
    assert cli("embed", folder, "--out", out, env=env).exit_code == 0
    result = cli("search", out, "a cat", "--json", env=env)
    assert result.exit_code == 0, result.stderr
    assert "exchange format" in result.stderr and ".npy" in result.stderr
    assert len(records(result.stdout)[0]["results"]) == 3


# ============================================================================ --update=hash
def test_update_by_hash_skips_a_file_removed_mid_run_and_hashes_each_file_once(tmp_path, env, monkeypatch):
    """The file disappears after listing, as another program deletes it while a long run
    hashes the others: a skipped input, the run goes on, and nothing is left half-done."""
    import siglip_cli.embedding as embedding

    folder = tmp_path / "photos"
    photos = make_photos(folder, 5)
    out = tmp_path / "vecs.npy"
    assert cli("embed", folder, "--out", out, env=env).exit_code == 0
    make_photos(folder, 1, start=30)  # something new, so the update writes
    hashed: list[str] = []
    real_hash = embedding.file_hash

    def hash_and_lose_one(path: str) -> bytes:
        hashed.append(path)
        if path == str(photos[2]):
            os.unlink(path)  # gone between listing and hashing
        return real_hash(path)

    monkeypatch.setattr(embedding, "file_hash", hash_and_lose_one)
    result = cli("embed", folder, "--out", out, "--update=hash", env=env)
    assert result.exit_code == 1, result.stderr  # 1: an input was skipped
    assert "Traceback" not in result.stderr
    assert f"skipped {photos[2]}" in result.stderr
    assert sorted(hashed) == sorted(set(hashed)) and len(hashed) == 6  # every file once
    store = open_store(out)
    assert str(photos[2]) not in store.names and len(store.names) == 5
    assert [s["path"] for s in store.meta["skipped"]] == [str(photos[2])]
    assert not Path(f"{out}.partial").exists()
    assert cli("embed", folder, "--out", out, "--update=hash", env=env).exit_code == 0  # and the next one runs


# ============================================================================ Ray shards, checked on resume
def _cluster_run(engine, folder: Path, out: Path, normalized: bool = True, resume: bool = False):
    from siglip_cli.cluster import ClusterRun, Layout, WorkerSettings
    from siglip_cli.embedding import EmbedPlan
    from siglip_cli.sources import expand

    listing = expand([str(folder)])
    described = engine.describe()
    settings = WorkerSettings(model=described["model"], revision=described["revision"], device="cpu", dtype=described["dtype"],
                              attn="auto", offline=True, max_pixels=None, batch_size=None, decode_threads=None,
                              torch_threads=1, normalized=normalized, templates=(), out=str(out), out_dtype="float32",
                              decode=described["decode"])
    run = ClusterRun(engine, EmbedPlan(listing.sources), out, "float32", normalized, None, resume,
                     settings=settings, layout=Layout(1, 1.0, 0.0), shard_size=2)
    return run, settings


def test_a_ray_resume_redoes_a_shard_whose_file_changed_and_refuses_another_runs_shard(tmp_path, tiny_checkpoint):
    """The shards are written by the workers' own function (write_shard), here, without a
    cluster; the resume checks are the driver's."""
    from siglip_cli.cluster import write_shard
    from siglip_cli.core.errors import UsageError
    from siglip_cli.engine import load

    from .conftest import random_image

    engine = load(str(tiny_checkpoint), device="cpu", dtype="fp32", use_cache=False)
    folder = tmp_path / "photos"
    photos = make_photos(folder, 6)
    out = tmp_path / "vecs.npy"
    run, settings = _cluster_run(engine, folder, out)
    for shard in run.shards:
        write_shard(engine, shard, settings)
    run.close()
    assert all(shard.finished for shard in run.shards)

    time.sleep(0.01)
    random_image(999, (48, 40)).save(photos[3])  # changed after its shard was written
    run, _ = _cluster_run(engine, folder, out, resume=True)
    left = [shard for shard in run.shards if not shard.finished]
    assert [shard.names for shard in left] == [(str(photos[2]), str(photos[3]))]
    images, _, _ = run.todo()
    assert [s.name for s in images] == [str(photos[2]), str(photos[3])]
    run.close()

    # a shard made without normalization, dropped in for the missing one
    from dataclasses import replace

    write_shard(engine, left[0], replace(settings, normalized=False))
    with pytest.raises(UsageError, match="made with other settings \\(normalized\\)"):
        _cluster_run(engine, folder, out, resume=True)


# ============================================================================ rows and their batch
# The most an L2-normalised row may move with the batch it is embedded in, as 1 - cosine with
# the same image embedded alone: stated per mode in docs/formats.md ("Are rows equal to a clean
# run?"), from benchmarks/batch_dependence.py on full-size architectures. A row that moves more
# (padding leaking between NaFlex images, a statistic taken over the batch) is a bug.
BATCH_BOUNDS = {"fp32": 1e-6, "bf16": 2e-3, "int8": 2e-3, "naflex-fp32": 1e-6}


def _in_batches(engine, sources, batches) -> np.ndarray:
    rows = np.zeros((len(sources), engine.embed_dim), np.float32)
    for batch in batches:
        for item in engine.iter_image_features([sources[i] for i in batch], True, batch_size=len(batch), workers=1):
            assert item.error is None, item.error
            rows[batch[item.index]] = item.vector
    return rows


@pytest.mark.parametrize("mode", list(BATCH_BOUNDS))
def test_rows_move_with_their_batch_no_more_than_the_stated_bound(mode, tmp_path, tiny_checkpoint, tmp_path_factory):
    from siglip_cli.engine import load
    from siglip_cli.sources import Source

    from .conftest import random_image
    from .siglip2_fixtures import siglip2_naflex

    checkpoint = siglip2_naflex(tmp_path_factory) if mode.startswith("naflex") else tiny_checkpoint
    engine = load(str(checkpoint), device="cpu", dtype=mode.split("-")[-1], decode="exact", use_cache=False)
    paths = []
    for i, size in enumerate([(48, 40), (90, 30), (30, 70), (64, 64), (100, 20), (41, 53)]):  # NaFlex: other grids, padding
        paths.append(tmp_path / f"{i}.png")
        random_image(500 + i, size).save(paths[-1])
    sources = [Source(str(p), str(p)) for p in paths]
    alone = _in_batches(engine, sources, [[i] for i in range(6)])
    together = _in_batches(engine, sources, [list(range(6))])
    reversed_fours = _in_batches(engine, sources, [[5, 4, 3, 2], [1, 0]])
    for other in (together, reversed_fours):
        moved = 1 - np.sum(other.astype(np.float64) * alone, axis=1)
        assert moved.max() <= BATCH_BOUNDS[mode], moved
    if mode.endswith("fp32"):  # fp32 rows differ in the last bits only
        assert np.abs(together - alone).max() <= 1e-6
