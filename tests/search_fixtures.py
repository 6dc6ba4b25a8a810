"""Helpers for the search, update and store tests: photo folders, CLI runs with separate stdout
and stderr, and brute-force rankings from transformers' own embeddings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from siglip_cli.cli.app import app, normalize_argv

from .conftest import random_image

ROOT = Path(__file__).resolve().parent.parent


def make_photos(folder: Path, count: int, start: int = 0, size=(48, 40)) -> list[Path]:
    """`count` different pictures, named so that sorted order is creation order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        path = folder / f"p{i:03d}.png"
        random_image(100 + i, size).save(path)
        paths.append(path)
    return paths


def cli(*args, env: dict | None = None):
    """Run `siglip ARGS` in this process, as the console script would (bare --update included)."""
    return CliRunner().invoke(app, normalize_argv([str(a) for a in args]), env=env)


def process(*args, env: dict | None = None, python_options: list[str] = ()) -> subprocess.CompletedProcess:
    """Run `python -m siglip_cli ARGS` as its own process (imports, exit status, stderr)."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *python_options, "-m", "siglip_cli", *map(str, args)], capture_output=True,
                          text=True, env=environment, timeout=300)


def one_error_line(stderr: str, *fragments: str) -> str:
    """The only error line in `stderr` (no traceback), holding every fragment."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("siglip: error:")]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def reference_image_embeddings(reference, paths) -> np.ndarray:
    from PIL import Image

    pictures = []
    for path in paths:
        with Image.open(path) as image:
            pictures.append(image.convert("RGB"))
    return reference.image_embeds(pictures)


def brute_force(rows: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row order best first, cosines) by sorting every cosine: the obvious numpy answer."""
    cosines = rows.astype(np.float64) @ query.astype(np.float64)
    return np.argsort(-cosines, kind="stable"), cosines


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def records(stdout: str) -> list[dict]:
    """JSON lines, or one JSON document holding a list."""
    text = stdout.strip()
    if text.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines()]


def store_files(out: Path) -> dict[str, bytes]:
    """Every file of a store, by name: to compare two stores byte for byte."""
    return {p.name: p.read_bytes() for p in out.parent.iterdir() if p.name.startswith(out.name) and p.is_file()}
