"""How close the vision tower (ours and transformers') runs to this machine's matrix-multiply
ceiling. One process, interleaved rounds:

1. the fp32 GEMM rate of torch (MKL on x86) for the four linear-layer shapes of the vision tower
   at the given batch (qkv, attention output, MLP up, MLP down) and a large square product;
2. the whole vision tower, ours (`sdpa`) and transformers' `SiglipModel.get_image_features`
   (`sdpa`), on the same weights and pixels, as achieved GFLOP/s and as % of the best GEMM rate.

If the reference already runs near the ceiling, no exact fp32 implementation can be much faster
on this machine; the gains left are in start-up and the input pipeline.

    python benchmarks/matmul_ceiling.py [--batch 16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_checkpoint, machine  # noqa: E402


def best_rate(fn, flops: float, runs: int) -> list[float]:
    fn()
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        rates.append(flops / (time.perf_counter() - start) / 1e9)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="google/siglip-base-patch16-224")
    parser.add_argument("--work", type=Path, default=Path("/tmp/siglip-bench"))
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from transformers import SiglipModel

    import siglip_cli
    from siglip_cli.cli.bench import vision_flops
    from siglip_cli.runtime import keep_freed_memory

    keep_freed_memory()  # as the CLI does; it helps both implementations alike (same process)
    checkpoint = build_checkpoint(args.work / args.model.split("/")[-1], args.model)
    ours = siglip_cli.load(str(checkpoint), device="cpu", dtype="fp32", attn="sdpa")
    reference = SiglipModel.from_pretrained(checkpoint, attn_implementation="sdpa").eval()
    v = ours.config.vision
    tokens = args.batch * (v.image_size // v.patch_size) ** 2
    d, i = v.hidden_size, v.intermediate_size
    shapes = {"qkv": (d, 3 * d), "attention out": (d, d), "MLP up": (d, i), "MLP down": (i, d)}
    operands = {name: (torch.randn(tokens, k), torch.randn(n, k)) for name, (k, n) in shapes.items()}
    square = torch.randn(4096, 4096)
    pixels = torch.rand(args.batch, 3, v.image_size, v.image_size) * 2 - 1
    tower_flops = vision_flops(ours.config) * args.batch

    rates: dict[str, list[float]] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, (x, w) in operands.items():
                rates.setdefault(f"GEMM {name} ({tokens}x{w.shape[1]} @ {w.shape[1]}x{w.shape[0]})", []).extend(
                    best_rate(lambda x=x, w=w: F.linear(x, w), 2 * x.shape[0] * w.shape[0] * w.shape[1], 2)
                )
            rates.setdefault("GEMM square 4096", []).extend(best_rate(lambda: square @ square, 2 * 4096**3, 1))
            rates.setdefault("vision tower, ours (sdpa)", []).extend(best_rate(lambda: ours.vision_model(pixels), tower_flops, 1))
            rates.setdefault("vision tower, transformers (sdpa)", []).extend(
                best_rate(lambda: reference.get_image_features(pixel_values=pixels), tower_flops, 1)
            )

    ceiling = max(statistics.median(r) for name, r in rates.items() if name.startswith("GEMM"))
    print(f"fp32 GFLOP/s, batch {args.batch}, {args.model} shapes, {args.rounds} rounds; {machine()}; torch {torch.__version__}")
    print(f"{'':58} {'median':>7} {'min':>6} {'max':>6} {'% of ceiling':>13}")
    for name, r in rates.items():
        print(f"{name:58} {statistics.median(r):7.0f} {min(r):6.0f} {max(r):6.0f} {100 * statistics.median(r) / ceiling:12.0f}%")
    print(f"ceiling = the best median GEMM rate above ({ceiling:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
