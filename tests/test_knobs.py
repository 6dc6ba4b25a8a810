"""Every knob takes effect: a dtype that silently stays fp32, a backend that silently stays
sdpa, or a set_attention() that does nothing each fail a test here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import siglip_cli
from siglip_cli.core import attention

from .conftest import random_image

TEXTS = ["This is a photo of 2 cats.", "an airplane over the mountains"]


@pytest.mark.parametrize("dtype,torch_dtype", [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_the_weights_are_in_the_asked_dtype(tiny_checkpoint, dtype, torch_dtype):
    model = siglip_cli.load(tiny_checkpoint, device="cpu", dtype=dtype, use_cache=False)
    model.embed_texts(TEXTS)
    model.embed_images([random_image(1, (40, 40))])
    for tower in (model.text_model, model.vision_model):
        assert {p.dtype for p in tower.parameters()} == {torch_dtype}


def test_bf16_really_computes_in_bf16(tiny_checkpoint):
    """bf16 results differ from fp32 (so the computation did run in bf16) but stay close."""
    images = [random_image(i, (40, 40)) for i in range(3)]
    full = siglip_cli.load(tiny_checkpoint, device="cpu", dtype="fp32", use_cache=False)
    half = siglip_cli.load(tiny_checkpoint, device="cpu", dtype="bf16", use_cache=False)
    for embed in (lambda m: m.embed_images(images), lambda m: m.embed_texts(TEXTS)):
        a, b = embed(full), embed(half)
        assert np.abs(a - b).max() > 1e-4  # not fp32 in disguise
        assert (np.sum(a * b, axis=1) > 0.98).all()  # and still the same embeddings


def _spy(monkeypatch, name: str) -> list:
    """Replace backend `name` in the registry by a wrapper that counts its calls."""
    calls = []
    real = attention._REGISTRY[name]

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setitem(attention._REGISTRY, name, counted)
    return calls


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_the_asked_backend_is_the_one_that_runs(tiny_checkpoint, monkeypatch, backend):
    other = "sdpa" if backend == "eager" else "eager"
    asked, not_asked = _spy(monkeypatch, backend), _spy(monkeypatch, other)
    model = siglip_cli.load(tiny_checkpoint, device="cpu", attn=backend, use_cache=False)
    model.embed_images([random_image(1, (40, 40))])
    model.embed_texts(TEXTS)
    layers = 2 + 1 + 2  # vision layers, the pooling head, text layers (tiny checkpoint)
    assert len(asked) == layers and not not_asked


def test_set_attention_switches_every_layer(tiny_checkpoint, monkeypatch):
    eager, sdpa = _spy(monkeypatch, "eager"), _spy(monkeypatch, "sdpa")
    model = siglip_cli.load(tiny_checkpoint, device="cpu", attn="eager", use_cache=False)
    image = [random_image(1, (40, 40))]
    model.embed_images(image)
    before = len(eager)
    assert before == 3 and not sdpa
    model.set_attention("sdpa")
    model.embed_images(image)
    model.embed_texts(TEXTS)  # a tower loaded after the switch uses the new backend too
    assert len(eager) == before and len(sdpa) == 3 + 2
