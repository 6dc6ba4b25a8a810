"""How far an image's row moves with the batch it lands in, per mode.

`--update`, `--resume`, Ray shards and `search --image` embed an image in another batch than a
clean run would (a different batch size, other neighbours, another position). This script
embeds the same JPEGs in several batch compositions -- one at a time, all in one batch in
order, in batches of 3 in reverse order -- and reports, per mode, the largest difference
between two rows of the same image: max |a - b| over the components of L2-normalised rows,
and 1 - cosine. docs/formats.md ("Are rows equal to a clean run?") quotes the figures, and
tests/test_store_integrity.py tests the stated bounds.

    python benchmarks/batch_dependence.py                      # base-224 and NaFlex base, CPU
    python benchmarks/batch_dependence.py --modes fp32,int8 --images 6
    python benchmarks/batch_dependence.py --device cuda --modes fp32,fp16,bf16

The checkpoints are full-size architectures with random weights (benchmarks/common.py): the
kernels, shapes and reductions are those of the released models, the values are not.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_checkpoint, load_average, machine, make_jpegs  # noqa: E402

MODES = {  # name -> (architecture, dtype)
    "fp32": ("google/siglip-base-patch16-224", "fp32"),
    "bf16": ("google/siglip-base-patch16-224", "bf16"),
    "fp16": ("google/siglip-base-patch16-224", "fp16"),
    "int8": ("google/siglip-base-patch16-224", "int8"),
    "naflex-fp32": ("google/siglip2-base-patch16-naflex", "fp32"),
    "naflex-bf16": ("google/siglip2-base-patch16-naflex", "bf16"),
}


def compositions(count: int) -> dict[str, list[list[int]]]:
    """Ways to cut images 0..count-1 into batches (each image exactly once)."""
    order = list(range(count))
    reverse = order[::-1]
    return {
        "one at a time": [[i] for i in order],
        f"one batch of {count}": [order],
        "batches of 3, reversed": [reverse[i : i + 3] for i in range(0, count, 3)],
    }


def rows_for(engine, sources, batches: list[list[int]]) -> np.ndarray:
    rows = np.zeros((len(sources), engine.embed_dim), np.float32)
    for batch in batches:
        picked = [sources[i] for i in batch]
        for item in engine.iter_image_features(picked, True, batch_size=len(picked), workers=1):
            assert item.error is None, item.error
            rows[batch[item.index]] = item.vector
    return rows


def measure(mode: str, folder: Path, paths: list[Path], device: str) -> dict:
    from siglip_cli import load
    from siglip_cli.sources import Source

    architecture, dtype = MODES[mode]
    checkpoint = build_checkpoint(folder / architecture.replace("/", "--"), architecture)
    engine = load(str(checkpoint), device=device, dtype=dtype, decode="exact", use_cache=False)
    sources = [Source(str(p), str(p)) for p in paths]
    started = time.perf_counter()
    found = {name: rows_for(engine, sources, batches) for name, batches in compositions(len(paths)).items()}
    names = list(found)
    worst_abs, worst_cos = 0.0, 0.0
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            worst_abs = max(worst_abs, float(np.abs(found[a] - found[b]).max()))
            cosines = np.sum(found[a].astype(np.float64) * found[b], axis=1)
            worst_cos = max(worst_cos, float((1 - cosines).max()))
    return {"mode": mode, "architecture": architecture, "dtype": engine.precision, "max_abs": worst_abs,
            "one_minus_cosine": worst_cos, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="fp32,bf16,int8,naflex-fp32,naflex-bf16")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "siglip-batch-dependence")
    args = parser.parse_args()
    import torch

    print(f"# {machine()}; torch {torch.__version__}; device {args.device}; before: {load_average()}", flush=True)
    paths = make_jpegs(args.work / "jpegs", args.images)
    print(f"# {args.images} JPEGs 640x480; compositions: {', '.join(compositions(args.images))}")
    print(f"{'mode':<13} {'dtype':<6} {'max |a-b|':>11} {'1-cosine':>11} {'seconds':>8}")
    for mode in args.modes.split(","):
        result = measure(mode.strip(), args.work, paths, args.device)
        print(f"{result['mode']:<13} {result['dtype']:<6} {result['max_abs']:>11.3g} {result['one_minus_cosine']:>11.3g} "
              f"{result['seconds']:>8.1f}", flush=True)
    print(f"# load after: {load_average()}")


if __name__ == "__main__":
    main()
