"""Our model core against transformers' SiglipModel on checkpoints of several shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import siglip_cli
from siglip_cli.core.model import normalize

from .conftest import random_image

SHAPES = {
    "tiny": {},
    # patch 14 with "valid" padding: 44 px -> 3x3 patches, 2 px unused (like so400m's 384 / 14)
    "patch14-odd-heads": dict(
        text=dict(hidden_size=36, intermediate_size=40, num_attention_heads=3, num_hidden_layers=3),
        vision=dict(hidden_size=36, intermediate_size=40, num_attention_heads=3, image_size=44, patch_size=14),
    ),
    # text width differs from image width; the head projects to the shared width
    "projection": dict(
        text=dict(hidden_size=24, intermediate_size=40, num_attention_heads=2, projection_size=40),
        vision=dict(hidden_size=40, intermediate_size=56, num_attention_heads=5, image_size=48, patch_size=16),
    ),
    "erf-gelu-larger-image": dict(
        text=dict(hidden_act="gelu"),
        vision=dict(hidden_act="gelu", image_size=64, patch_size=8),
    ),
}
TEXTS = ["This is a photo of 2 cats.", "This is a photo of a dog.", "", "an airplane flying over the mountains at sunset " * 4]


@pytest.fixture(scope="module", params=sorted(SHAPES))
def shape(request, checkpoint_factory, reference_factory):
    folder = checkpoint_factory(request.param, **SHAPES[request.param])
    return folder, reference_factory(folder)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fp32_embeddings_and_logits_match_reference(shape, attn):
    folder, ref = shape
    images = [random_image(i, (37 + 5 * i, 41)) for i in range(3)]
    model = siglip_cli.load(folder, device="cpu", dtype="fp32", attn=attn, use_cache=False)
    ours_img = model.embed_images(images)
    ours_txt = model.embed_texts(TEXTS)
    np.testing.assert_allclose(ours_img, ref.image_embeds(images), atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours_txt, ref.text_embeds(TEXTS), atol=1e-5, rtol=0)
    np.testing.assert_allclose(model.logits(ours_img, ours_txt), ref.logits(images, TEXTS), atol=1e-5, rtol=0)


def test_raw_features_match_reference_unnormalised(shape):
    folder, ref = shape
    images = [random_image(7, (33, 35))]
    model = siglip_cli.load(folder, device="cpu", use_cache=False, exact=True)
    pixels = ref.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = ref.model.get_image_features(pixel_values=pixels).pooler_output.numpy()
    np.testing.assert_allclose(model.embed_images(images, normalize=False), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,bound", [("bf16", 0.25), ("fp16", 0.02)])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_half_precision_stays_within_stated_bound(shape, dtype, bound, attn):
    """Half precision on the CPU: logits within `bound` of the fp32 reference (logits are about
    exp(scale) = 10 times a cosine here; README states these bounds)."""
    folder, ref = shape
    images = [random_image(i, (40, 40)) for i in range(2)]
    model = siglip_cli.load(folder, device="cpu", dtype=dtype, attn=attn, use_cache=False)
    ours = model.logits(model.embed_images(images), model.embed_texts(TEXTS))
    np.testing.assert_allclose(ours, ref.logits(images, TEXTS), atol=bound, rtol=0)


def test_backends_agree_and_switch_in_place(tiny_checkpoint):
    model = siglip_cli.load(tiny_checkpoint, device="cpu", attn="eager", use_cache=False, exact=True)
    images = [random_image(3, (40, 40))]
    eager_img, eager_txt = model.embed_images(images), model.embed_texts(TEXTS)
    model.set_attention("sdpa")
    assert model.attn == "sdpa"
    np.testing.assert_allclose(model.embed_images(images), eager_img, atol=1e-6)
    np.testing.assert_allclose(model.embed_texts(TEXTS), eager_txt, atol=1e-6)


def test_text_tower_pools_the_last_padded_position(tiny_checkpoint, reference_factory):
    """Padding is not optional: the same text padded to 64 and unpadded embed differently, and
    ours equals the padded reference."""
    ref = reference_factory(tiny_checkpoint)
    model = siglip_cli.load(tiny_checkpoint, device="cpu", use_cache=False, exact=True)
    text = ["a photo of a cat"]
    unpadded = ref.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        short = normalize(ref.model.get_text_features(input_ids=unpadded).pooler_output).numpy()
    ours = model.embed_texts(text)
    np.testing.assert_allclose(ours, ref.text_embeds(text), atol=1e-6)
    assert np.abs(ours - short).max() > 1e-3
