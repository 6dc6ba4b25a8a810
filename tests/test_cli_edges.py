"""Edge cases a shell user meets: a terminal on stderr, a closed pipe, odd names and labels."""

from __future__ import annotations

import json
import re
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from siglip_cli.cli.app import app


def _env(checkpoint: Path, cache: Path) -> dict:
    # SIGLIP_PROGRESS_DELAY=0: the bar shows at once, so these short runs draw one
    return {**os.environ, "SIGLIP_MODEL": str(checkpoint), "SIGLIP_CACHE_DIR": str(cache), "COLUMNS": "100",
            "SIGLIP_PROGRESS_DELAY": "0"}


def _on_a_terminal(args: list[str], env: dict) -> tuple[subprocess.CompletedProcess, str]:
    """Run siglip with stderr on a real terminal (a pty) and stdout on a pipe; returns the
    process and what the terminal showed."""
    import threading

    leader, follower = pty.openpty()
    chunks: list[bytes] = []

    def drain():
        while True:
            try:
                data = os.read(leader, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "siglip_cli", *args], stdout=subprocess.PIPE, stderr=follower,
                              env=env, timeout=120)
    finally:
        os.close(follower)
        reader.join(timeout=5)
        os.close(leader)
    return proc, b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.parametrize("command", [["embed", "--format", "jsonl"], ["classify", "--labels", "a,b", "--format", "jsonl"]])
def test_progress_bar_on_a_terminal_never_swallows_stdout(command, image_dir, tiny_checkpoint, tmp_path):
    """The progress bar shows on the terminal; stdout, a pipe, still receives every record and
    nothing else."""
    proc, screen = _on_a_terminal([command[0], str(image_dir), "--recursive", *command[1:], "-b", "1"],
                                  _env(tiny_checkpoint, tmp_path / "cache"))
    assert proc.returncode == 0
    assert "━" in screen and "/5" in screen  # the bar was drawn
    records = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert len(records) == 5 and all("path" in r for r in records)


@pytest.fixture()
def run(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("SIGLIP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SIGLIP_MODEL", str(tiny_checkpoint))
    return lambda *args: CliRunner().invoke(app, [str(a) for a in args])


def test_labels_with_brackets_are_not_markup(run, image_dir):
    result = run("classify", image_dir / "a.jpg", image_dir / "b.png", "--label", "cat [x]", "--label", "[/]", "-f", "table")
    assert result.exit_code == 0, result.stderr
    assert "cat [x]" in result.stdout and "[/]" in result.stdout
    single = run("classify", image_dir / "a.jpg", "--label", "[bold]dog[/bold]", "-f", "table")
    assert "[bold]dog[/bold]" in single.stdout


def test_file_names_that_are_not_utf8(tiny_checkpoint, image_dir, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    odd = os.path.join(os.fsencode(folder), b"caf\xe9.jpg")  # Latin-1 byte, invalid UTF-8
    shutil.copy(image_dir / "a.jpg", odd)
    env = _env(tiny_checkpoint, tmp_path / "cache")
    classify = subprocess.run([sys.executable, "-m", "siglip_cli", "classify", str(folder), "--labels", "a,b", "--json"],
                              capture_output=True, env=env, timeout=120)
    assert classify.returncode == 0, classify.stderr
    assert "labels" in json.loads(classify.stdout)[0]
    out = tmp_path / "v.npy"
    embed = subprocess.run([sys.executable, "-m", "siglip_cli", "embed", str(folder), "--out", str(out)],
                           capture_output=True, env=env, timeout=120)
    assert embed.returncode == 0, embed.stderr
    assert (tmp_path / "v.npy.paths.txt").read_bytes().strip() == odd  # the exact bytes, usable to reopen the file
    assert np.load(out).shape == (1, 32)


def test_embed_option_conflicts_and_duplicates(run, image_dir, tmp_path):
    both = run("embed", image_dir, "--out", tmp_path / "v.npy", "--format", "jsonl")
    assert both.exit_code == 2 and "not both" in both.stderr
    out = tmp_path / "d.npy"
    twice = run("embed", image_dir / "a.jpg", image_dir / "a.jpg", image_dir / "b.png", "--out", out)
    assert twice.exit_code == 0 and "named more than once" in twice.stderr
    assert np.load(out).shape[0] == 2


def test_unwritable_output_is_one_line(run, image_dir, tmp_path):
    blocker = tmp_path / "v.npy.partial"
    blocker.write_text("a file where the partial folder should go")
    result = run("embed", image_dir / "a.jpg", "--out", tmp_path / "v.npy", "--resume")
    assert result.exit_code != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("siglip: error:") and result.stderr.count("\n") == 1


def test_no_normalize_with_an_ensemble_is_refused(run, image_dir, tmp_path):
    result = run("embed", "--text", "a cat", "-t", "a {}", "-t", "the {}", "--no-normalize", "--out", tmp_path / "t.npy")
    assert result.exit_code == 2 and "single template" in result.stderr


def test_input_spelling_a_shell_user_meets(run, image_dir, tmp_path, monkeypatch):
    import csv
    import io

    # an empty argument (an unset variable) is a usage error, not "the current folder"
    monkeypatch.chdir(image_dir)
    empty = run("classify", "", "--labels", "a")
    assert empty.exit_code == 2 and "empty path" in empty.stderr and empty.stdout == ""
    # stdin: only the line end is removed, so a name that begins with a space is found
    shutil.copy(image_dir / "a.jpg", tmp_path / " lead.jpg")
    listed = CliRunner().invoke(app, ["classify", "-", "--labels", "a", "-f", "jsonl"], input=f"{tmp_path}/ lead.jpg\r\n\n")
    assert listed.exit_code == 0, listed.stderr
    assert json.loads(listed.stdout)["path"] == f"{tmp_path}/ lead.jpg"
    # a quoted ~ is expanded for files as for folders and patterns
    monkeypatch.setenv("HOME", str(image_dir))
    tilde = run("classify", "~/a.jpg", "--labels", "a", "-f", "jsonl")
    assert tilde.exit_code == 0 and json.loads(tilde.stdout)["path"] == str(image_dir / "a.jpg")
    # a missing name with glob characters: both readings are reported
    missing = run("classify", "scan [1].jpg", "--labels", "a", "-f", "jsonl")
    assert missing.exit_code == 1 and "no such file, and no files match it as a pattern" in missing.stderr
    # contradicting template options
    both = run("classify", "a.jpg", "--labels", "a", "--template", "a {} b", "--no-template")
    assert both.exit_code == 2 and "contradict" in both.stderr
    # --threshold that cuts every label still lists the image, in CSV and in the table
    cut = run("classify", "a.jpg", "--labels", "a,b", "--threshold", "1.0", "-f", "csv")
    rows = list(csv.DictReader(io.StringIO(cut.stdout)))
    assert [(r["path"], r["label"], r["error"]) for r in rows] == [("a.jpg", "", "")]
    table = run("classify", "a.jpg", "--labels", "a,b", "--threshold", "1.0", "-f", "table")
    assert "no label reached the --threshold" in table.stdout


def test_scores_in_tables_are_always_percentages():
    from siglip_cli.cli.render import format_score

    assert [format_score(v) for v in (0.188, 7e-5, 0.0005, 1.2e-9, 0.0)] == ["18.8%", "0.007%", "0.05%", "1.2e-07%", "0.0%"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["classify", "x.jpg", "--labels", "a", "--threshold", "1.5"], "Invalid value for '--threshold'"),
        (["classify", "x.jpg", "--bogus"], "No such option: --bogus"),
        (["embed", "x.jpg", "--out-dtype", "float64"], "Invalid value for '--out-dtype'"),
        (["nosuch"], "No such command 'nosuch'"),
    ],
)
def test_option_errors_are_one_line_without_a_box(args, message):
    proc = subprocess.run([sys.executable, "-m", "siglip_cli", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("siglip: error: ") and message in lines[0] and "--help" in lines[0]


def test_error_lines_are_not_glued_to_the_progress_bar(image_dir, bad_files, tiny_checkpoint, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(image_dir, folder)
    shutil.copy(bad_files["not_image"], folder / "b2.jpg")
    proc, screen = _on_a_terminal(["classify", str(folder), "-r", "--labels", "a,b", "-b", "1", "-f", "json"],
                                  _env(tiny_checkpoint, tmp_path / "cache"))
    assert proc.returncode == 1 and len(json.loads(proc.stdout)) == 6
    assert "━" in screen and "/6" in screen  # the bar was drawn
    at = screen.index("siglip: error: ")
    before = screen[:at]
    # the line starts on a fresh or cleared line: after a newline or Rich's erase-line code
    assert before.endswith("\n") or before.endswith("\x1b[2K"), repr(before[-80:])


def test_no_bar_before_the_delay(image_dir, tiny_checkpoint, tmp_path):
    """A run shorter than the delay never flashes a bar (here the delay is longer than any run)."""
    env = {**_env(tiny_checkpoint, tmp_path / "cache"), "SIGLIP_PROGRESS_DELAY": "1000"}
    proc, screen = _on_a_terminal(["classify", str(image_dir), "-r", "--labels", "a,b", "-b", "1", "-f", "json"], env)
    assert proc.returncode == 0 and "━" not in screen


# ---------------------------------------------------------------------------- issue 18: runs that look stuck
def test_a_spinner_says_what_the_run_is_doing_from_the_start(image_dir, tiny_checkpoint, tmp_path):
    """On a terminal, something shows from the first moment (not after 4-6 s of silence), and
    it says what is happening; it is gone when the result comes, and never reaches stdout."""
    env = {**_env(tiny_checkpoint, tmp_path / "cache"), "SIGLIP_PROGRESS_DELAY": "1000"}
    proc, screen = _on_a_terminal(["classify", str(image_dir / "a.jpg"), "--labels", "a,b", "-f", "jsonl"], env)
    assert proc.returncode == 0
    shown = [screen.index(words) for words in ("starting", "listing inputs", "loading the model", "warming up")]
    assert shown == sorted(shown), screen  # in the order they happen
    assert screen.rstrip().endswith("\x1b[2K")  # transient: erased before the exit
    record = json.loads(proc.stdout)
    assert record["path"].endswith("a.jpg") and b"starting" not in proc.stdout
    piped = subprocess.run([sys.executable, "-m", "siglip_cli", "classify", str(image_dir / "a.jpg"), "--labels", "a,b"],
                           capture_output=True, env=env, timeout=120)
    assert piped.returncode == 0 and piped.stderr == b""  # not on a terminal: no spinner at all


def test_the_first_bar_frames_claim_no_absurd_rate(tiny_checkpoint, tmp_path):
    """A rate shows only over a second of work: the first frames used to divide one image by a
    millisecond and claim thousands of images/s."""
    from .conftest import random_image

    folder = tmp_path / "many"
    folder.mkdir()
    count = 40
    for i in range(count):
        random_image(i).save(folder / f"p{i:03d}.png")
    # batches of 8: a batch's images finish together, which made the first frame's rate absurd
    proc, screen = _on_a_terminal(["embed", str(folder), "--format", "jsonl", "-b", "8"], _env(tiny_checkpoint, tmp_path / "cache"))
    assert proc.returncode == 0 and len(proc.stdout.decode().splitlines()) == count
    assert "━" in screen  # the bar was drawn
    rates = [float(rate) for rate in re.findall(r"([\d.]+) images/s", screen)]
    # shown after >= 1 s of work, a rate can never exceed the images there are
    assert all(rate <= count for rate in rates), rates
