"""`siglip bench`: rows, JSON shape, unavailable backends, and the correctness column."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from siglip_cli.cli.bench import make_inputs, text_flops, time_runs, vision_flops, warmup_runs
from siglip_cli.cli.app import app
from siglip_cli.core.config import architecture, config_from_folder
from siglip_cli.core.weights import checkpoint_keys

FIELDS = {"model", "weights", "device", "dtype", "attn", "tower", "batch_size", "status", "reason", "items_per_s",
          "ms_per_batch", "ms_min", "ms_max", "runs", "speedup_vs_eager", "max_abs_diff_vs_eager", "peak_mem_mb",
          "peak_mem_kind", "tflops", "pct_of_peak"}


def bench(*args):
    return CliRunner().invoke(app, ["bench", *[str(a) for a in args]])


def test_json_rows_on_a_checkpoint(tiny_checkpoint):
    result = bench("--model", tiny_checkpoint, "--format", "json", "--seconds", "0.05", "--batch-sizes", "1,3",
                   "--device", "cpu", "--peak-tflops", "1.5", "--dtype", "fp32")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {(r["tower"], r["batch_size"], r["attn"]) for r in rows} == {
        (t, b, a) for t in ("vision", "text", "classify") for b in (1, 3) for a in ("eager", "sdpa", "flash")
    }
    for row in rows:
        assert FIELDS <= set(row) and row["weights"] == "checkpoint" and row["dtype"] == "fp32"
        if row["attn"] == "flash":
            assert row["status"] == "unavailable" and "CUDA" in row["reason"] and row["items_per_s"] is None
            continue
        assert row["status"] == "ok" and row["runs"] >= 1
        assert row["ms_min"] <= row["ms_per_batch"] <= row["ms_max"]
        assert row["items_per_s"] == pytest.approx(row["batch_size"] / row["ms_per_batch"] * 1e3, rel=1e-3)
        assert row["tflops"] > 0 and row["pct_of_peak"] == pytest.approx(100 * row["tflops"] / 1.5, rel=1e-3)
        assert row["peak_mem_mb"] > 0 and row["peak_mem_kind"] == "process peak RSS during the row"
        if row["attn"] == "eager":
            assert row["max_abs_diff_vs_eager"] == 0 and row["speedup_vs_eager"] == 1
        else:
            assert 0 <= row["max_abs_diff_vs_eager"] < 1e-4


def test_difference_column_comes_from_real_outputs(tiny_checkpoint):
    """Recompute eager vs sdpa on the bench's own inputs and find the number it printed."""
    import siglip_cli
    from siglip_cli.core.attention import eager_attention, sdpa_attention

    result = bench("--model", tiny_checkpoint, "--format", "json", "--seconds", "0.05", "--batch-sizes", "2",
                   "--towers", "text", "--attn", "sdpa", "--device", "cpu", "--dtype", "fp32")
    rows = json.loads(result.stdout)
    assert [r["attn"] for r in rows] == ["sdpa"]  # eager ran as the reference but was not asked for
    model = siglip_cli.load(tiny_checkpoint, device="cpu", dtype="fp32", attn="eager")
    ids = make_inputs(model.config, 2)["ids"]
    with torch.inference_mode():
        eager = model.text_model(ids)
        model._network.set_attention(sdpa_attention)
        sdpa = model.text_model(ids)
        model._network.set_attention(eager_attention)
    assert rows[0]["max_abs_diff_vs_eager"] == pytest.approx(float((sdpa - eager).abs().max()), rel=1e-5)


def test_named_architecture_offline_with_random_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = bench("--model", "google/siglip-base-patch16-224", "--format", "json", "--towers", "text",
                   "--batch-sizes", "1", "--seconds", "0.05", "--repeats", "2", "--attn", "sdpa", "--device", "cpu", "--dtype", "fp32")
    assert result.exit_code == 0, result.stderr
    assert "random weights" in result.stderr
    (row,) = json.loads(result.stdout)
    assert row["weights"] == "random" and row["status"] == "ok" and row["runs"] <= 2


def test_half_precision_on_cpu_runs_with_a_note(tiny_checkpoint):
    result = bench("--model", tiny_checkpoint, "--dtype", "fp16,bf16", "--format", "json", "--seconds", "0.05",
                   "--batch-sizes", "1", "--towers", "vision", "--attn", "sdpa", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert "slower than fp32" in result.stderr
    assert [(r["dtype"], r["status"]) for r in json.loads(result.stdout)] == [("fp16", "ok"), ("bf16", "ok")]


def test_table_output_and_bad_options(tiny_checkpoint):
    table = bench("--model", tiny_checkpoint, "--seconds", "0.05", "--batch-sizes", "1", "--towers", "vision", "--device", "cpu")
    assert table.exit_code == 0 and "vision tower, fp32" in table.stdout and "unavailable [1]" in table.stdout
    assert bench("--model", tiny_checkpoint, "--attn", "turbo").exit_code == 2
    assert bench("--model", tiny_checkpoint, "--batch-sizes", "a,b").exit_code == 2
    unknown = bench("--model", "google/siglip-huge")
    assert unknown.exit_code == 3 and "built-in table" in unknown.stderr


def test_compare_transformers_times_the_reference(tiny_checkpoint):
    result = bench("--model", tiny_checkpoint, "--compare", "transformers", "--format", "json", "--seconds", "0.05",
                   "--batch-sizes", "2", "--towers", "vision", "--attn", "sdpa", "--device", "cpu", "--dtype", "fp32")
    assert result.exit_code == 0, result.stderr
    rows = {r["attn"]: r for r in json.loads(result.stdout)}
    assert rows["transformers"]["status"] == "ok" and rows["transformers"]["max_abs_diff_vs_eager"] < 1e-5
    assert rows["transformers"]["ours_sdpa_speedup"] > 0


def test_flop_counts_grow_with_the_architecture(tiny_checkpoint):
    base, large = architecture("siglip-base-patch16-224"), architecture("siglip-so400m-patch14-384")
    assert vision_flops(large) > 10 * vision_flops(base) > 0
    assert text_flops(base) > 0
    # ~2 FLOPs per parameter per token for the matrix multiplies of the vision tower
    params = sum(__import__("math").prod(s) for k, s in checkpoint_keys(base).items() if k.startswith("vision_model.encoder"))
    assert vision_flops(base) == pytest.approx(2 * params * 196, rel=0.1)
    assert config_from_folder(tiny_checkpoint).vision.num_patches == 16


def test_slow_rows_get_fewer_warm_up_runs():
    # The first (correctness) call is the first warm-up; a row whose single run eats half the
    # budget gets no more (fp16 on a CPU would otherwise take minutes), fast rows get two more.
    assert warmup_runs(0.01, seconds=2.0) == 2
    assert warmup_runs(0.5, seconds=2.0) == 1
    assert warmup_runs(1.0, seconds=2.0) == 0
    calls = []
    times = time_runs(lambda: calls.append(1), torch.device("cpu"), seconds=0.0, repeats=10, warmup=0)
    assert len(times) == 1 and len(calls) == 1  # at least one timed run even past the budget
    calls.clear()
    times = time_runs(lambda: calls.append(1), torch.device("cpu"), seconds=60.0, repeats=3, warmup=2)
    assert len(times) == 3 and len(calls) == 5


def test_a_failed_eager_row_does_not_take_the_others_down(tiny_checkpoint, monkeypatch):
    """eager materialises the attention matrix, so it is the first to run out of memory at a
    large batch; sdpa must still be timed (without a difference or speed-up to show)."""
    from siglip_cli.core import attention

    def out_of_memory(*args, **kwargs):
        raise MemoryError("eager attention matrix does not fit")

    monkeypatch.setitem(attention._REGISTRY, "eager", out_of_memory)
    result = CliRunner().invoke(app, ["bench", "--model", str(tiny_checkpoint), "--attn", "sdpa", "--towers", "vision",
                                      "--batch-sizes", "2", "--seconds", "0.1", "--format", "json"])
    assert result.exit_code == 0, result.stderr
    rows = {r["attn"]: r for r in json.loads(result.stdout)}
    assert rows["eager"]["status"] == "failed" and "MemoryError" in rows["eager"]["reason"]
    assert rows["sdpa"]["status"] == "ok" and rows["sdpa"]["items_per_s"] > 0
    assert rows["sdpa"]["max_abs_diff_vs_eager"] is None and rows["sdpa"]["speedup_vs_eager"] is None


def test_batch_sizes_are_checked_and_unrunnable_backends_time_nothing(tiny_checkpoint):
    def bench(*args):
        return CliRunner().invoke(app, ["bench", "--model", str(tiny_checkpoint), "--towers", "vision", "--seconds", "0.05", "--dtype", "fp32", *args])

    assert bench("--batch-sizes", "").exit_code == 2
    rows = json.loads(bench("--attn", "sdpa", "--batch-sizes", "1,1", "--format", "json").stdout)
    assert [(r["attn"], r["batch_size"]) for r in rows] == [("sdpa", 1)]
    if not torch.cuda.is_available():
        rows = json.loads(bench("--attn", "flash", "--batch-sizes", "1", "--format", "json").stdout)
        assert [(r["attn"], r["status"]) for r in rows] == [("flash", "unavailable")]  # no hidden eager timing


def test_compare_keeps_transformers_quiet(tiny_checkpoint, tmp_path):
    """transformers' warnings and loading bars must not reach our stderr (a real process, with
    none of the test suite's quieting variables)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_", "HF_HUB_DISABLE"))}
    proc = subprocess.run([sys.executable, "-m", "siglip_cli", "bench", "--model", str(tiny_checkpoint), "--compare", "transformers",
                           "--format", "json", "--seconds", "0.05", "--batch-sizes", "2", "--towers", "vision,text", "--attn", "sdpa"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert all(line.startswith("siglip:") for line in proc.stderr.splitlines()), proc.stderr
    assert {r["attn"] for r in json.loads(proc.stdout)} == {"sdpa", "transformers"}


def test_bench_alone_runs_the_default_benchmark_and_says_first_how_long(tiny_checkpoint, tmp_path):
    """Issue 18: `siglip bench` with no options used to print help. It runs the default now, and
    its first line says roughly how long that takes; Ctrl-C stops a run with one line."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "SIGLIP_MODEL": str(tiny_checkpoint), "SIGLIP_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "siglip_cli", "bench"], capture_output=True, text=True, env=env, timeout=600)
    first = done.stderr.splitlines()[0]
    assert first.startswith("siglip: timing ") and " rows of " in first and "about " in first, first
    assert done.returncode == 0, done.stderr
    assert "Usage" not in done.stdout and "images/s" in done.stdout  # the table of the default run
    # Ctrl-C: a run long enough to be interrupted whatever the machine's speed
    proc = subprocess.Popen([sys.executable, "-m", "siglip_cli", "bench", "--seconds", "30", "--repeats", "100000", "--batch-sizes", "64"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        proc.stderr.readline()
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and rest.strip().splitlines()[-1] == "siglip: error: interrupted", rest


def test_the_announced_time_is_the_right_size(tiny_checkpoint):
    """The estimate counts the rows that really run (flash cannot on a CPU) and their budget."""
    from siglip_cli.cli.bench import make_options, plan_line, timed_rows

    options = make_options(str(tiny_checkpoint), "all", "fp32", "1,4", "vision,text,classify", 2.0, 10, "cpu", None, None)
    assert timed_rows(options) == 1 * 3 * 2 * 2  # eager and sdpa
    assert "timing 12 rows" in plan_line(options) and "about 35 s" in plan_line(options)
    result = bench("--model", tiny_checkpoint, "--format", "json", "--seconds", "0.05", "--batch-sizes", "1",
                   "--towers", "text", "--device", "cpu", "--dtype", "fp32")
    rows = [r for r in json.loads(result.stdout) if r["status"] == "ok"]
    assert len(rows) == 2 and "timing 2 rows" in result.stderr  # said = done (eager shows when asked for all)
