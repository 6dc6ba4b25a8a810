"""`siglip embed --engine ray` on a real local Ray (2 CPUs): the output equals a local run's,
also when a worker actor is killed mid-run, and when the driver is interrupted and resumed.

Skipped without Ray (`pip install 'siglip-cli[ray]'`); CI installs it, so they run there."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from siglip_cli.cli.app import app
from siglip_cli.store import open_store

from .ray_fixtures import RayHead, make_mixed_images, run_on_a_terminal, worker_actors

pytest.importorskip("ray")
pytestmark = pytest.mark.ray

TEXTS = ["--text", "a cat", "--text", "a dog", "--text", "a cat"]
RAY_ARGS = ["--engine", "ray", "--shard-size", "4", "--workers-per-node", "2", "--cpus-per-worker", "1"]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    return make_mixed_images(tmp_path_factory.mktemp("ray-images") / "photos")


@pytest.fixture(scope="module")
def inputs(mixed) -> list[str]:
    """The photos and, after them, a path that does not exist (a failure while listing)."""
    return [str(mixed), str(mixed.parent / "missing.jpg")]


@pytest.fixture(scope="module")
def env(tiny_checkpoint, tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("ray-cache")
    clean = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**clean, "SIGLIP_MODEL": str(tiny_checkpoint), "SIGLIP_CACHE_DIR": str(cache), "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "120"}


def local_embed(inputs, out: Path, env: dict):
    """The same inputs through the plain local engine, in this process."""
    result = CliRunner().invoke(app, ["embed", *inputs, *TEXTS, "--out", str(out)],
                                env={k: env[k] for k in ("SIGLIP_MODEL", "SIGLIP_CACHE_DIR")})
    assert result.exit_code == 1, result.stderr  # 1: some inputs were skipped
    return result


@pytest.fixture(scope="module")
def local_run(inputs, env, tmp_path_factory) -> tuple[Path, str]:
    """The output every Ray run must equal."""
    out = tmp_path_factory.mktemp("local") / "vecs.npy"
    return out, local_embed(inputs, out, env).stderr


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    cluster = RayHead(tmp_path_factory.mktemp("ray-head"))
    yield cluster
    cluster.stop()


def driver(inputs, out: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "siglip_cli", "embed", *inputs, *TEXTS, "--out", str(out), *RAY_ARGS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def assert_same_store(out: Path, reference: Path) -> None:
    """Rows (fp32, batch composition may move the last bit), names, stamps and meta equal."""
    np.testing.assert_allclose(np.load(out), np.load(reference), atol=1e-6, rtol=0)
    for suffix in (".paths.txt", ".stamps.npy"):
        assert Path(f"{out}{suffix}").read_bytes() == Path(f"{reference}{suffix}").read_bytes(), suffix
    meta, expected = (json.loads(Path(f"{p}.meta.json").read_text()) for p in (out, reference))
    meta.pop("created"), expected.pop("created")
    assert meta == expected
    assert not [p.name for p in out.parent.iterdir() if p.name.endswith((".partial", ".tmp", ".lock"))]


def skip_lines(stderr: str) -> set[str]:
    return {line for line in stderr.splitlines() if line.startswith("siglip: skipped ")}


def finished_shards(out: Path) -> list[Path]:
    return sorted((out.parent / f"{out.name}.partial" / "shards").glob("*.npz"))


def test_a_ray_run_equals_a_local_run(inputs, env, local_run, tmp_path):
    """A local Ray started by the driver (no RAY_ADDRESS): same rows, order, sidecars and skipped
    inputs as the local engine; the four bad files and the missing one are reported the same."""
    reference, local_stderr = local_run
    out = tmp_path / "vecs.npy"
    proc = driver(inputs, out, env)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    assert_same_store(out, reference)
    # issue 18: no line of Ray's own (its C++ core's `logging.cc:303: Set ray log level ...`), and
    # the time said is the whole run's, Ray's start included
    assert stdout == "" and "logging.cc" not in stderr and not [l for l in stderr.splitlines() if not l.startswith("siglip: ")]
    started = float(re.search(r"started in ([\d.]+) s", stderr).group(1))
    took = float(re.search(r"wrote .* in ([\d.]+) s", stderr).group(1))
    assert took > started > 0
    meta = json.loads(Path(f"{out}.meta.json").read_text())
    assert meta["image_rows"] == 96 and meta["text_rows"] == 2 and meta["skipped_count"] == 5
    assert meta["skipped"][0]["path"].endswith("missing.jpg")  # listing failures first, as locally
    assert skip_lines(stderr) == skip_lines(local_stderr) and len(skip_lines(stderr)) == 5
    assert "Traceback" not in stderr and "Ray: 1 node(s), 2 worker(s) with 1 CPU each" in stderr
    assert "\r" not in stderr and "━" not in stderr  # no progress bar when stderr is not a terminal


def test_killing_a_worker_mid_run_loses_nothing(inputs, env, local_run, head, tmp_path):
    """SIGKILL one actor while shards are still missing: Ray starts it again and retries its
    shard, and the output is the same as a clean run's."""
    out = tmp_path / "vecs.npy"
    proc = driver(inputs, out, {**env, "RAY_ADDRESS": head.address})
    deadline, killed, at_kill = time.time() + 120, None, 0
    while time.time() < deadline and killed is None and proc.poll() is None:
        actors = worker_actors(head.process.pid)
        at_kill = len(finished_shards(out))
        if actors and at_kill >= 1:
            os.kill(actors[0], signal.SIGKILL)
            killed = actors[0]
        time.sleep(0.01)
    assert killed is not None, "the run ended before a worker could be killed"
    assert at_kill < 25, "every shard was already done: the kill proved nothing"
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    assert_same_store(out, local_run[0])
    assert "Traceback" not in stderr


def test_an_interrupted_driver_resumes_only_the_missing_shards(inputs, env, local_run, head, tmp_path):
    out = tmp_path / "vecs.parquet"
    reference = tmp_path / "reference.parquet"
    ray_env = {**env, "RAY_ADDRESS": head.address}
    first = driver(inputs, out, ray_env)
    deadline = time.time() + 120
    while time.time() < deadline and len(finished_shards(out)) < 3 and first.poll() is None:
        time.sleep(0.01)
    first.send_signal(signal.SIGINT)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr and not out.exists()
    # one line for Ctrl-C (it used to be followed by "error: interrupted"), nothing of Ray's
    assert [l for l in stderr.splitlines() if "interrupted" in l] == [l for l in stderr.splitlines() if "--resume" in l]
    assert stdout == "" and "(raylet)" not in stderr and "logging.cc" not in stderr
    deadline = time.time() + 60
    while worker_actors(head.process.pid) and time.time() < deadline:  # the job's actors go with their driver
        time.sleep(0.1)
    assert not worker_actors(head.process.pid), "the interrupted run's actors outlived their driver"
    done = finished_shards(out)
    kept = sum(json.loads(Path(f"{p}.meta.json").read_text())["image_rows"] for p in done)
    left = 100 - sum(1 for p in done if p.name.startswith("image")) * 4
    assert 3 <= len(done) < 26, "the interrupt came after every shard was done"
    rows_done = sum(4 if p.name.startswith("image") else 2 for p in done)  # 25 image shards of 4, 1 of 2 texts

    # the resumed run draws its bar on a terminal
    argv = [sys.executable, "-m", "siglip_cli", "embed", *inputs, *TEXTS, "--out", str(out), *RAY_ARGS, "--resume"]
    code, terminal = run_on_a_terminal(argv, ray_env)
    assert code == 1, terminal
    assert f"resuming: {rows_done} rows already done" in terminal, terminal
    assert f"; {kept} kept from before)" in terminal, terminal  # only the missing shards ran again
    assert re.search(rf"\b\d+/{left}\b", terminal), terminal  # the bar counts the rows left

    local_embed(inputs, reference, env)  # the same format, local engine

    ours, theirs = open_store(out), open_store(reference)
    assert ours.names == theirs.names and (ours.kinds == theirs.kinds).all() and (ours.stamps == theirs.stamps).all()
    np.testing.assert_allclose(ours.rows, theirs.rows, atol=1e-6, rtol=0)
    ours.meta.pop("created"), theirs.meta.pop("created")
    assert ours.meta == theirs.meta

