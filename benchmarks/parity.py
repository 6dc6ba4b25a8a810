"""Measured parity with transformers: the largest absolute difference of our logits and
embeddings from transformers' fp32 model (eager attention) on the same checkpoint, pixels and
token ids, for every backend and dtype this machine can run.

    python benchmarks/parity.py                 # CPU, siglip-base-patch16-224
    python benchmarks/parity.py --model google/siglip2-base-patch16-224      # SigLIP 2, fixed resolution
    python benchmarks/parity.py --model google/siglip2-base-patch16-naflex   # SigLIP 2 NaFlex
    python benchmarks/parity.py --device cuda   # GPU (adds flash when flash-attn is installed)

The checkpoint is full size with random weights (built locally); logits there are
exp(t) * cosine + b with exp(t) = 10. The reference is SiglipModel, or Siglip2Model for NaFlex,
whose images here have four aspect ratios (4:3, 3:4, 4:1, 1:1) so that a batch is padded and
masked. The README and docs/benchmarks.md quote this script's output.
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
NAFLEX_SIZES = [(640, 480), (480, 640), (1200, 300), (200, 200)]


def images(work: Path, count: int, naflex: bool) -> list[Path]:
    if not naflex:
        return make_jpegs(work / "parity-jpegs", count)
    per_size = max(1, count // len(NAFLEX_SIZES))
    return [p for w, h in NAFLEX_SIZES for p in make_jpegs(work / f"parity-jpegs-{w}x{h}", per_size, size=(w, h))]


def reference_inputs(batch) -> dict:
    """Our batch (PixelBatch or PatchBatch, on the CPU) under transformers' argument names."""
    if hasattr(batch, "patches"):
        return {"pixel_values": batch.patches, "pixel_attention_mask": batch.mask, "spatial_shapes": batch.spatial_shapes}
    return {"pixel_values": batch.pixels.contiguous()}


def to_device(batch, device: torch.device):
    """The same batch with its tensors on `device` (NaFlex grids stay on the host)."""
    from dataclasses import fields, replace

    return replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in fields(batch) if f.name != "spatial_shapes"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="google/siglip-base-patch16-224")
    parser.add_argument("--work", type=Path, default=Path("/tmp/siglip-bench"))
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()

    import transformers

    import siglip_cli
    from siglip_cli.core.attention import why_unavailable
    from siglip_cli.core.images import normalization_table
    from siglip_cli.pipeline import as_sources
    from siglip_cli.runtime import resolve_dtype

    checkpoint = build_checkpoint(args.work / args.model.split("/")[-1], args.model)
    probe = siglip_cli.load(checkpoint, device="cpu", dtype="fp32", attn="eager", use_cache=False)
    naflex = probe.config.vision.naflex
    paths = images(args.work, args.images, naflex)
    model_class = transformers.Siglip2Model if naflex else transformers.SiglipModel
    reference = model_class.from_pretrained(checkpoint, attn_implementation="eager").eval()
    # The same pixels and ids for both sides (pixel and token parity are tested separately).
    pipeline = probe.image_pipeline()
    layout = pipeline.layout
    items = [pipeline.load(source) for source in as_sources([str(p) for p in paths])]
    table = torch.from_numpy(normalization_table(probe.config.preprocess))
    batch = layout.to_device(layout.collate(items, None), torch.device("cpu"), table)
    ids = torch.tensor(probe.tokenizer(TEXTS))
    with torch.no_grad():
        out = reference(input_ids=ids, **reference_inputs(batch))
        ref_logits = out.logits_per_image.numpy()
        ref_img, ref_txt = out.image_embeds.numpy(), out.text_embeds.numpy()

    device = torch.device(args.device)
    print(f"parity with transformers' {model_class.__name__} (fp32, eager), {args.model} random weights, "
          f"{len(paths)} images x {len(TEXTS)} texts; {machine()}")
    print(f"{'device':7} {'dtype':5} {'attn':6} {'max|Δ| logits':>14} {'max|Δ| image emb':>17} {'max|Δ| text emb':>16}")
    for dtype in ("fp32", "bf16", "fp16"):
        for attn in ("eager", "sdpa", "flash"):
            why = why_unavailable(attn, device, resolve_dtype(dtype, device), (64,), masked=naflex)
            if why:
                print(f"{device.type:7} {dtype:5} {attn:6} unavailable: {why}")
                continue
            model = siglip_cli.load(checkpoint, device=args.device, dtype=dtype, attn=attn, use_cache=False)
            with torch.inference_mode():
                img = model.vision_model(*to_device(batch, device).model_inputs())
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
