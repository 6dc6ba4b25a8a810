"""Messages that said the wrong thing (issue 17, item 19): each one, as a user meets it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from siglip_cli.cli.app import app

from .conftest import random_image

LABELS = "a cat,a dog"


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("siglip: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.fixture()
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill_completely(disk: Path) -> Path:
    """Not one free page left (inodes remain: files can still be created, not written)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


# ============================================================================ a full disk
def test_zero_free_pages_blames_the_lock_file_not_standard_output(run, small_disk, image_dir):
    filler = _fill_completely(small_disk)
    out = small_disk / "v.npy"
    result = run("embed", image_dir / "a.jpg", "--out", out)
    assert result.exit_code == 1
    line = _one_error_line(result.stderr)
    assert "standard output" not in line
    assert f"{small_disk / '.v.npy.lock'}: no space left on the device" in line
    filler.unlink()
    assert run("embed", image_dir / "a.jpg", "--out", out).exit_code == 0


def test_a_full_disk_as_the_run_begins_leaves_nothing_that_resume_refuses(run, small_disk, image_dir, tmp_path):
    """The message says to run again with --resume; that must then work (it failed with
    "unreadable state.json" when the disk filled while the partial folder was being set up)."""
    out = small_disk / "v.npy"
    filler = _fill_completely(small_disk)
    filler_size = filler.stat().st_size
    # leave room for the lock (one page) but not for the partial folder's state
    with open(filler, "r+b") as fh:
        fh.truncate(filler_size - 4096)
    result = run("embed", image_dir, "--out", out)
    assert result.exit_code == 1
    line = _one_error_line(result.stderr)
    assert "no space left on the device" in line and "--resume" in line
    assert not (small_disk / "v.npy.partial").exists() or (small_disk / "v.npy.partial" / "state.json").exists()
    filler.unlink()
    resumed = run("embed", image_dir, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert np.load(out).shape[0] == len(list(image_dir.iterdir()))


def test_resume_accepts_a_partial_folder_with_no_state_and_no_rows(run, image_dir, tmp_path):
    """What an older siglip left on a full disk: an empty partial folder."""
    out = tmp_path / "v.npy"
    (tmp_path / "v.npy.partial").mkdir()
    resumed = run("embed", image_dir / "a.jpg", "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert np.load(out).shape[0] == 1


# ============================================================================ search
@pytest.fixture()
def index(run, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        random_image(i).save(folder / f"{i}.png")
    out = tmp_path / "vecs.npy"
    assert run("embed", folder, "--out", out).exit_code == 0
    return out


def test_no_hits_without_a_threshold_does_not_blame_the_threshold(run, tmp_path, index):
    none = run("search", index, "a cat", "--format", "table", "--threshold", "1.0")
    assert "nothing reached the --threshold" in none.stdout
    import io

    from rich.console import Console

    from siglip_cli.cli import render
    from siglip_cli.results import SearchResult

    console = Console(file=io.StringIO(), width=80, color_system=None)
    console.print(render.search_ranking(SearchResult("a cat", []), console))
    shown = console.file.getvalue()
    assert "--threshold" not in shown and "no rows to search in this index" in shown


def test_search_says_when_a_long_query_is_cut_as_classify_does(run, index, image_dir):
    long_query = " ".join(["a very long description of a cat"] * 30)
    searched = run("search", index, long_query, "--no-cache")
    assert searched.exit_code == 0, searched.stderr
    classified = run("classify", image_dir / "a.jpg", "--label", long_query, "--no-cache")
    note = [line for line in classified.stderr.splitlines() if "cut to fit" in line]
    assert note and [line for line in searched.stderr.splitlines() if "cut to fit" in line] == note


@pytest.mark.parametrize("query, why", [
    ("{}", "placeholder"),
    ("\x1b[2J", "only control characters"),
    ("\x07\x00", "only control characters"),
    ("   ", "empty text query"),
])
def test_queries_with_nothing_to_search_for_are_refused(run, index, query, why):
    result = run("search", index, query)
    assert result.exit_code == 2
    line = _one_error_line(result.stderr)
    assert why in line and "\x1b" not in line


@pytest.fixture()
def silent_server():
    """A hub endpoint that accepts connections and never answers (a hanging network)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def test_a_hub_model_in_the_meta_is_answered_from_the_cache_without_the_network(tiny_checkpoint, tmp_path, silent_server):
    """The meta names a hub id and commit that the local hub cache holds: search must not ask
    the network (here a server that never answers: the old code waited out the hub's timeout)."""
    hub = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = hub / "models--someone--tiny-siglip" / "snapshots" / commit
    shutil.copytree(tiny_checkpoint, snapshot)
    (hub / "models--someone--tiny-siglip" / "refs").mkdir()
    (hub / "models--someone--tiny-siglip" / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "SIGLIP_CACHE_DIR": str(tmp_path / "cache"),
           "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": silent_server, "HF_HUB_ETAG_TIMEOUT": "25",
           "HF_HUB_DOWNLOAD_TIMEOUT": "25", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("SIGLIP_MODEL", None)
    photo = tmp_path / "p.png"
    random_image(3).save(photo)
    out = tmp_path / "vecs.npy"
    made = subprocess.run([sys.executable, "-m", "siglip_cli", "embed", str(photo), "--out", str(out),
                           "--model", "someone/tiny-siglip", "--offline"], env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    meta = json.loads(out.with_name("vecs.npy.meta.json").read_text())
    assert meta["model"] == "someone/tiny-siglip" and meta["revision"] == commit
    started = time.monotonic()
    found = subprocess.run([sys.executable, "-m", "siglip_cli", "search", str(out), "a cat", "--no-cache", "--json"],
                           env=env, capture_output=True, text=True, timeout=300)
    waited = time.monotonic() - started
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)[0]["results"][0]["path"] == str(photo)
    assert waited < 20, f"search waited {waited:.0f} s (for the network?)"
