"""Stored paths (issue 18, item 1): stores name files and local models by absolute paths, so a
store made in one folder updates and searches from any other; stores written before (relative
names, as typed) still update without re-embedding; an update that would re-embed everything
is refused. Also `--update hash` (item 5) and `--update` of a missing output (item 6)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from siglip_cli.cli.app import normalize_argv
from siglip_cli.core.errors import UsageError
from siglip_cli.store import Entry, open_store, write_store

from .search_fixtures import cli, make_photos, one_error_line, process, records, store_files

FORMATS = [".npy", ".npz", ".parquet", ".jsonl"]
# What write_store adds to a meta by itself (the rest is what the run recorded).
_COMPUTED = ("format", "version", "dim", "dtype", "count", "image_rows", "text_rows", "digests")


@pytest.fixture()
def work(tmp_path, tiny_checkpoint, monkeypatch):
    """tmp/work holding photos/ (3 pictures) and ck/ (a local checkpoint), the working folder;
    no SIGLIP_MODEL, so the model comes from --model or the store's meta."""
    folder = tmp_path / "work"
    make_photos(folder / "photos", 3)
    shutil.copytree(tiny_checkpoint, folder / "ck")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.delenv("SIGLIP_MODEL", raising=False)
    monkeypatch.chdir(folder)
    return folder


def _env(tmp_path) -> dict:
    return {"SIGLIP_CACHE_DIR": str(tmp_path / "cache")}


def _counts(stderr: str) -> str:
    line = next((line for line in stderr.splitlines() if "--update:" in line and " new " in line), "")
    return line.split("--update: ", 1)[-1]


def test_a_store_made_in_one_folder_updates_and_searches_from_another(work, tmp_path, monkeypatch):
    made = cli("embed", "photos", "--out", "vecs.npy", "--model", "ck", env=_env(tmp_path))
    assert made.exit_code == 0, made.stderr
    store = open_store(work / "vecs.npy")
    assert store.names == [str(work / "photos" / f"p00{i}.png") for i in range(3)]
    assert store.meta["model"] == str(work / "ck")

    monkeypatch.chdir(tmp_path / "elsewhere")
    update = cli("embed", "../work/photos", "--out", "../work/vecs.npy", "--update", env=_env(tmp_path))
    assert update.exit_code == 0, update.stderr
    assert _counts(update.stderr) == "0 new (or skipped before), 0 changed, 3 unchanged, 0 gone"
    assert open_store(work / "vecs.npy").names == store.names

    # A new text query (nothing cached) must load the model the meta names, from here.
    found = cli("search", "../work/vecs.npy", "a red square", "--json", "--no-cache", env=_env(tmp_path))
    assert found.exit_code == 0, found.stderr
    hits = records(found.stdout)[0]["results"]
    assert sorted(h["path"] for h in hits) == store.names  # JSON keeps the stored absolute path
    assert all(Path(h["path"]).is_file() for h in hits)

    monkeypatch.chdir(work)  # a table shows them relative to the working folder
    table = cli("search", "vecs.npy", "a red square", "--format", "table", env=_env(tmp_path))
    assert table.exit_code == 0, table.stderr
    assert "photos/p000.png" in table.stdout and str(work) not in table.stdout


def test_a_symbolic_link_is_kept_not_resolved(work, tmp_path):
    os.symlink(work / "photos", work / "linked")
    made = cli("embed", "linked", "--out", "vecs.npy", "--model", "ck", env=_env(tmp_path))
    assert made.exit_code == 0, made.stderr
    assert open_store(work / "vecs.npy").names == [str(work / "linked" / f"p00{i}.png") for i in range(3)]


def _write_old_store(new: Path, old: Path, relative_to: Path) -> None:
    """The store at `new` as the code before absolute paths wrote it: image names as typed from
    `relative_to` (e.g. `photos/p000.png`), a local model as typed (`ck`)."""
    store = open_store(new)
    rows = np.ascontiguousarray(store.rows)
    entries = [Entry(store.kind(i), os.path.relpath(name, relative_to) if store.kind(i) == "image" else name,
                     tuple(store.stamps[i].tolist()), rows, i) for i, name in enumerate(store.names)]
    meta = {k: v for k, v in store.meta.items() if k not in _COMPUTED}
    meta["model"] = os.path.relpath(meta["model"], relative_to)
    write_store(old, entries, store.dim, store.meta["dtype"], meta)


@pytest.mark.parametrize("suffix", FORMATS)
def test_an_old_store_with_relative_paths_updates_without_embedding_again(work, tmp_path, monkeypatch, suffix):
    assert cli("embed", "photos", "--out", f"new{suffix}", "--model", "ck", env=_env(tmp_path)).exit_code == 0
    _write_old_store(work / f"new{suffix}", work / f"old{suffix}", work)
    old = open_store(work / f"old{suffix}")
    assert old.names[0] == "photos/p000.png" and old.meta["model"] == "ck"
    before = np.array(old.rows)

    # From the folder it was made in (a nightly job's line, unchanged): the working folder.
    same = cli("embed", "photos", "--out", f"old{suffix}", "--update", env=_env(tmp_path))
    assert same.exit_code == 0, same.stderr
    assert _counts(same.stderr) == "0 new (or skipped before), 0 changed, 3 unchanged, 0 gone"
    assert "relative to the folder embed ran in" in same.stderr and "images/s" not in same.stderr
    after = open_store(work / f"old{suffix}")
    assert after.names == [str(work / "photos" / f"p00{i}.png") for i in range(3)]
    assert np.array(after.rows).tobytes() == before.tobytes()  # the very same rows, none recomputed

    # From another folder: the relative names are read against the store's own folder.
    _write_old_store(work / f"new{suffix}", work / f"old{suffix}", work)
    monkeypatch.chdir(tmp_path / "elsewhere")
    there = cli("embed", "../work/photos", "--out", f"../work/old{suffix}", "--update", env=_env(tmp_path))
    assert there.exit_code == 0, there.stderr
    assert _counts(there.stderr) == "0 new (or skipped before), 0 changed, 3 unchanged, 0 gone"
    assert np.array(open_store(work / f"old{suffix}").rows).tobytes() == before.tobytes()


def test_an_old_store_elsewhere_is_refused_until_its_folder_is_named(work, tmp_path, monkeypatch):
    assert cli("embed", "photos", "--out", "new.npy", "--model", "ck", env=_env(tmp_path)).exit_code == 0
    (work / "stores").mkdir()
    old = work / "stores" / "old.npy"
    _write_old_store(work / "new.npy", old, work)  # names relative to work/, the store in work/stores/
    before = store_files(old)

    monkeypatch.chdir(tmp_path / "elsewhere")  # neither here nor the store's folder: nothing matches
    refused = cli("embed", "../work/photos", "--out", old, "--update", env=_env(tmp_path))
    assert refused.exit_code == 2 and refused.stdout == ""
    one_error_line(refused.stderr, str(old), "relative", "--relative-to DIR")
    assert store_files(old) == before

    wrong = cli("embed", "../work/photos", "--out", old, "--update", "--relative-to", tmp_path, env=_env(tmp_path))
    assert wrong.exit_code == 2 and one_error_line(wrong.stderr, f"--relative-to {tmp_path}")

    named = cli("embed", "../work/photos", "--out", old, "--update", "--relative-to", "../work", env=_env(tmp_path))
    assert named.exit_code == 0, named.stderr  # the relative model `ck` is found there too
    assert _counts(named.stderr) == "0 new (or skipped before), 0 changed, 3 unchanged, 0 gone"
    assert open_store(old).names == [str(work / "photos" / f"p00{i}.png") for i in range(3)]
    again = cli("embed", "../work/photos", "--out", old, "--update", "--relative-to", "../work", env=_env(tmp_path))
    assert again.exit_code == 0 and "relative to the folder" not in again.stderr  # a cron line keeps working


def test_relative_to_needs_update_and_a_folder(work, tmp_path):
    alone = cli("embed", "photos", "--out", "v.npy", "--model", "ck", "--relative-to", ".", env=_env(tmp_path))
    assert alone.exit_code == 2 and one_error_line(alone.stderr, "--relative-to", "--update")
    missing = cli("embed", "photos", "--out", "v.npy", "--model", "ck", "--update", "--relative-to", "nowhere", env=_env(tmp_path))
    assert missing.exit_code == 2 and one_error_line(missing.stderr, "--relative-to nowhere", "no such folder")


def test_an_update_that_finds_none_of_its_rows_is_refused(work, tmp_path):
    assert cli("embed", "photos", "--out", "vecs.npy", "--model", "ck", env=_env(tmp_path)).exit_code == 0
    before = store_files(work / "vecs.npy")
    (work / "photos").rename(work / "moved")  # the library moved: every file would be new
    refused = cli("embed", "moved", "--out", "vecs.npy", "--update", env=_env(tmp_path))
    assert refused.exit_code == 2
    one_error_line(refused.stderr, "none of the 3 images", "without --update")
    assert store_files(work / "vecs.npy") == before
    assert not (work / "vecs.npy.partial").exists()


# ------------------------------------------------------------------------- --update hash, missing outputs
@pytest.mark.parametrize("value", ["hash", "mtime"])
def test_update_followed_by_a_word_is_refused_with_the_equals_form(tmp_path, value, tiny_checkpoint):
    make_photos(tmp_path / "photos", 1)
    out = tmp_path / "vecs.npy"
    result = process("embed", tmp_path / "photos", "--out", out, "--update", value, env={"SIGLIP_MODEL": str(tiny_checkpoint)})
    assert result.returncode == 2 and result.stdout == ""
    one_error_line(result.stderr, f"--update={value}", f"./{value}")
    assert not out.exists() and not (tmp_path / "vecs.npy.partial").exists()


def test_normalize_argv_reads_update_alone_and_leaves_words_after_double_dash():
    assert normalize_argv(["embed", "a.jpg", "--out", "v.npy", "--update"])[-1] == "--update=mtime"
    with pytest.raises(UsageError, match="--update=hash"):
        normalize_argv(["embed", "--update", "hash", "--out", "v.npy"])
    assert normalize_argv(["embed", "--out", "v.npy", "--", "--update", "hash"])[-2:] == ["--update", "hash"]


def test_update_of_a_missing_output_creates_it(work, tmp_path):
    created = cli("embed", "photos", "--out", "vecs.npy", "--model", "ck", "--update", env=_env(tmp_path))
    assert created.exit_code == 0, created.stderr
    assert "vecs.npy does not exist yet; creating it" in created.stderr
    clean = cli("embed", "photos", "--out", "clean.npy", "--model", "ck", env=_env(tmp_path))
    assert clean.exit_code == 0
    mine, theirs = open_store(work / "vecs.npy"), open_store(work / "clean.npy")
    assert mine.names == theirs.names
    np.testing.assert_allclose(mine.rows, theirs.rows, atol=1e-6)
    again = cli("embed", "photos", "--out", "vecs.npy", "--update", env=_env(tmp_path))  # the same line, next night
    assert again.exit_code == 0 and _counts(again.stderr) == "0 new (or skipped before), 0 changed, 3 unchanged, 0 gone"
    meta = json.loads((work / "vecs.npy.meta.json").read_text())
    assert meta["model"] == str(work / "ck")


def test_an_old_store_whose_relative_model_is_not_here_says_how_to_name_it(work, tmp_path, monkeypatch):
    assert cli("embed", "photos", "--out", "new.npy", "--model", "ck", env=_env(tmp_path)).exit_code == 0
    _write_old_store(work / "new.npy", work / "old.npy", work)
    (work / "ck").rename(tmp_path / "ck-moved")
    result = cli("embed", "photos", "--out", "old.npy", "--update", env=_env(tmp_path))
    assert result.exit_code == 3
    one_error_line(result.stderr, "--update: ", "old.npy was made with ck", "--model", "--relative-to DIR")
    assert cli("embed", "photos", "--out", "old.npy", "--update", "--model", tmp_path / "ck-moved", env=_env(tmp_path)).exit_code == 0


def test_search_finds_an_old_store_s_relative_model_beside_the_store(work, tmp_path, monkeypatch):
    assert cli("embed", "photos", "--out", "new.npy", "--model", "ck", env=_env(tmp_path)).exit_code == 0
    _write_old_store(work / "new.npy", work / "old.npy", work)
    monkeypatch.chdir(tmp_path / "elsewhere")
    found = cli("search", "../work/old.npy", "a red square", "--json", "--no-cache", env=_env(tmp_path))
    assert found.exit_code == 0, found.stderr
    assert sorted(h["path"] for h in records(found.stdout)[0]["results"]) == [f"photos/p00{i}.png" for i in range(3)]
