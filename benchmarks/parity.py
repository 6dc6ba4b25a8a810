"""Measured parity with transformers: the largest absolute difference of our logits and
embeddings from transformers' fp32 SiglipModel (eager attention) on the same checkpoint,
pixels and token ids, for every backend and dtype this machine can run.

    python benchmarks/parity.py                 # CPU
    python benchmarks/parity.py --device cuda   # GPU (adds flash when flash-attn is installed)

The checkpoint is a full-size base-224 with random weights (built locally); logits there are
exp(t) * cosine + b with exp(t) = 10. The README and docs/benchmarks.md quote this script's output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_checkpoint, machine, make_jpegs  # noqa: E402

TEXTS = ["This is a photo of 2 cats.", "This is a photo of 2 dogs.", "This is a photo of a remote control.",
         "This is a photo of an airplane flying over the mountains at sunset.", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="google/siglip-base-patch16-224")
    parser.add_argument("--work", type=Path, default=Path("/tmp/siglip-bench"))
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()

    from transformers import SiglipModel

    import siglip_cli
    from siglip_cli.core.attention import why_unavailable

    checkpoint = build_checkpoint(args.work / args.model.split("/")[-1], args.model)
    paths = make_jpegs(args.work / "parity-jpegs", args.images)
    reference = SiglipModel.from_pretrained(checkpoint, attn_implementation="eager").eval()
    probe = siglip_cli.load(checkpoint, device="cpu", dtype="fp32", attn="eager", use_cache=False)
    # The same pixels and ids for both sides (pixel and token parity are tested separately).
    from siglip_cli.core.images import load_pixels, normalization_table, pixels_to_model_input

    pre = probe.config.preprocess
    pixels_u8 = torch.from_numpy(np.stack([load_pixels(p, str(p), pre) for p in paths]))
    pixels = pixels_to_model_input(pixels_u8, torch.from_numpy(normalization_table(pre))).contiguous()
    ids = torch.tensor(probe.tokenizer(TEXTS))
    with torch.no_grad():
        out = reference(input_ids=ids, pixel_values=pixels)
        ref_logits = out.logits_per_image.numpy()
        ref_img, ref_txt = out.image_embeds.numpy(), out.text_embeds.numpy()

    device = torch.device(args.device)
    print(f"parity with transformers' SiglipModel (fp32, eager), {args.model} random weights, "
          f"{len(paths)} images x {len(TEXTS)} texts; {machine()}")
    print(f"{'device':7} {'dtype':5} {'attn':6} {'max|Δ| logits':>14} {'max|Δ| image emb':>17} {'max|Δ| text emb':>16}")
    for dtype in ("fp32", "bf16", "fp16"):
        for attn in ("eager", "sdpa", "flash"):
            why = why_unavailable(attn, device, siglip_cli.runtime.resolve_dtype(dtype, device), (64,))
            if why:
                print(f"{device.type:7} {dtype:5} {attn:6} unavailable: {why}")
                continue
            model = siglip_cli.load(checkpoint, device=args.device, dtype=dtype, attn=attn, use_cache=False)
            with torch.inference_mode():
                img = model.vision_model(pixels.to(device))
                txt = model.text_model(ids.to(device))
            img = torch.nn.functional.normalize(img.float(), dim=-1).cpu().numpy()
            txt = torch.nn.functional.normalize(txt.float(), dim=-1).cpu().numpy()
            logits = model.logits(img, txt)
            print(f"{device.type:7} {dtype:5} {attn:6} {np.abs(logits - ref_logits).max():14.2e} "
                  f"{np.abs(img - ref_img).max():17.2e} {np.abs(txt - ref_txt).max():16.2e}")
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
