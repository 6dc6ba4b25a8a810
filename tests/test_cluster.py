"""The parts of `--engine ray` that need no Ray: the actor layout, the shard cut, the shard files
and their merge, worker errors, and the option checks (these run in every environment; the
end-to-end runs on a real Ray are in test_ray_embed.py)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import siglip_cli
from siglip_cli.cli.app import app
from siglip_cli.cluster import (
    ClusterOptions,
    ClusterRun,
    Layout,
    ShardEmbedder,
    WorkerSettings,
    cut_shards,
    default_shard_size,
    plan_layout,
    worker_error,
    write_shard,
)
from siglip_cli.core.errors import BackendUnavailable, ModelUnavailable, UsageError
from siglip_cli.embedding import EmbedPlan
from siglip_cli.sources import expand


@pytest.fixture()
def run(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("SIGLIP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SIGLIP_MODEL", str(tiny_checkpoint))
    return lambda *args: CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture()
def mixed(tmp_path, image_dir, bad_files) -> Path:
    """Good images with bad ones between them in sorted order."""
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    for name, source in [("01.jpg", image_dir / "a.jpg"), ("02.jpg", bad_files["truncated"]), ("03.png", image_dir / "b.png"),
                         ("04.jpg", bad_files["not_image"]), ("05.gif", image_dir / "d.gif"), ("sub/06.webp", image_dir / "c.webp"),
                         ("sub/07.jpg", image_dir / "sub" / "e.jpg")]:
        shutil.copy(source, folder / name)
    return folder


def settings_for(engine, out: Path, **changes) -> WorkerSettings:
    described = engine.describe()
    base = WorkerSettings(model=str(engine.resolved.folder), revision=described["revision"], device="cpu", dtype="fp32",
                          attn="auto", offline=True, max_pixels=100_000_000, batch_size=None, decode_threads=None,
                          torch_threads=1, normalized=True, templates=(), out=str(out), out_dtype="float32")
    return replace(base, **changes)


# ------------------------------------------------------------------------- the layout
def test_layout_defaults_one_actor_per_gpu_or_one_per_cpu_node():
    gpu_nodes = [{"CPU": 96.0, "GPU": 8.0}] * 4
    assert plan_layout(gpu_nodes, ClusterOptions()) == Layout(workers=32, cpus=12.0, gpus=1.0)
    assert plan_layout(gpu_nodes, ClusterOptions(gpus_per_worker=0.5)) == Layout(64, 6.0, 0.5)
    assert plan_layout(gpu_nodes, ClusterOptions(cpus_per_worker=4)) == Layout(32, 4.0, 1.0)
    assert plan_layout(gpu_nodes, ClusterOptions(), device="cpu") == Layout(4, 96.0, 0.0)  # GPUs left alone
    assert plan_layout(gpu_nodes, ClusterOptions(gpus_per_worker=0)).device == "cpu"
    # CPU-only: one actor per node using every core, or several sharing them
    assert plan_layout([{"CPU": 2.0}], ClusterOptions()) == Layout(1, 2.0, 0.0)
    assert plan_layout([{"CPU": 2.0}], ClusterOptions(workers_per_node=2)) == Layout(2, 1.0, 0.0)
    assert plan_layout([{"CPU": 16.0}, {"CPU": 8.0}], ClusterOptions(workers_per_node=2)) == Layout(4, 4.0, 0.0)
    # a mixed cluster: GPU actors on the GPU nodes only
    assert plan_layout([{"CPU": 32.0, "GPU": 2.0}, {"CPU": 64.0}], ClusterOptions()) == Layout(2, 16.0, 1.0)


def test_layout_refuses_what_cannot_run():
    with pytest.raises(BackendUnavailable, match="no GPUs"):
        plan_layout([{"CPU": 4.0}], ClusterOptions(), device="cuda")
    with pytest.raises(UsageError, match="auto, cpu or cuda"):
        plan_layout([{"CPU": 4.0}], ClusterOptions(), device="cuda:1")
    with pytest.raises(UsageError, match="more than a node"):
        plan_layout([{"CPU": 4.0, "GPU": 1.0}], ClusterOptions(gpus_per_worker=2))


# ------------------------------------------------------------------------- shards
def test_shards_depend_on_the_plan_alone(mixed, tmp_path, monkeypatch):
    monkeypatch.chdir(mixed)
    listing = expand(["."], recursive=True)
    plan = EmbedPlan(listing.sources, ["b", "a", "b"])
    shards = cut_shards(plan, 3, tmp_path / "shards")
    assert [(s.kind, len(s)) for s in shards] == [("image", 3), ("image", 3), ("image", 1), ("text", 2)]
    assert [n for s in shards for n in s.names] == [s.name for s in listing.sources] + ["b", "a"]  # texts once, in order
    assert shards[0].names[0] == "./01.jpg" and shards[0].values[0] == str(mixed / "01.jpg")  # workers get absolute paths
    assert shards[0].stamps[0][:2] == listing.sources[0].stamp
    assert [s.file for s in cut_shards(plan, 3, tmp_path / "shards")] == [s.file for s in shards]  # deterministic
    renamed = EmbedPlan([replace(listing.sources[0], name="other.jpg"), *listing.sources[1:]], ["b", "a"])
    assert cut_shards(renamed, 3, tmp_path / "shards")[0].file != shards[0].file  # names carry a digest
    assert cut_shards(renamed, 3, tmp_path / "shards")[1].file == shards[1].file
    assert [default_shard_size(n) for n in (10, 1000, 100_000, 100_000_000)] == [16, 16, 391, 4096]


@pytest.mark.parametrize("suffix", [".npy", ".jsonl"])
def test_shards_merged_equal_a_local_run(suffix, run, mixed, tmp_path, tiny_checkpoint):
    """What the Ray actors do, done here shard by shard, then merged by the driver's code: the
    same files as the local engine's, bad files and a missing one in the same place."""
    inputs = [str(mixed), str(tmp_path / "missing.jpg")]
    local = tmp_path / f"local{suffix}"
    assert run("embed", *inputs, "--text", "a cat", "--out", local).exit_code == 1

    engine = siglip_cli.load(tiny_checkpoint)
    listing = expand(inputs, recursive=True)
    out = tmp_path / f"ray{suffix}"
    settings = settings_for(engine, out)
    cluster_run = ClusterRun(engine, EmbedPlan(listing.sources, ["a cat"], listing.failures), out, "float32", True, None,
                             settings=settings, layout=Layout(1, 1.0, 0.0), shard_size=2)
    assert len(cluster_run.shards) == 5 and cluster_run.done_rows() == 0
    for shard in reversed(cluster_run.shards):  # actors finish in any order
        write_shard(engine, shard, settings)
    assert cluster_run.done_rows() == 8 and cluster_run.todo() == ([], [], [])
    cluster_run.record_listing_failures(None)
    summary = cluster_run.finish()
    assert summary.computed == 0 and summary.reused == 5  # rows from shards made before this call

    assert Path(f"{out}.meta.json").exists() and not Path(f"{out}.partial").exists()
    ours, theirs = siglip_cli.store.open_store(out), siglip_cli.store.open_store(local)
    assert ours.names == theirs.names and (ours.stamps == theirs.stamps).all() and (ours.kinds == theirs.kinds).all()
    np.testing.assert_allclose(ours.rows, theirs.rows, atol=1e-6, rtol=0)
    ours.meta.pop("created"), theirs.meta.pop("created")
    assert ours.meta == theirs.meta
    assert [s["path"] for s in ours.meta["skipped"]] == [str(tmp_path / "missing.jpg"), f"{mixed}/02.jpg", f"{mixed}/04.jpg"]


def test_a_retried_shard_is_not_written_again(tiny_checkpoint, mixed, tmp_path):
    """A task retried after its actor died between the rename and the reply finds its file."""
    engine = siglip_cli.load(tiny_checkpoint)
    listing = expand([str(mixed)], recursive=True)
    shard = cut_shards(EmbedPlan(listing.sources), 4, tmp_path)[0]
    first = write_shard(engine, shard, settings_for(engine, tmp_path / "v.npy"))
    stat = os.stat(shard.file)
    again = write_shard(engine, shard, settings_for(engine, tmp_path / "v.npy"))
    assert again == first and os.stat(shard.file).st_ino == stat.st_ino and os.stat(shard.file).st_mtime_ns == stat.st_mtime_ns
    assert first["image_rows"] == 2 and [s["path"] for s in first["skipped"]] == [f"{mixed}/02.jpg", f"{mixed}/04.jpg"]


def test_a_ray_partial_is_not_resumed_by_the_local_engine(run, tiny_checkpoint, image_dir, tmp_path):
    engine = siglip_cli.load(tiny_checkpoint)
    listing = expand([str(image_dir)], recursive=True)
    out = tmp_path / "v.npy"
    ClusterRun(engine, EmbedPlan(listing.sources), out, "float32", True, None, settings=settings_for(engine, out),
               layout=Layout(1, 1.0, 0.0)).close()
    result = run("embed", image_dir, "--out", out, "--resume")
    assert result.exit_code == 2 and "different settings (engine, shard_size)" in result.stderr


# ------------------------------------------------------------------------- worker errors
def test_worker_errors_come_back_as_one_line_of_their_kind(tiny_checkpoint, image_dir, tmp_path):
    engine = siglip_cli.load(tiny_checkpoint)
    shard = cut_shards(EmbedPlan(expand([str(image_dir)]).sources), 8, tmp_path)[0]
    batch = {"shard": np.array([__import__("pickle").dumps(shard)], dtype=object)}
    for changes, kind, words in [
        ({"model": str(tmp_path / "gone")}, ModelUnavailable, "no such folder"),
        ({"revision": "local-0000"}, ModelUnavailable, "every node must read the same checkpoint"),
    ]:
        reply = ShardEmbedder(settings_for(engine, tmp_path / "v.npy", **changes))(batch)
        error = worker_error(str(reply["error"][0]))
        assert type(error) is kind and words in str(error) and "\n" not in str(error)
        assert not os.path.exists(shard.file)
    good = ShardEmbedder(settings_for(engine, tmp_path / "v.npy"))(batch)
    assert list(good["error"]) == [""] and list(good["images"]) == [4] and os.path.exists(shard.file)


# ------------------------------------------------------------------------- the command line
def test_without_ray_the_engine_names_the_extra(run, image_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_BACKEND_LOG_LEVEL", "fatal")  # (set before importing Ray; restored after)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: importing it fails
    result = run("embed", image_dir, "--out", tmp_path / "v.npy", "--engine", "ray")
    assert result.exit_code == 4
    assert result.stderr == "siglip: error: --engine ray: Ray is not installed; pip install 'siglip-cli[ray]'\n"
    assert not list(tmp_path.glob("v.npy*"))


@pytest.mark.parametrize("args, words", [
    (["--shard-size", "8"], "--shard-size is an option of --engine ray"),
    (["--workers-per-node", "2"], "--workers-per-node is an option of --engine ray"),
    (["--engine", "ray", "--update=mtime"], "--update does not run with --engine ray"),
    (["--engine", "ray", "--strict"], "--strict does not run with --engine ray"),
])
def test_engine_options_are_checked_before_anything_loads(args, words, run, image_dir, tmp_path):
    result = run("embed", image_dir, "--out", tmp_path / "v.npy", *args)
    assert result.exit_code == 2 and words in result.stderr
    streamed = run("embed", image_dir, "--format", "jsonl", "--engine", "ray")
    assert streamed.exit_code == 2 and "does not stream to stdout" in streamed.stderr
