"""CUDA parity: every backend and half-precision dtype against transformers' fp32 SiglipModel on
the same weights and pixels. Skipped where no CUDA device is present (run on the GPU machine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import siglip_cli
from siglip_cli.core.attention import flash_available

from .conftest import random_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TEXTS = ["This is a photo of 2 cats.", "This is a photo of a dog.", "a remote control on a blanket", ""]
# Bounds on logits (exp(t) * cosine + b with exp(t) = 10 here): half precision drifts from fp32.
BOUNDS = {"fp32": 1e-4, "fp16": 0.02, "bf16": 0.25}


def _backends():
    yield "eager"
    yield "sdpa"
    yield pytest.param("flash", marks=pytest.mark.skipif(flash_available() is not None, reason=str(flash_available())))


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("attn", list(_backends()))
def test_cuda_logits_match_the_fp32_reference(checkpoint_factory, reference_factory, dtype, attn):
    if attn == "flash" and dtype == "fp32":
        pytest.skip("flash runs only in fp16/bf16")
    # head_dim 16 (flash needs a multiple of 8); image 64 px, patch 8 -> 64 patches
    folder = checkpoint_factory(
        "cuda-shape",
        text=dict(hidden_size=64, intermediate_size=96, num_attention_heads=4),
        vision=dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, image_size=64, patch_size=8),
    )
    ref = reference_factory(folder)
    images = [random_image(i, (70 + 9 * i, 60)) for i in range(3)]
    model = siglip_cli.load(folder, device="cuda", dtype=dtype, attn=attn, use_cache=False)
    ours = model.logits(model.embed_images(images), model.embed_texts(TEXTS))
    expected = ref.logits(images, TEXTS)
    np.testing.assert_allclose(ours, expected, atol=BOUNDS[dtype], rtol=0)


def test_cuda_backends_agree_with_eager_in_half_precision(checkpoint_factory):
    folder = checkpoint_factory(
        "cuda-shape",
        text=dict(hidden_size=64, intermediate_size=96, num_attention_heads=4),
        vision=dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, image_size=64, patch_size=8),
    )
    images = [random_image(i, (64, 64)) for i in range(5)]
    model = siglip_cli.load(folder, device="cuda", dtype="fp16", attn="eager", use_cache=False)
    eager = model.embed_images(images)
    # batch size 1: five batches through the pinned-memory ring and the one-in-flight pipeline
    np.testing.assert_allclose(model.embed_images(images, batch_size=1), eager, atol=5e-3)
    backends = ["sdpa"] + (["flash"] if flash_available() is None else [])
    for backend in backends:
        model.set_attention(backend)
        np.testing.assert_allclose(model.embed_images(images), eager, atol=5e-3)
