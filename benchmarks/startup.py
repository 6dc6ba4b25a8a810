"""Whole-process time of a one-image classify: `siglip classify one.jpg --labels ...` against the
transformers recipe from the SigLIP docs (the zero-shot pipeline), on the same full-size
base-224 checkpoint (random weights, built locally) and the same image.

Runs are interleaved (reference, then ours with an empty label cache and with a warm one, in
the default mode and with `--exact`) and repeated; medians and ratios are printed. Usage:

    python benchmarks/startup.py [--rounds 5] [--work /tmp/siglip-bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_checkpoint, machine, make_jpegs, timed_process  # noqa: E402

LABELS = ["2 cats", "2 dogs", "a plane", "a remote control", "a car"]

REFERENCE = """
import sys
from PIL import Image
from transformers import pipeline

image_classifier = pipeline(task="zero-shot-image-classification", model=sys.argv[1])
image = Image.open(sys.argv[2])
outputs = image_classifier(image, candidate_labels=sys.argv[3].split(","))
print([{"score": round(o["score"], 4), "label": o["label"]} for o in outputs])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/siglip-bench"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    checkpoint = build_checkpoint(args.work / "siglip-base-patch16-224")  # shared with the other scripts
    image = make_jpegs(args.work / "one", 1)[0]
    cache = args.work / "label-cache"
    env = {**os.environ, "SIGLIP_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    siglip = [sys.executable, "-m", "siglip_cli", "classify", str(image), "--labels", ",".join(LABELS),
              "--model", str(checkpoint), "--device", args.device, "--json"]
    modes = {"": [], ", --exact": ["--exact"]}  # the default mode (bf16 on CPUs with native bf16) and fp32
    reference = [sys.executable, "-c", REFERENCE, str(checkpoint), str(image), ",".join(LABELS)]

    # one untimed run of each warms the OS page cache for the weights
    timed_process(reference, env)
    timed_process(siglip, env)
    times: dict[str, list[float]] = {"reference": []}
    peaks: dict[str, list[float]] = {"reference": []}
    for _ in range(args.rounds):
        wall, peak, _ = timed_process(reference, env)
        times["reference"].append(wall)
        peaks["reference"].append(peak)
        for mode, flags in modes.items():
            shutil.rmtree(cache, ignore_errors=True)
            for run in ("first run", "cached labels"):
                wall, peak, _ = timed_process(siglip + flags, env)
                times.setdefault(f"ours{mode}, {run}", []).append(wall)
                peaks.setdefault(f"ours{mode}, {run}", []).append(peak)

    base = statistics.median(times["reference"])
    print(f"one-image classify, whole process, {len(LABELS)} labels, base-224 (random weights); {machine()}")
    print(f"{'run':32} {'median s':>9} {'min s':>7} {'max s':>7} {'peak MB':>8} {'time vs reference':>18}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:32} {median:9.2f} {min(values):7.2f} {max(values):7.2f} {statistics.median(peaks[name]):8.0f} "
              f"{median / base:17.2f}x")


if __name__ == "__main__":
    main()
