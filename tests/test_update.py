"""`siglip embed --update`: only new or changed files are embedded, rows of files that are gone
are dropped, and the result equals a clean run over the folder as it is now."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from siglip_cli.store import open_store

from .conftest import random_image
from .search_fixtures import ROOT, cli, make_photos, one_error_line, store_files

FORMATS = [".npy", ".npz", ".parquet", ".jsonl"]


@pytest.fixture()
def env(tmp_path, tiny_checkpoint):
    return {"SIGLIP_CACHE_DIR": str(tmp_path / "cache"), "SIGLIP_MODEL": str(tiny_checkpoint)}


def _embed(env, folder, out, *extra):
    result = cli("embed", folder, "--out", out, *extra, env=env)
    assert result.exit_code in (0, 1), result.stderr
    return result


def _indexed(env, tmp_path, count: int, suffix: str = ".npy", *extra) -> tuple[Path, Path]:
    """A folder of `count` photos and its store, embedded once."""
    folder = tmp_path / "photos"
    make_photos(folder, count)
    out = tmp_path / f"vecs{suffix}"
    _embed(env, folder, out, *extra)
    return folder, out


def _assert_equal_stores(found: Path, expected: Path, exact_rows: set[str] = frozenset()) -> None:
    """Same names, kinds and rows in the same order (rows to float32 noise: a picture embedded
    in another batch differs in the last bits), stamps of the same files."""
    mine, theirs = open_store(found), open_store(expected)
    assert mine.names == theirs.names
    np.testing.assert_array_equal(mine.kinds, theirs.kinds)
    np.testing.assert_allclose(mine.rows, theirs.rows, atol=1e-6)
    np.testing.assert_array_equal(mine.stamps["size"], theirs.stamps["size"])
    np.testing.assert_array_equal(mine.stamps["mtime_ns"], theirs.stamps["mtime_ns"])
    for key in ("count", "image_rows", "text_rows", "dim", "dtype", "revision", "normalized"):
        assert mine.meta[key] == theirs.meta[key], key


def _change_picture(path: Path, seed: int) -> None:
    random_image(seed, (48, 40)).save(path)


@pytest.mark.parametrize("suffix", FORMATS)
def test_update_after_adding_changing_renaming_and_deleting_equals_a_clean_run(env, tmp_path, suffix):
    folder, out = _indexed(env, tmp_path, 6, suffix)
    before = open_store(out)
    before_rows = {name: before.rows[i].copy() for i, name in enumerate(before.names)}

    make_photos(folder, 2, start=6)  # added: p006, p007
    _change_picture(folder / "p001.png", 999)  # changed
    (folder / "p002.png").rename(folder / "p010.png")  # renamed: one new, one gone
    (folder / "p003.png").unlink()  # deleted
    (folder / "sub").mkdir()
    make_photos(folder / "sub", 1, start=20)  # added in a sub-folder

    result = cli("embed", folder, "--out", out, "--update", env=env)
    assert result.exit_code == 0, result.stderr
    assert "--update: 4 new (or skipped before), 1 changed, 3 unchanged, 2 gone" in result.stderr
    assert "; 3 kept from before)" in result.stderr

    clean = tmp_path / f"clean{suffix}"
    _embed(env, folder, clean)
    _assert_equal_stores(out, clean)
    after = open_store(out)
    for name in ("p000.png", "p004.png", "p005.png"):  # untouched: the very same bytes
        row = after.names.index(str(folder / name))
        assert after.rows[row].tobytes() == before_rows[str(folder / name)].tobytes()
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*.tmp"))


def test_an_update_with_nothing_new_keeps_every_row_and_embeds_nothing(env, tmp_path):
    folder, out = _indexed(env, tmp_path, 3)
    before = open_store(out)
    result = cli("embed", folder, "--out", out, "--update", env=env)
    assert result.exit_code == 0 and "0 new (or skipped before), 0 changed, 3 unchanged, 0 gone" in result.stderr
    assert "images/s" not in result.stderr  # nothing was embedded
    np.testing.assert_array_equal(open_store(out).rows, before.rows)


def test_touched_files_are_embedded_again_by_time_but_not_by_hash(env, tmp_path):
    folder, out = _indexed(env, tmp_path, 3)
    first = cli("embed", folder, "--out", out, "--update=hash", env=env)  # records content hashes
    assert first.exit_code == 0 and "0 changed, 3 unchanged" in first.stderr
    later = time.time() + 5
    os.utime(folder / "p001.png", (later, later))  # same content, new modification time
    by_hash = cli("embed", folder, "--out", out, "--update=hash", env=env)
    assert by_hash.exit_code == 0 and "0 changed, 3 unchanged" in by_hash.stderr
    stamps = open_store(out).stamps
    assert all(len(bytes(h)) == 32 for h in stamps["sha256"])  # hashes are kept from now on
    assert stamps["mtime_ns"][1] == os.stat(folder / "p001.png").st_mtime_ns  # the file as it is now
    again = cli("embed", folder, "--out", out, "--update", env=env)  # by time: nothing changed since
    assert again.exit_code == 0 and "0 changed, 3 unchanged" in again.stderr
    os.utime(folder / "p002.png", (later + 5, later + 5))
    by_time = cli("embed", folder, "--out", out, "--update", env=env)
    assert by_time.exit_code == 0 and "1 changed, 2 unchanged" in by_time.stderr


def test_only_a_hash_sees_new_content_with_the_same_size_and_time(env, tmp_path):
    """A tool that rewrites a file and restores its time (rsync -t, some editors): size and
    time agree, so --update keeps the old row (as documented), and --update=hash does not."""
    folder, out = _indexed(env, tmp_path, 3)
    assert cli("embed", folder, "--out", out, "--update=hash", env=env).exit_code == 0  # records the hashes
    target = folder / "p001.png"
    stat = target.stat()
    data = bytearray(target.read_bytes())
    data[-20] ^= 0xFF  # inside the last chunk's CRC: another file of the same size
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    by_time = cli("embed", folder, "--out", out, "--update", env=env)
    assert "0 changed" in by_time.stderr
    by_hash = cli("embed", folder, "--out", out, "--update=hash", env=env)
    assert "1 changed, 2 unchanged" in by_hash.stderr


def test_text_rows_follow_the_texts_given(env, tmp_path):
    folder, out = _indexed(env, tmp_path, 2, ".npy", "--text", "a cat", "--text", "a dog")
    make_photos(folder, 1, start=2)
    result = cli("embed", folder, "--out", out, "--update", "--text", "a dog", "--text", "a bird", env=env)
    assert result.exit_code == 0, result.stderr
    clean = tmp_path / "clean.npy"
    _embed(env, folder, clean, "--text", "a dog", "--text", "a bird")
    _assert_equal_stores(out, clean)
    assert open_store(out).names[-2:] == ["a dog", "a bird"]


def test_a_file_that_went_bad_loses_its_row(env, tmp_path):
    folder, out = _indexed(env, tmp_path, 3)
    (folder / "p001.png").write_bytes(b"no longer a picture")
    result = cli("embed", folder, "--out", out, "--update", env=env)
    assert result.exit_code == 1 and "p001.png" in result.stderr and "Traceback" not in result.stderr
    clean = tmp_path / "clean.npy"
    _embed(env, folder, clean)
    _assert_equal_stores(out, clean)
    assert [Path(s["path"]).name for s in open_store(out).meta["skipped"]] == ["p001.png"]


def test_update_refuses_other_settings(env, tmp_path, checkpoint_factory):
    folder = tmp_path / "photos"
    make_photos(folder, 2)
    out = tmp_path / "vecs.npy"
    _embed(env, folder, out)  # (an --update of a missing output creates it: tests/test_paths.py)
    before = store_files(out)
    other = cli("embed", folder, "--out", out, "--update", "--model", checkpoint_factory("update-other", seed=3), env=env)
    assert other.exit_code == 2 and one_error_line(other.stderr, "--update", "revision")
    half = cli("embed", folder, "--out", out, "--update", "--out-dtype", "float16", env=env)
    assert half.exit_code == 2 and one_error_line(half.stderr, "other settings", "float16")
    raw = cli("embed", folder, "--out", out, "--update", "--no-normalize", env=env)
    assert raw.exit_code == 2 and one_error_line(raw.stderr, "normalized")
    bad = cli("embed", folder, "--out", out, "--update=size", env=env)
    assert bad.exit_code == 2 and one_error_line(bad.stderr, "--update=size")
    assert store_files(out) == before


def test_a_failed_update_keeps_the_previous_store_whole(env, tmp_path, monkeypatch):
    from siglip_cli import store

    folder, out = _indexed(env, tmp_path, 2)
    before = store_files(out)
    make_photos(folder, 1, start=2)

    def full_disk(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store, "_write_npy_rows", full_disk)
    result = cli("embed", folder, "--out", out, "--update", env=env)
    assert result.exit_code == 1 and one_error_line(result.stderr, "no space left")
    assert store_files(out) == before


# ------------------------------------------------------------------------- interrupt + resume
def _update_process(folder: Path, out: Path, env: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "siglip_cli", "embed", str(folder), "--out", str(out), "--update", "--batch-size", "2",
         "--workers", "1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
    )


def test_an_interrupted_update_resumes_to_a_clean_result(env, tmp_path):
    folder, out = _indexed(env, tmp_path, 3)
    before = store_files(out)
    for i in range(40):  # large enough that the update takes a few seconds
        random_image(500 + i, (900, 700)).save(folder / f"q{i:03d}.jpg", quality=90)
    (folder / "p000.png").unlink()

    proc = _update_process(folder, out, env)
    rows = out.with_name("vecs.npy.partial") / "rows.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not rows.exists() or rows.read_text().count("\n") < 4):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    stderr = proc.stderr.read()
    assert "--resume" in stderr and "Traceback" not in stderr
    assert store_files(out) == before  # the store is untouched until an update completes
    kept = rows.read_text().count("\n")
    assert 4 <= kept < 40

    resumed = _update_process(folder, out, env, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert f"resuming: {kept} rows already done" in resumed.stderr.read()
    clean = tmp_path / "clean.npy"
    _embed(env, folder, clean)
    _assert_equal_stores(out, clean)
    assert not out.with_name("vecs.npy.partial").exists()
    assert json.loads(Path(f"{out}.meta.json").read_text())["image_rows"] == 42
