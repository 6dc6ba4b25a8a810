"""CUDA: every backend and dtype against transformers' fp32 SiglipModel (CPU) on the same weights
and pixels, at the head sizes of the released models; every fast backend against eager on the
same device and dtype with a tight bound; the pinned-memory pipeline with several batches in
flight, on every device present. Skipped where no CUDA device is present (run on the GPU machine:
`bash benchmarks/gpu_all.sh`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import siglip_cli
from siglip_cli.core.attention import flash_available

from .conftest import random_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TEXTS = ["This is a photo of 2 cats.", "This is a photo of a dog.", "a remote control on a blanket", ""]
# Logits (exp(t) * cosine + b, exp(t) = 10 here) against the fp32 reference. fp32 runs in IEEE
# fp32 on CUDA (TF32 off, runtime.ieee_fp32), so it is held to the CPU's parity bound.
REFERENCE_BOUNDS = {"fp32": 1e-5, "fp16": 0.02, "bf16": 0.25}
# A fast backend against eager, same device and dtype. Calibrated on the CPU for these shapes:
# sdpa vs eager 0.0009 (fp16) and 0.010 (bf16); a doubled softmax scale in the one-query paths
# (text tower's last layer, pooling probe) moves logits by 0.025-0.032.
SAME_DEVICE_BOUNDS = {"fp16": 0.005, "bf16": 0.02}

# head sizes 16, 64 (base) and 72 (so400m: flash rounds it up to a 96-wide kernel); 2 layers each
SHAPES = {
    "head16": dict(text=dict(hidden_size=64, intermediate_size=96, num_attention_heads=4),
                   vision=dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, image_size=64, patch_size=8)),
    "head64": dict(text=dict(hidden_size=256, intermediate_size=512, num_attention_heads=4),
                   vision=dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, image_size=64, patch_size=8)),
    "head72": dict(text=dict(hidden_size=288, intermediate_size=512, num_attention_heads=4),
                   vision=dict(hidden_size=288, intermediate_size=512, num_attention_heads=4, image_size=56, patch_size=14)),
}
DEVICES = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cuda:0"]


def _backends():
    yield "eager"
    yield "sdpa"
    yield pytest.param("flash", marks=pytest.mark.skipif(flash_available() is not None, reason=str(flash_available())))


@pytest.fixture(scope="module", params=sorted(SHAPES))
def shape(request, checkpoint_factory):
    return checkpoint_factory(f"cuda-{request.param}", **SHAPES[request.param])


def _logits(folder, images, device="cuda", **options):
    model = siglip_cli.load(folder, device=device, use_cache=False, decode="exact", **options)
    return model, model.logits(model.embed_images(images), model.embed_texts(TEXTS))


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("attn", list(_backends()))
def test_cuda_logits_match_the_fp32_reference(shape, reference_factory, dtype, attn):
    if attn == "flash" and dtype == "fp32":
        pytest.skip("flash runs only in fp16/bf16")
    images = [random_image(i, (70 + 9 * i, 60)) for i in range(3)]
    _, ours = _logits(shape, images, dtype=dtype, attn=attn)
    np.testing.assert_allclose(ours, reference_factory(shape).logits(images, TEXTS), atol=REFERENCE_BOUNDS[dtype], rtol=0)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_fast_backends_match_eager_on_the_same_device(shape, dtype):
    images = [random_image(20 + i, (64, 64)) for i in range(5)]
    model, eager = _logits(shape, images, dtype=dtype, attn="eager")
    for backend in ["sdpa"] + (["flash"] if flash_available() is None else []):
        model.set_attention(backend)
        ours = model.logits(model.embed_images(images), model.embed_texts(TEXTS))
        np.testing.assert_allclose(ours, eager, atol=SAME_DEVICE_BOUNDS[dtype], rtol=0, err_msg=backend)


@pytest.mark.parametrize("device", DEVICES)
def test_pinned_ring_with_several_batches_in_flight(checkpoint_factory, device):
    """37 distinct images in batches of 4 (10 launches, the last one partial) through the two
    pinned buffers, with 4 decode threads: a buffer read before its copy lands, or refilled too
    early, puts another image's row in place. Each row must equal that image embedded alone. On
    cuda:1 this also checks that the copies and events live on that device's stream."""
    folder = checkpoint_factory("cuda-head16", **SHAPES["head16"])
    images = [random_image(100 + i, (64 + i, 64)) for i in range(37)]
    model = siglip_cli.load(folder, device=device, dtype="fp32", decode="exact", use_cache=False, batch_size=4, workers=4)
    assert next(model.vision_model.parameters()).device == torch.device(device)
    ring = model.embed_images(images)
    alone = np.concatenate([model.embed_images([image], batch_size=1) for image in images])
    np.testing.assert_allclose(ring, alone, atol=1e-5, rtol=0)
    assert (ring @ ring.T - np.eye(len(images))).max() < 0.9999  # distinct rows: a swap would show


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device_matches_the_first(checkpoint_factory):
    folder = checkpoint_factory("cuda-head16", **SHAPES["head16"])
    images = [random_image(200 + i, (64, 64)) for i in range(9)]
    first = siglip_cli.load(folder, device="cuda:0", dtype="fp16", use_cache=False, batch_size=4).embed_images(images)
    second = siglip_cli.load(folder, device="cuda:1", dtype="fp16", use_cache=False, batch_size=4).embed_images(images)
    np.testing.assert_allclose(second, first, atol=2e-3, rtol=0)
