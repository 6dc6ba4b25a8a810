"""Whole-process `siglip embed` against the transformers loop from the SigLIP docs (processor +
`get_image_features`, batched), on the same full-size checkpoint (random weights, built
locally) and the same JPEGs. Prints wall time, images/s, peak RSS and the ratios.

    python benchmarks/embed_throughput.py --counts 100,1000            # CPU
    python benchmarks/embed_throughput.py --device cuda --dtype fp16    # GPU (sdpa both)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_checkpoint, machine, make_jpegs, timed_process  # noqa: E402

REFERENCE = """
import sys, numpy as np, torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

folder, checkpoint, out, batch, device, dtype = sys.argv[1:7]
dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
model = AutoModel.from_pretrained(checkpoint, attn_implementation="sdpa", dtype=dtype).to(device).eval()
processor = AutoProcessor.from_pretrained(checkpoint)
paths = sorted(str(p) for p in __import__("pathlib").Path(folder).glob("*.jpg"))
rows = []
for start in range(0, len(paths), int(batch)):
    images = [Image.open(p).convert("RGB") for p in paths[start : start + int(batch)]]
    inputs = processor(images=images, return_tensors="pt").to(device)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"].to(dtype)).pooler_output
    rows.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
np.save(out, np.concatenate(rows))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="100,1000")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--model", default="google/siglip-base-patch16-224")
    parser.add_argument("--work", type=Path, default=Path("/tmp/siglip-bench"))
    parser.add_argument("--ours-only", action="store_true")
    args = parser.parse_args()
    batch = args.batch_size or (256 if args.device.startswith("cuda") else 16)

    checkpoint = build_checkpoint(args.work / args.model.split("/")[-1], args.model)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "SIGLIP_CACHE_DIR": str(args.work / "cache")}
    print(f"embed, whole process, {args.model} (random weights), {args.device} {args.dtype}, batch {batch}; {machine()}")
    print(f"{'images':>6} {'run':10} {'wall s':>8} {'images/s':>9} {'peak MB':>8} {'speed-up':>9} {'peak vs 100':>12}")
    peaks: dict[str, float] = {}
    for count in [int(c) for c in args.counts.split(",")]:
        folder = args.work / f"jpegs-{count}"
        make_jpegs(folder, count)
        ours_out, ref_out = args.work / "ours.npy", args.work / "reference.npy"
        ours = [sys.executable, "-m", "siglip_cli", "embed", str(folder), "--out", str(ours_out), "--model", str(checkpoint),
                "--device", args.device, "--dtype", args.dtype, "--attn", "sdpa", "--batch-size", str(batch)]
        reference = [sys.executable, "-c", REFERENCE, str(folder), str(checkpoint), str(ref_out), str(batch), args.device, args.dtype]
        results: dict[str, list[tuple[float, float]]] = {"reference": [], "siglip": []}
        for _ in range(args.rounds):
            if not args.ours_only:
                wall, peak, _ = timed_process(reference, env)
                results["reference"].append((wall, peak))
            wall, peak, _ = timed_process(ours, env)
            results["siglip"].append((wall, peak))
        if not args.ours_only:
            agreement = float(np.min(np.sum(np.load(ours_out).astype(np.float32) * np.load(ref_out), axis=1)))
        base = statistics.median(w for w, _ in results["reference"]) if results["reference"] else None
        for name, runs in results.items():
            if not runs:
                continue
            wall = statistics.median(w for w, _ in runs)
            peak = max(p for _, p in runs)
            peaks.setdefault(name, peak)
            speedup = f"{base / wall:8.2f}x" if base else ""
            growth = f"{100 * (peak / peaks[name] - 1):+11.1f}%"
            print(f"{count:6d} {name:10} {wall:8.1f} {count / wall:9.2f} {peak:8.0f} {speedup:>9} {growth:>12}")
        if not args.ours_only:
            print(f"{'':6} rows agree with the reference: min cosine {agreement:.6f}")


if __name__ == "__main__":
    main()
