"""`siglip embed --engine ray` on a local Ray (all this machine's cores) against the plain local
engine: the same full-size base-224 checkpoint (random weights, built by transformers), the
same JPEGs, whole processes, interleaved rounds. One command:

    python benchmarks/ray_overhead.py                          # 1000 images, 1 round
    python benchmarks/ray_overhead.py --rounds 3 --layouts default,2x1

Needs the ray extra (pip install -e '.[ray]'). Prints, per run, wall time, images/s, the ratio
to the local run, and the run's own time from the summary line (wall minus it is process start,
Ray start and listing); the CPU (model and SIMD flags) and the load (`uptime`) before every run;
and the decode + resize rate of one core, the number that bounds a GPU actor (docs/benchmarks.md
turns it into the estimate for a GPU cluster).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_checkpoint, load_average, machine, make_jpegs, timed_process  # noqa: E402

LAYOUTS = {
    "default": [],  # one actor using every core
    "2x1": ["--workers-per-node", "2", "--cpus-per-worker", "1"],  # two actors of one core each
}


def decode_rate(folder: Path, checkpoint: Path) -> tuple[float, float]:
    """Images/s of one core doing our decode + resize (no model), and the mean file size in KB."""
    from siglip_cli.core.config import config_from_folder
    from siglip_cli.core.images import load_pixels

    preprocess = config_from_folder(checkpoint).preprocess
    files = sorted(folder.glob("*.jpg"))
    start = time.perf_counter()
    for path in files:
        load_pixels(str(path), path.name, preprocess)
    return len(files) / (time.perf_counter() - start), np.mean([p.stat().st_size for p in files]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--layouts", default="default", help=f"comma-separated: {', '.join(LAYOUTS)}")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="google/siglip-base-patch16-224")
    parser.add_argument("--work", type=Path, default=Path("/tmp/siglip-bench"))
    args = parser.parse_args()

    checkpoint = build_checkpoint(args.work / args.model.split("/")[-1], args.model)
    folder = args.work / f"jpegs-{args.count}"
    make_jpegs(folder, args.count)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", SIGLIP_CACHE_DIR=str(args.work / "cache"), RAY_USAGE_STATS_ENABLED="0")
    base = [sys.executable, "-m", "siglip_cli", "embed", str(folder), "--model", str(checkpoint), "--attn", "sdpa",
            "--batch-size", str(args.batch_size)]
    runs = {"local": base + ["--out", str(args.work / "local.npy")]}
    for name in args.layouts.split(","):
        runs[f"ray {name}"] = base + ["--out", str(args.work / f"ray-{name}.npy"), "--engine", "ray", *LAYOUTS[name]]

    from siglip_cli.runtime import resolve_precision

    auto = resolve_precision("auto", torch.device("cpu")).name
    print(f"embed {args.count} JPEGs 640x480, {args.model} (random weights), cpu, default mode (--dtype auto = {auto} "
          f"here, for both runs), batch {args.batch_size}; {machine()}")
    rate, size = decode_rate(folder, checkpoint)
    print(f"decode + resize, one core: {rate:.0f} images/s ({size:.0f} KB per file); {load_average()}")
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for round_ in range(args.rounds):
        for name, argv in runs.items():  # interleaved: every variant once per round
            before = load_average()
            wall, peak, stderr = timed_process(argv, env)
            inner = float(re.search(r" in ([\d.]+) s", stderr).group(1))
            results[name].append((wall, inner))
            print(f"round {round_ + 1} {name:12} wall {wall:7.1f} s  run {inner:7.1f} s  peak {peak:6.0f} MB  {before}")
    reference = np.load(args.work / "local.npy")
    print(f"{'run':12} {'wall s':>8} {'images/s':>9} {'vs local':>9} {'start s':>8} {'max |diff|':>11}")
    local = statistics.median(w for w, _ in results["local"])
    for name, values in results.items():
        wall = statistics.median(w for w, _ in values)
        inner = statistics.median(i for _, i in values)
        out = args.work / ("local.npy" if name == "local" else f"ray-{name.split()[1]}.npy")
        diff = float(np.abs(np.load(out) - reference).max())
        print(f"{name:12} {wall:8.1f} {args.count / wall:9.2f} {wall / local:8.3f}x {wall - inner:8.1f} {diff:11.2e}")
    print(f"load after: {load_average()}")


if __name__ == "__main__":
    main()
