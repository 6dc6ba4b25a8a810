"""The safe file primitives (siglip_cli/safefiles.py) and the places that use them: planted
symbolic links at the lock, temporaries, sidecars, the partial folder and its files, label-cache
entries; FIFOs where we read our own files; stale temporaries of a killed run.

Each planted link points at a "victim" file that must come out of the run byte-for-byte
unchanged, and the link itself must never be removed by us (only replaced where we write the
file it stands on)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from siglip_cli import safefiles
from siglip_cli.cache import TextCache
from siglip_cli.cli.app import app
from siglip_cli.core.errors import OutputError, SiglipError, UsageError
from siglip_cli.safefiles import (
    NotRegularFile,
    OutputLock,
    atomic_write_bytes,
    atomic_write_text,
    make_directory,
    open_append,
    open_regular,
    remove_stale_temporaries,
    temporary_beside,
)
from siglip_cli.store import PartialRows, open_store, output_files

LABELS = "a cat,a dog"
VICTIM_TEXT = "the victim's own words\n"


@pytest.fixture()
def victim(tmp_path) -> Path:
    folder = tmp_path / "victim-home"
    folder.mkdir()
    path = folder / "precious.txt"
    path.write_text(VICTIM_TEXT)
    return path


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("siglip: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def _fifo_opened_by_nobody(path: Path) -> None:
    os.mkfifo(path)


def _with_deadline(function, seconds: float = 20):
    """Run `function` in a thread; fail (instead of hanging the suite) when it blocks."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        # unblock the FIFO so the thread can end, then fail
        pytest.fail(f"{function} blocked for {seconds} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


# ============================================================================ the lock
def test_lock_refuses_a_planted_symlink_and_leaves_its_target_and_the_link(tmp_path, victim):
    out = tmp_path / "vecs.npy"
    lock = tmp_path / ".vecs.npy.lock"
    lock.symlink_to(victim)
    with pytest.raises(UsageError, match="symbolic link"):
        OutputLock(out).acquire()
    assert victim.read_text() == VICTIM_TEXT
    assert lock.is_symlink()


def test_lock_refuses_a_dangling_symlink_without_creating_its_target(tmp_path):
    out = tmp_path / "vecs.npy"
    target = tmp_path / "elsewhere" / "created-by-us"
    target.parent.mkdir()
    (tmp_path / ".vecs.npy.lock").symlink_to(target)
    with pytest.raises(UsageError, match="symbolic link"):
        OutputLock(out).acquire()
    assert not target.exists()


def test_lock_refuses_a_fifo_without_blocking(tmp_path):
    out = tmp_path / "vecs.npy"
    os.mkfifo(tmp_path / ".vecs.npy.lock")
    with pytest.raises(UsageError, match="FIFO"):
        _with_deadline(lambda: OutputLock(out).acquire())


def test_lock_release_never_removes_a_link_planted_after_acquire(tmp_path, victim):
    out = tmp_path / "vecs.npy"
    lock = OutputLock(out).acquire()
    os.unlink(lock.path)
    lock.path.symlink_to(victim)
    lock.release()
    assert lock.path.is_symlink() and victim.read_text() == VICTIM_TEXT


def test_lock_still_excludes_a_second_holder_and_cleans_up(tmp_path):
    out = tmp_path / "vecs.npy"
    with OutputLock(out):
        with pytest.raises(UsageError, match="another siglip run is writing it"):
            OutputLock(out).acquire()
    assert not (tmp_path / ".vecs.npy.lock").exists()


def test_embed_with_a_symlink_at_the_lock_fails_in_one_line_and_touches_nothing(run, tmp_path, image_dir, victim):
    out = tmp_path / "vecs.npy"
    (tmp_path / ".vecs.npy.lock").symlink_to(victim)
    result = run("embed", image_dir / "a.jpg", "--out", out)
    assert result.exit_code == 2
    line = _one_error_line(result.stderr)
    assert ".vecs.npy.lock" in line and "symbolic link" in line
    assert victim.read_text() == VICTIM_TEXT and (tmp_path / ".vecs.npy.lock").is_symlink()
    assert not out.exists()


# ============================================================================ temporaries and atomic writes
def test_temporary_beside_never_opens_an_existing_name(tmp_path, monkeypatch, victim):
    """The random name is forced to collide with a planted link: O_EXCL|O_NOFOLLOW picks another."""
    target = tmp_path / "out.bin"
    names = iter(["aaaaaaaa", "bbbbbbbb"])
    monkeypatch.setattr(safefiles, "_temporary_name", lambda path: path.with_name(f".{path.name}.{next(names)}.tmp"))
    (tmp_path / ".out.bin.aaaaaaaa.tmp").symlink_to(victim)
    tmp = temporary_beside(target)
    assert Path(tmp).name == ".out.bin.bbbbbbbb.tmp" and Path(tmp).stat().st_size == 0
    assert victim.read_text() == VICTIM_TEXT


def test_temporaries_get_the_permissions_of_a_plain_open(tmp_path):
    mask = os.umask(0o022)
    try:
        tmp = Path(temporary_beside(tmp_path / "x"))
    finally:
        os.umask(mask)
    assert tmp.stat().st_mode & 0o777 == 0o644


def test_atomic_write_replaces_a_planted_symlink_never_its_target(tmp_path, victim):
    path = tmp_path / "vecs.npy.meta.json"
    path.symlink_to(victim)
    atomic_write_text(path, '{"ours": true}')
    assert not path.is_symlink() and json.loads(path.read_text()) == {"ours": True}
    assert victim.read_text() == VICTIM_TEXT
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    atomic_write_bytes(path, b"old")

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safefiles, "reserve_space", full)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_store_sidecars_replace_planted_links(run, tmp_path, image_dir, victim):
    out = tmp_path / "vecs.npy"
    for path in output_files(out):
        path.symlink_to(victim)
    # a planted file at the output is refused as foreign; links at the sidecars only would be
    # replaced, so plant at the sidecars alone
    out.unlink()
    result = run("embed", image_dir / "a.jpg", image_dir / "b.png", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert victim.read_text() == VICTIM_TEXT
    assert not any(p.is_symlink() for p in output_files(out))
    assert open_store(out).names == [str(image_dir / "a.jpg"), str(image_dir / "b.png")]


# ============================================================================ the partial folder
def test_make_directory_refuses_a_symlink_to_a_folder(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "x.partial").symlink_to(elsewhere)
    with pytest.raises(NotRegularFile, match="symbolic link"):
        make_directory(tmp_path / "x.partial")
    assert make_directory(tmp_path / "new").is_dir()
    assert make_directory(tmp_path / "new").is_dir()  # an existing folder of ours is fine


def test_embed_never_writes_through_a_partial_folder_link(run, tmp_path, image_dir):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "vecs.npy"
    (tmp_path / "vecs.npy.partial").symlink_to(elsewhere)
    for extra in ([], ["--resume"]):
        result = run("embed", image_dir / "a.jpg", "--out", out, *extra)
        assert result.exit_code != 0
        line = _one_error_line(result.stderr)
        assert "vecs.npy.partial" in line and "symbolic link" in line
    assert list(elsewhere.iterdir()) == []
    assert (tmp_path / "vecs.npy.partial").is_symlink()


@pytest.mark.parametrize("name", ["rows.bin", "rows.jsonl", "skipped.jsonl", "state.json"])
def test_resume_refuses_links_inside_the_partial_folder(tmp_path, victim, name):
    """An interrupted run's folder with one of its files swapped for a link: the resume refuses
    it in one line, and neither reads through it nor truncates or appends to its target (the old
    code truncated the target of a rows.bin link to whole rows)."""
    folder = tmp_path / "vecs.npy.partial"
    settings = {"model": "m", "revision": "r", "inputs": "abc"}
    first = PartialRows(folder, 4, "float32", settings, resume=False)
    first.add("image", "a.jpg", (1, 2, b""), np.ones(4, np.float32))
    first.skip("b.jpg", "b.jpg: broken")
    first.commit()
    first.close()
    target = folder / name
    victim.write_bytes((target.read_bytes() * 3)[: len(VICTIM_TEXT) * 2])  # looks like a real one
    before = victim.read_bytes()
    target.unlink()
    target.symlink_to(victim)
    with pytest.raises(SiglipError) as caught:
        PartialRows(folder, 4, "float32", settings, resume=True)
    assert "\n" not in str(caught.value) and str(folder) in str(caught.value)
    assert victim.read_bytes() == before and target.is_symlink()


def test_open_append_refuses_links_and_fifos(tmp_path, victim):
    (tmp_path / "link").symlink_to(victim)
    with pytest.raises(NotRegularFile, match="symbolic link"):
        open_append(tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(NotRegularFile, match="FIFO"):
        _with_deadline(lambda: open_append(tmp_path / "fifo"))
    assert victim.read_text() == VICTIM_TEXT
    with open_append(tmp_path / "plain") as fh:
        fh.write(b"x")
    assert (tmp_path / "plain").read_bytes() == b"x"


# ============================================================================ reading our own files
def test_open_regular_refuses_a_fifo_at_once(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    started = time.monotonic()
    with pytest.raises(NotRegularFile, match="FIFO"):
        _with_deadline(lambda: open_regular(tmp_path / "fifo"))
    assert time.monotonic() - started < 10
    with pytest.raises(NotRegularFile, match="device"):
        open_regular("/dev/null")
    with pytest.raises(NotRegularFile, match="folder"):
        open_regular(tmp_path)


def test_open_regular_can_refuse_links(tmp_path, victim):
    (tmp_path / "link").symlink_to(victim)
    assert open_regular(tmp_path / "link").read() == VICTIM_TEXT.encode()
    with pytest.raises(NotRegularFile, match="symbolic link"):
        open_regular(tmp_path / "link", follow_symlinks=False)


def test_label_cache_entries_never_block_on_a_fifo_and_replace_links(tmp_path, victim):
    cache = TextCache(tmp_path / "cache", "rev", "cpu-float32", dim=4)
    vector = np.arange(1, 5, dtype=np.float32)
    cache.put("a cat", vector)
    np.testing.assert_array_equal(cache.get("a cat"), vector)
    entry = cache._path("a cat")
    entry.unlink()
    os.mkfifo(entry)
    assert _with_deadline(lambda: cache.get("a cat")) is None  # recomputed, never a hang
    cache.put("a cat", vector)  # and repaired: the FIFO is replaced by the entry
    np.testing.assert_array_equal(cache.get("a cat"), vector)
    other = cache._path("a dog")
    other.symlink_to(victim)
    assert cache.get("a dog") is None
    cache.put("a dog", vector)
    assert victim.read_text() == VICTIM_TEXT and not other.is_symlink()


def test_classify_with_a_fifo_in_the_label_cache_finishes(run, tmp_path, image_dir):
    first = run("classify", image_dir / "a.jpg", "--labels", LABELS, "--json")
    assert first.exit_code == 0, first.stderr
    entries = list((tmp_path / "cache").rglob("*.npy"))
    assert len(entries) == 2
    for entry in entries:
        entry.unlink()
        os.mkfifo(entry)
    again = _with_deadline(lambda: run("classify", image_dir / "a.jpg", "--labels", LABELS, "--json"), 120)
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout) == json.loads(first.stdout)


# ============================================================================ stale temporaries
def test_remove_stale_temporaries_removes_ours_only(tmp_path, victim):
    out = tmp_path / "vecs.npy"
    ours = [Path(temporary_beside(p)) for p in output_files(out)]
    for path in ours:
        path.write_bytes(b"x" * 100)
    other_output = Path(temporary_beside(tmp_path / "vecs.npy.x.npy"))  # another output's, maybe live
    unrelated = tmp_path / ".vecs.npy.notours.tmp"
    unrelated.write_text("keep")
    link = tmp_path / ".vecs.npy.abcdefgh.tmp"
    link.symlink_to(victim)
    removed = remove_stale_temporaries(output_files(out))
    assert sorted(p for p, _ in removed) == sorted(ours) and all(size == 100 for _, size in removed)
    assert other_output.exists() and unrelated.exists() and link.is_symlink()
    assert victim.read_text() == VICTIM_TEXT


# ============================================================================ --preview thumbnails
def test_preview_thumbnails_never_block_on_a_fifo(tmp_path):
    """A FIFO where an indexed image was: no thumbnail, at once (it hung search --preview)."""
    from PIL import Image

    from siglip_cli.cli.preview import thumbnail

    def renderer(picture, width):  # what textual-image's renderable receives
        return picture

    Image.new("RGB", (800, 600), (200, 10, 10)).save(tmp_path / "real.jpg")
    picture = thumbnail(str(tmp_path / "real.jpg"), renderer)
    assert picture.size == (512, 384) and picture.getpixel((5, 5))[0] > 150
    os.mkfifo(tmp_path / "fifo.jpg")
    assert _with_deadline(lambda: thumbnail(str(tmp_path / "fifo.jpg"), renderer)) is None
    assert thumbnail(str(tmp_path / "gone.jpg"), renderer) is None


@pytest.mark.parametrize("suffix", [".meta.json", ".paths.txt", ".stamps.npy"])
def test_a_fifo_at_a_sidecar_is_refused_in_one_line_not_waited_on(run, tmp_path, image_dir, suffix):
    out = tmp_path / "vecs.npy"
    assert run("embed", image_dir / "a.jpg", "--out", out).exit_code == 0
    side = out.with_name(out.name + suffix)
    side.unlink()
    os.mkfifo(side)
    if suffix == ".stamps.npy":  # read only by --update and --resume: through the Python API here
        with pytest.raises(OutputError, match="FIFO"):
            _with_deadline(lambda: open_store(out).stamps)
        return
    result = _with_deadline(lambda: run("search", out, "a cat"), 120)
    assert result.exit_code == 1
    line = _one_error_line(result.stderr)
    assert side.name in line and "FIFO" in line
