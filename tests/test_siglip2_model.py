"""SigLIP 2 against transformers: fixed-resolution (SiglipModel) and NaFlex (Siglip2Model)
checkpoints, pixels and patches bit for bit, embeddings and logits within 1e-5 in fp32 for
eager and sdpa, and NaFlex results independent of padding and of the batch an image lands in."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import siglip_cli
from siglip_cli.core.config import config_from_folder
from siglip_cli.core.errors import BackendUnavailable, UsageError
from siglip_cli.core.images import load_patches, normalization_table, normalize_channels_last
from siglip_cli.pipeline import PatchSequences

from .conftest import random_image
from .siglip2_fixtures import reference2, siglip2_fixed, siglip2_naflex

TEXTS = ["This is a photo of 2 CATS.", "This is a photo of a dog.", "", "An airplane flying over the mountains " * 8]

# Aspect ratios and sizes the NaFlex resize must get right: wide 3:1, tall 1:3, tiny, huge.
SHAPES = {"wide": (96, 32), "tall": (30, 90), "tiny": (3, 2), "square": (41, 41), "huge": (2400, 1600)}


def naflex_images():
    return [random_image(i, size) for i, size in enumerate(SHAPES.values())]


CHECKPOINTS = {
    "fixed": lambda f: siglip2_fixed(f),
    # giant-opt's layout: the text tower projects to the (wider) image width
    "fixed-projection": lambda f: siglip2_fixed(
        f, "siglip2-fixed-projection",
        text=dict(hidden_size=24, intermediate_size=40, num_attention_heads=2, projection_size=40),
        vision=dict(hidden_size=40, intermediate_size=56, num_attention_heads=5, image_size=48, patch_size=16)),
    "naflex": lambda f: siglip2_naflex(f),
    # a 6x6 position table (not the released 16x16: its size must come from the config)
    "naflex-6x6": lambda f: siglip2_naflex(
        f, "siglip2-naflex-6x6", vision=dict(num_patches=36, patch_size=4, num_attention_heads=2), max_num_patches=50),
}


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def checkpoint(request, tmp_path_factory):
    folder = CHECKPOINTS[request.param](tmp_path_factory)
    return folder, reference2(folder)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fp32_embeddings_and_logits_match_the_reference(checkpoint, attn):
    folder, ref = checkpoint
    images = naflex_images() if ref.naflex else [random_image(i, (37 + 5 * i, 41)) for i in range(3)]
    model = siglip_cli.load(folder, device="cpu", dtype="fp32", attn=attn, use_cache=False)
    ours_img, ours_txt = model.embed_images(images), model.embed_texts(TEXTS)
    np.testing.assert_allclose(ours_img, ref.image_embeds(images), atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours_txt, ref.text_embeds(TEXTS), atol=1e-5, rtol=0)
    np.testing.assert_allclose(model.logits(ours_img, ours_txt), ref.logits(images, TEXTS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("budget", [1, 7, 64])
def test_naflex_patch_budget_matches_the_processor_given_the_same(tmp_path_factory, budget):
    folder = siglip2_naflex(tmp_path_factory)
    ref = reference2(folder)
    images = naflex_images()
    model = siglip_cli.load(folder, device="cpu", max_patches=budget, use_cache=False, exact=True)
    np.testing.assert_allclose(model.embed_images(images), ref.image_embeds(images, budget), atol=1e-5, rtol=0)
    assert model.describe()["max_patches"] == budget


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_naflex_patches_identical_to_the_reference_processor(tmp_path_factory, name, mode):
    folder = siglip2_naflex(tmp_path_factory)
    ref = reference2(folder)
    config = config_from_folder(folder)
    image = random_image(7, SHAPES[name], mode)
    expected = ref.image_inputs([image])
    patches = load_patches(image, name, config.preprocess, config.vision.patch_size)
    count = patches.values.shape[0]
    table = torch.from_numpy(normalization_table(config.preprocess))
    ours = normalize_channels_last(torch.from_numpy(patches.values), table).numpy()
    assert tuple(expected["spatial_shapes"][0].tolist()) == patches.grid
    assert int(expected["pixel_attention_mask"][0].sum()) == count == patches.grid[0] * patches.grid[1]
    assert np.array_equal(ours, expected["pixel_values"][0, :count].numpy())


def test_naflex_result_does_not_depend_on_the_batch(tmp_path_factory):
    """An image alone, or padded next to larger and smaller ones, in any batch size: the same
    embedding (up to float rounding)."""
    folder = siglip2_naflex(tmp_path_factory)
    images = naflex_images()
    model = siglip_cli.load(folder, device="cpu", use_cache=False, exact=True)
    alone = np.stack([model.embed_images([image])[0] for image in images])
    for batch_size in (2, 3, len(images)):
        np.testing.assert_allclose(model.embed_images(images, batch_size=batch_size), alone, atol=1e-6, rtol=0)
    np.testing.assert_allclose(model.embed_images(images[::-1])[::-1], alone, atol=1e-6, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padding_is_masked_in_every_layer_and_the_pooling_head(tmp_path_factory, attn):
    """Whatever the padded patches hold, the output is the same: a layer (or the pooling head)
    that attended to padding would change with it."""
    folder = siglip2_naflex(tmp_path_factory)
    model = siglip_cli.load(folder, device="cpu", attn=attn, use_cache=False, exact=True)
    config = model.config
    layout = PatchSequences(config.preprocess, config.vision)
    # budgets of 24, 5 and 11 patches: a batch padded to the longest
    items = [load_patches(image, "x", replace(config.preprocess, max_num_patches=budget), config.vision.patch_size)
             for image, budget in zip(naflex_images(), (24, 5, 11))]
    table = torch.from_numpy(normalization_table(config.preprocess))
    batch = layout.to_device(layout.collate(items, None), torch.device("cpu"), table)
    assert not batch.mask.all()  # the batch has padding
    with torch.inference_mode():
        first = model.vision_model(*batch.model_inputs())
        noisy = batch.patches.masked_fill(~batch.mask[..., None], 0) + (~batch.mask[..., None]) * torch.randn_like(batch.patches) * 50
        second = model.vision_model(noisy, batch.mask, batch.spatial_shapes)
    np.testing.assert_allclose(second.numpy(), first.numpy(), atol=1e-6, rtol=0)


def test_flash_says_why_it_cannot_run_naflex(tmp_path_factory):
    with pytest.raises(BackendUnavailable, match="no padding mask, which SigLIP 2 NaFlex batches need.*--attn sdpa"):
        siglip_cli.load(siglip2_naflex(tmp_path_factory), device="cpu", attn="flash")


def test_max_patches_is_refused_for_fixed_resolution(tmp_path_factory):
    with pytest.raises(UsageError, match=r"fixed-resolution checkpoint \(32x32 pixels, 16 patches\)"):
        siglip_cli.load(siglip2_fixed(tmp_path_factory), max_patches=64)
    with pytest.raises(UsageError, match="from 1 to 4096"):
        siglip_cli.load(siglip2_naflex(tmp_path_factory), max_patches=5000)


def test_fixed_resolution_siglip2_resizes_bilinearly(tmp_path_factory):
    config = config_from_folder(siglip2_fixed(tmp_path_factory))
    assert config.preprocess.resample == 2 and not config.vision.naflex and config.model_type == "siglip"
    naflex = config_from_folder(siglip2_naflex(tmp_path_factory))
    assert naflex.vision.naflex and naflex.vision.naflex_positions == 16 and naflex.preprocess.max_num_patches == 24


def test_scores_differ_from_uncased_gemma_tokenizer(tmp_path_factory):
    """The reason to lower-case: transformers' GemmaTokenizer (what the repositories name) keeps
    the case, and its embedding of a capitalised prompt differs from ours."""
    from transformers import GemmaTokenizer

    folder = siglip2_fixed(tmp_path_factory)
    ref = reference2(folder)
    cased = GemmaTokenizer.from_pretrained(folder)
    text = ["This Is A Photo Of 2 CATS."]
    ids = cased(text, padding="max_length", max_length=64, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        uncased = torch.nn.functional.normalize(ref.model.get_text_features(input_ids=ids).pooler_output, dim=-1).numpy()
    ours = siglip_cli.load(folder, device="cpu", use_cache=False, exact=True).embed_texts(text)
    np.testing.assert_allclose(ours, ref.text_embeds(text), atol=1e-5, rtol=0)
    assert np.abs(ours - uncased).max() > 1e-3


def test_a_cached_siglip2_hub_id_resolves_offline(tmp_path_factory, tmp_path, monkeypatch):
    """The hub cache holds what a SigLIP 2 repository holds (tokenizer.json, no spiece.model):
    resolved offline; without tokenizer.json it is 'not in the local cache'."""
    import importlib

    import huggingface_hub.constants

    from siglip_cli.core.errors import ModelUnavailable
    from siglip_cli.hub import resolve_model

    from .test_checkpoints import _fake_hub_cache

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    importlib.reload(huggingface_hub.constants)  # the hub reads HF_HUB_CACHE at import
    try:
        snapshot = _fake_hub_cache(tmp_path / "hub", "someone/tiny-siglip2", siglip2_naflex(tmp_path_factory))
        resolved = resolve_model("someone/tiny-siglip2", offline=True)
        assert resolved.folder == snapshot and not (snapshot / "spiece.model").exists()
        (snapshot / "tokenizer.json").unlink()
        with pytest.raises(ModelUnavailable, match="not in the local Hugging Face cache"):
            resolve_model("someone/tiny-siglip2", offline=True)
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,bound", [("fp32", 1e-4), ("fp16", 0.02), ("bf16", 0.25)])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cuda_naflex_logits_match_the_fp32_reference(tmp_path_factory, dtype, bound, attn):
    """NaFlex on CUDA: masks, position resize on the device, pinned patch buffers."""
    folder = siglip2_naflex(tmp_path_factory)
    ref = reference2(folder)
    images = naflex_images()
    model = siglip_cli.load(folder, device="cuda", dtype=dtype, attn=attn, use_cache=False)
    ours = model.logits(model.embed_images(images, batch_size=2), model.embed_texts(TEXTS))
    np.testing.assert_allclose(ours, ref.logits(images, TEXTS), atol=bound, rtol=0)
