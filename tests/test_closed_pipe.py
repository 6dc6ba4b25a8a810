"""`siglip classify DIR ... | head -1`: the reader leaves after one line, and siglip must end
with exit 0 and nothing on stderr, every time (issue 17, item 16). Once under load it ended
with "terminate called without an active exception" and exit 134: a decode thread still inside
Pillow or numpy when the interpreter shut down was ended with pthread_exit, whose unwinding
through C++ frames aborts. Run 30 times, three at a time, on a folder big enough that decoders
are busy when the pipe closes."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import random_image

ROOT = Path(__file__).resolve().parent.parent
RUNS = 30


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("many")
    for i in range(48):
        random_image(i, (1200, 900) if i % 3 else (2400, 1800)).save(folder / f"{i:03d}.jpg", quality=92)
    return folder


def _head_one(argv: list[str], env: dict) -> tuple[int, str, bytes]:
    """Start siglip, read one line of its stdout and close the pipe, as `head -1` does."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read().decode(errors="replace")
    return process.wait(timeout=300), stderr, first


def test_a_closed_pipe_always_ends_with_exit_0_and_no_abort(many_images, tiny_checkpoint, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SIGLIP_MODEL": str(tiny_checkpoint),
           "SIGLIP_CACHE_DIR": str(tmp_path / "cache"), "PYTHONFAULTHANDLER": "1"}
    argv = [sys.executable, "-m", "siglip_cli", "classify", str(many_images), "--labels", "cat,dog", "--workers", "2",
            "--batch-size", "4"]
    with ThreadPoolExecutor(3) as pool:
        outcomes = list(pool.map(lambda _: _head_one(argv, env), range(RUNS)))
    for code, stderr, first in outcomes:
        assert first.startswith(b"{") and b'"path"' in first
        assert "terminate called" not in stderr and "Fatal Python error" not in stderr and "Traceback" not in stderr, stderr
        assert code == 0, (code, stderr)
        assert stderr == "", stderr


# A thread of the process that is inside torch (C++, the GIL released) when siglip ends: the
# interpreter's shutdown would end it with pthread_exit and abort (exit 134). siglip leaves a
# closed pipe without that shutdown, so whichever thread is still busy cannot turn a success
# into an abort. (Without the fix this fails every time, not once under load.)
BUSY_THREAD = """
import sys, threading, torch
matrix = torch.randn(400, 400)
def busy():
    while True:
        matrix @ matrix
threading.Thread(target=busy, daemon=True).start()
sys.argv = ["siglip", *sys.argv[1:]]
from siglip_cli.cli import main
main()
"""


def test_a_thread_busy_in_torch_cannot_turn_a_closed_pipe_into_an_abort(many_images, tiny_checkpoint, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SIGLIP_MODEL": str(tiny_checkpoint), "SIGLIP_CACHE_DIR": str(tmp_path / "cache")}
    argv = [sys.executable, "-c", BUSY_THREAD, "classify", str(many_images), "--labels", "cat,dog", "--batch-size", "2"]
    for _ in range(3):
        code, stderr, first = _head_one(argv, env)
        assert first.startswith(b"{")
        assert "terminate called" not in stderr and code == 0, (code, stderr)
