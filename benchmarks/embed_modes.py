"""Whole-process `siglip embed` in each mode (`--exact`, the default, bf16, int8, fast decoding)
against transformers' docs loop in fp32 and bf16, interleaved round by round, on the same
full-size checkpoint (random weights, built locally) and the same generated JPEGs. Prints the CPU
model, its speed-relevant flags and the machine's load before and after, then per run the median
wall time, images/s, CPU seconds, peak RSS, speed against transformers fp32 and against
`--exact`, and the min cosine of its rows with `--exact`'s. Then how long decoding takes (one
thread, exact and fast) and its share of each run's CPU time.

    python benchmarks/embed_modes.py                                  # 200 COCO-size JPEGs
    python benchmarks/embed_modes.py --size 4000x3000 --count 60 \\
        --runs exact,default,bf16-exact-decode,fp32-fast-decode,int8  # 12 MP phone photos
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_checkpoint, load_average, machine, make_jpegs, run_process  # noqa: E402
from embed_throughput import REFERENCE  # noqa: E402

# name -> (kind, dtype for the reference or flags for siglip, how it decodes: exact, fast or auto)
RUNS = {
    "ref-fp32": ("reference", "fp32", "exact"),
    "ref-bf16": ("reference", "bf16", "exact"),
    "exact": ("siglip", ["--exact"], "exact"),
    "default": ("siglip", [], "auto"),
    "bf16-exact-decode": ("siglip", ["--dtype", "bf16", "--decode", "exact"], "exact"),
    "fp32-fast-decode": ("siglip", ["--dtype", "fp32", "--decode", "fast"], "fast"),
    "int8": ("siglip", ["--dtype", "int8"], "fast"),
    "int8-exact-decode": ("siglip", ["--dtype", "int8", "--decode", "exact"], "exact"),
}


def command(name: str, folder: Path, checkpoint: Path, out: Path, batch: int) -> list[str]:
    kind, detail, _ = RUNS[name]
    if kind == "reference":
        return [sys.executable, "-c", REFERENCE, str(folder), str(checkpoint), str(out), str(batch), "cpu", detail]
    return [sys.executable, "-m", "siglip_cli", "embed", str(folder), "--out", str(out), "--model", str(checkpoint),
            "--device", "cpu", "--attn", "sdpa", "--batch-size", str(batch), *detail]


def decode_seconds(paths: list[Path], checkpoint: Path, fast: bool) -> float:
    """Decode + orient + RGB + resize of every image, one thread: what the decode pool does."""
    from siglip_cli.core.config import config_from_folder
    from siglip_cli.core.images import DecodeOptions, load_pixels

    pre = config_from_folder(checkpoint).preprocess
    options = DecodeOptions(draft_jpeg=fast)
    start = time.perf_counter()
    for path in paths:
        load_pixels(path, str(path), pre, options)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--size", default="640x480", help="JPEG size, WxH (4000x3000 = a 12 MP phone photo)")
    parser.add_argument("--runs", default="ref-fp32,ref-bf16,exact,default,int8", help=f"comma-separated, from: {', '.join(RUNS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="google/siglip-base-patch16-224")
    parser.add_argument("--work", type=Path, default=Path("/tmp/siglip-bench"))
    args = parser.parse_args()
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    width, height = (int(v) for v in args.size.lower().split("x"))

    checkpoint = build_checkpoint(args.work / args.model.split("/")[-1], args.model)
    folder = args.work / f"jpegs-{width}x{height}-{args.count}"
    paths = make_jpegs(folder, args.count, size=(width, height), seed=width)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "SIGLIP_CACHE_DIR": str(args.work / "cache")}
    outs = {name: args.work / f"modes-{name}.npy" for name in names}
    print(f"embed, whole process, {args.count} JPEGs {width}x{height}, {args.model} (random weights), batch "
          f"{args.batch_size}, {args.rounds} interleaved rounds; {machine()}")

    results: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            results[name].append(run_process(command(name, folder, checkpoint, outs[name], args.batch_size), env))
    print(f"after the runs: {load_average()}")

    walls = {name: statistics.median(r["wall"] for r in runs) for name, runs in results.items()}
    exact_rows = np.load(outs["exact"]) if "exact" in names else None
    print(f"{'run':20} {'wall s':>7} {'min-max':>13} {'images/s':>9} {'cpu s':>7} {'peak MB':>8} "
          f"{'vs ref fp32':>12} {'vs exact':>9} {'min cos vs exact':>17}")
    for name, runs in results.items():
        wall = walls[name]
        spread = f"{min(r['wall'] for r in runs):.1f}-{max(r['wall'] for r in runs):.1f}"
        cpu = statistics.median(r["cpu"] for r in runs)
        peak = max(r["peak"] for r in runs)
        vs_ref = f"{walls['ref-fp32'] / wall:11.2f}x" if "ref-fp32" in walls else ""
        vs_exact = f"{walls['exact'] / wall:8.2f}x" if "exact" in walls else ""
        agree = ""
        if exact_rows is not None:
            rows = np.load(outs[name]).astype(np.float32)
            agree = f"{np.min(np.sum(rows * exact_rows, axis=1)):17.6f}"
        print(f"{name:20} {wall:7.1f} {spread:>13} {args.count / wall:9.2f} {cpu:7.1f} {peak:8.0f} {vs_ref:>12} {vs_exact:>9} {agree}")

    exact_decode, fast_decode = decode_seconds(paths, checkpoint, False), decode_seconds(paths, checkpoint, True)
    print(f"decode + resize, one thread: exact {1e3 * exact_decode / len(paths):.1f} ms/image, "
          f"fast {1e3 * fast_decode / len(paths):.1f} ms/image ({exact_decode / fast_decode:.2f}x)")
    for name in names:
        decode = RUNS[name][2]
        if decode == "auto":
            import torch

            from siglip_cli.runtime import resolve_decode, resolve_precision

            decode = resolve_decode("auto", resolve_precision("auto", torch.device("cpu")))
        seconds = fast_decode if decode == "fast" else exact_decode
        cpu = statistics.median(r["cpu"] for r in results[name])
        print(f"  {name:20} decodes {decode:5}: {seconds:6.1f} s of {cpu:6.1f} CPU s ({100 * seconds / cpu:4.1f}%)")

if __name__ == "__main__":
    main()
