"""Signals and leftovers (issue 17, item 10): SIGTERM is treated like Ctrl-C (one line, finished
rows kept for --resume, exit 143), and the temporaries a killed run leaves beside an output are
removed by the next run on it."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from siglip_cli.cli.app import app
from siglip_cli.safefiles import temporary_beside
from siglip_cli.store import output_files

from .test_hostile import _env, _siglip, _start_writer, slow_folder, slow_url  # noqa: F401 (fixtures)


def test_sigterm_keeps_finished_rows_and_resume_finishes(slow_folder, slow_url, tmp_path, tiny_checkpoint):  # noqa: F811
    url = slow_url("sigterm")
    env = _env(tiny_checkpoint, tmp_path / "cache")
    out = tmp_path / "x.npy"
    writer = _start_writer(slow_folder, url, out, env)
    writer.send_signal(signal.SIGTERM)
    assert writer.wait(timeout=60) == 143
    stderr = writer.stderr.read()
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("siglip:")]
    assert any("terminated (SIGTERM)" in line and "rows kept in" in line and "--resume" in line for line in lines), stderr
    partial = out.with_name("x.npy.partial")
    assert (partial / "rows.jsonl").read_text().count("\n") >= 4  # the committed batches
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    resumed = _siglip("embed", slow_folder, url, "--out", out, "--resume", env=env)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert np.load(out).shape == (21, 32) and not partial.exists()


def test_the_next_run_removes_temporaries_a_killed_run_left(tiny_checkpoint, tmp_path, image_dir, monkeypatch):
    """What a SIGKILL during the final write leaves: full-size hidden temporaries beside every
    file of the store. The next run (holding the lock) removes them, and says so; a stranger's
    file with a similar name stays."""
    monkeypatch.setenv("SIGLIP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SIGLIP_MODEL", str(tiny_checkpoint))
    out = tmp_path / "vecs.npy"
    left = []
    for path in output_files(out):
        tmp = Path(temporary_beside(path))
        tmp.write_bytes(b"\0" * 250_000)
        left.append(tmp)
    # the same names an older siglip (tempfile.mkstemp) gave its temporaries
    old_style = tmp_path / ".vecs.npy.k3_9zq0a.tmp"
    old_style.write_bytes(b"\0" * 250_000)
    stranger = tmp_path / ".vecs.npy.keep-me.tmp"
    stranger.write_text("not ours")
    result = CliRunner().invoke(app, ["embed", str(image_dir / "a.jpg"), "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "removed 5 temporary files (1.2 MB) left beside" in result.stderr
    assert not any(p.exists() for p in left) and not old_style.exists()
    assert stranger.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".vecs.npy.keep-me.tmp"]
