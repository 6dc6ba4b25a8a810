"""How far each fast mode is from the exact one: `--exact` (fp32, exact decoding, transformers'
numbers) against bf16, int8 and fast JPEG decoding, alone and combined, on the same full-size
checkpoint (random weights, built locally), the same JPEGs and the same labels.

For every mode: the min cosine of its image embeddings and of its text embeddings with the exact
ones, the max absolute difference of SigLIP's sigmoid probabilities over images x labels, and
how often the top-1 label is the same. For fast decoding also the pixel difference after the
resize to the model's input, by source size. Images are generated (COCO size and larger, up to
12 MP, where draft decoding applies).

    python benchmarks/agreement.py                       # 300 images x 20 labels, base-224
    python benchmarks/agreement.py --per-size 20         # quicker

Random weights: scores of such a model mean nothing (its probabilities are all near
sigmoid(-10)), and its labels are nearly tied for every image, so top-1 agreement here is a
much harsher test than on released weights. To show what flips, the last column gives the
largest gap, in cosine, between the exact mode's best label and the one the fast mode put first,
over the images where they differ; the header line gives the exact mode's median gap between its
best and second-best label.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_checkpoint, machine, make_jpegs  # noqa: E402

LABELS = [
    "a cat", "a dog", "a car", "a plane", "a boat", "a bird", "a horse", "a bicycle", "a person", "a tree",
    "a building", "a mountain", "the sea", "a flower", "food on a plate", "a laptop", "a phone", "a chair",
    "a train", "a street at night",
]
TEMPLATE = "This is a photo of {}."
SIZES = ((640, 480), (2048, 1536), (4000, 3000))  # COCO; 3 MP; 12 MP (a phone photo)
MODES = [  # (name, dtype, decode)
    ("bf16", "bf16", "exact"),
    ("int8", "int8", "exact"),
    ("fast decode (fp32)", "fp32", "fast"),
    ("bf16 + fast decode", "bf16", "fast"),
    ("int8 + fast decode", "int8", "fast"),
]


def embed(checkpoint: Path, paths: list[Path], dtype: str, decode: str) -> tuple[np.ndarray, np.ndarray]:
    import siglip_cli

    model = siglip_cli.load(checkpoint, device="cpu", dtype=dtype, decode=decode, attn="sdpa", use_cache=False)
    return model.embed_images(paths), model.embed_texts(LABELS, template=TEMPLATE)


def probabilities(checkpoint: Path, images: np.ndarray, texts: np.ndarray) -> np.ndarray:
    import siglip_cli

    model = siglip_cli.load(checkpoint, device="cpu", dtype="fp32", use_cache=False)
    return model.probabilities(model.logits(images, texts))


def flipped_gap(exact_cosines: np.ndarray, fast_top: np.ndarray) -> float:
    """Largest cosine gap between the exact best label and the fast mode's choice, where they differ."""
    rows = np.arange(len(fast_top))
    gaps = exact_cosines.max(axis=1) - exact_cosines[rows, fast_top]
    return float(gaps.max())


def pixel_difference(checkpoint: Path, paths: list[Path]) -> tuple[float, int]:
    """(mean, max) absolute difference in uint8 levels between exact and draft decoding."""
    from siglip_cli.core.config import config_from_folder
    from siglip_cli.core.images import DecodeOptions, load_pixels

    pre = config_from_folder(checkpoint).preprocess
    diffs = [np.abs(load_pixels(p, str(p), pre).astype(int) - load_pixels(p, str(p), pre, DecodeOptions(draft_jpeg=True)).astype(int))
             for p in paths]
    return float(np.mean([d.mean() for d in diffs])), int(max(d.max() for d in diffs))


def int8_batch_effect(checkpoint: Path, paths: list[Path]) -> float:
    import siglip_cli

    model = siglip_cli.load(checkpoint, device="cpu", dtype="int8", decode="exact", use_cache=False)
    together = model.embed_images(paths, batch_size=len(paths))
    alone = np.concatenate([model.embed_images([p]) for p in paths])
    return float(np.sum(together * alone, axis=1).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="google/siglip-base-patch16-224")
    parser.add_argument("--per-size", type=int, default=100, help="images of each size (3 sizes)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/siglip-bench"))
    args = parser.parse_args()

    checkpoint = build_checkpoint(args.work / args.model.split("/")[-1], args.model)
    groups = {size: make_jpegs(args.work / f"jpegs-{size[0]}x{size[1]}", args.per_size, size=size, seed=size[0]) for size in SIZES}
    paths = [p for group in groups.values() for p in group]
    print(f"agreement with --exact (fp32, exact decode), {args.model} (random weights), {len(paths)} images "
          f"({args.per_size} each of {', '.join(f'{w}x{h}' for w, h in SIZES)}) x {len(LABELS)} labels; {machine()}")

    exact_images, exact_texts = embed(checkpoint, paths, "fp32", "exact")
    exact_probs = probabilities(checkpoint, exact_images, exact_texts)
    exact_cosines = exact_images @ exact_texts.T
    ranked = np.sort(exact_cosines, axis=1)
    print(f"exact mode: median cosine gap between the best and second-best label {np.median(ranked[:, -1] - ranked[:, -2]):.2e}")
    print(f"{'mode':22} {'min cos image':>14} {'min cos text':>13} {'max|Δp|':>9} {'top-1 same':>11} {'largest gap flipped':>20}")
    for name, dtype, decode in MODES:
        images, texts = embed(checkpoint, paths, dtype, decode)
        probs = probabilities(checkpoint, images, texts)
        same = float(np.mean(probs.argmax(1) == exact_probs.argmax(1)))
        print(f"{name:22} {np.sum(images * exact_images, axis=1).min():14.6f} {np.sum(texts * exact_texts, axis=1).min():13.6f} "
              f"{np.abs(probs - exact_probs).max():9.2e} {100 * same:10.1f}% {flipped_gap(exact_cosines, probs.argmax(1)):20.2e}")
    print(f"int8, the same image alone and in a batch of 16: min cosine {int8_batch_effect(checkpoint, paths[:16]):.6f} "
          "(activations are quantized with one scale per batch)")
    print("fast decode, pixels after the resize to the model's input (uint8 levels), by source size:")
    for (w, h), group in groups.items():
        mean, worst = pixel_difference(checkpoint, group)
        print(f"  {w}x{h}: mean {mean:.3f}, max {worst}")


if __name__ == "__main__":
    main()
