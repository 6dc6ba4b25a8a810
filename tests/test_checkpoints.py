"""Config defaults, the architecture table, key checks, and resolving a model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import siglip_cli
from siglip_cli.core.config import ARCHITECTURES, TextConfig, VisionConfig, architecture, config_from_folder
from siglip_cli.core.errors import BackendUnavailable, ModelUnavailable
from siglip_cli.hub import resolve_model
from siglip_cli.core.weights import checkpoint_keys


def test_official_config_omits_defaults_and_we_fill_them(tiny_checkpoint):
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    assert "layer_norm_eps" not in raw["text_config"] and "hidden_act" not in raw["vision_config"]
    config = config_from_folder(tiny_checkpoint)
    assert config.text.layer_norm_eps == 1e-6 and config.vision.hidden_act == "gelu_pytorch_tanh"
    assert config.text.max_position_embeddings == 64 and config.text_length == 64
    assert config.vision.image_size == 32 and config.preprocess.height == 32 and config.preprocess.resample == 3


def test_empty_sub_configs_mean_base_224(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    config = config_from_folder(tmp_path)
    assert config.text == TextConfig() and config.vision == VisionConfig()
    assert config == architecture("siglip-base-patch16-224")


# Parameter totals computed from the released checkpoints' shapes (see docs/architectures.md).
KNOWN_TOTALS = {
    "google/siglip-base-patch16-224": 203_155_970,
    "google/siglip-base-patch16-512": 203_791_874,
    "google/siglip-base-patch16-256-multilingual": 370_626_050,
    "google/siglip-large-patch16-384": 652_478_466,
    "google/siglip-so400m-patch14-384": 877_960_498,
    "google/siglip-so400m-patch14-224": 877_360_306,
    "google/siglip2-base-patch16-224": 375_187_970,
}


@pytest.mark.parametrize("name,total", sorted(KNOWN_TOTALS.items()))
def test_architecture_table_parameter_counts(name, total):
    keys = checkpoint_keys(ARCHITECTURES[name])
    assert sum(math.prod(shape) for shape in keys.values()) == total


def test_architecture_table_covers_the_released_families():
    names = set(ARCHITECTURES)
    for size in (224, 256, 384, 512):
        assert f"google/siglip-base-patch16-{size}" in names
    assert {"google/siglip-large-patch16-256", "google/siglip-so400m-patch14-384",
            "google/siglip-base-patch16-256-multilingual", "google/siglip2-so400m-patch14-384"} <= names
    assert architecture("siglip-so400m-patch14-384").vision.num_patches == 27 * 27
    assert architecture("siglip2-base-patch16-224").preprocess.resample == 2
    with pytest.raises(ModelUnavailable, match="unknown architecture"):
        architecture("siglip-huge")


def test_wrong_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ModelUnavailable, match="model_type 'clip' is not 'siglip'"):
        config_from_folder(tmp_path)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "spiece.model", "preprocessor_config.json"])
def test_missing_files_are_named(tiny_checkpoint, tmp_path, missing):
    folder = _copy(tiny_checkpoint, tmp_path / "ckpt")
    (folder / missing).unlink()
    with pytest.raises(ModelUnavailable, match=f"missing {missing}"):
        siglip_cli.load(folder)


def test_renamed_and_extra_keys_are_named(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "ckpt")
    state = load_file(folder / "model.safetensors")
    state["vision_model.post_layernorm.gamma"] = state.pop("vision_model.post_layernorm.weight")
    state["text_model.extra.weight"] = torch.zeros(2)
    save_file(state, folder / "model.safetensors")
    model = siglip_cli.load(folder, device="cpu")
    with pytest.raises(ModelUnavailable) as info:
        model.embed_texts(["a cat"])
    message = str(info.value)
    assert "missing keys: vision_model.post_layernorm.weight" in message
    assert "unexpected keys: text_model.extra.weight, vision_model.post_layernorm.gamma" in message


def test_shape_mismatch_is_named(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "ckpt")
    state = load_file(folder / "model.safetensors")
    state["text_model.head.bias"] = torch.zeros(5)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ModelUnavailable, match=r"text_model.head.bias is \[5\], config says \[32\]"):
        siglip_cli.load(folder, device="cpu").embed_texts(["x"])


def test_not_a_safetensors_file(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "ckpt")
    (folder / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    with pytest.raises(ModelUnavailable, match="not a readable safetensors file"):
        siglip_cli.load(folder, device="cpu").embed_texts(["x"])


def test_only_the_needed_tower_is_loaded(tiny_checkpoint):
    model = siglip_cli.load(tiny_checkpoint, device="cpu", use_cache=False)
    model.embed_images([np.zeros((8, 8, 3), np.uint8)])
    assert model._network.text_model is None and model._network.vision_model is not None
    model.embed_texts(["a cat"])
    assert model._network.text_model is not None


# ------------------------------------------------------------------------------- the hub
def _fake_hub_cache(cache: Path, repo: str, source: Path, commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """The Hugging Face cache layout that huggingface_hub itself reads."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_resolves_from_the_cache_offline(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)  # the hub reads HF_HUB_CACHE at import
    try:
        snapshot = _fake_hub_cache(tmp_path / "hub", "someone/tiny-siglip", tiny_checkpoint)
        resolved = resolve_model("someone/tiny-siglip", offline=True)
        assert resolved.folder == snapshot and resolved.revision == snapshot.name
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)


def test_offline_and_not_cached_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelUnavailable) as info:
        resolve_model("google/siglip-base-patch16-224", offline=True)
    message = str(info.value)
    assert "not in the local Hugging Face cache" in message and "--model /path/to/folder" in message


def test_unreachable_hub_says_so(tmp_path, monkeypatch):
    import importlib

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    importlib.reload(huggingface_hub.constants)
    try:
        with pytest.raises(ModelUnavailable, match="cannot be reached|download failed"):
            resolve_model("google/siglip-base-patch16-224", offline=False)
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)


def test_not_a_folder_nor_a_hub_id(tmp_path):
    with pytest.raises(ModelUnavailable, match="no such folder$"):  # an absolute path is never a hub id
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelUnavailable, match="no such folder, and not a Hugging Face hub id"):
        resolve_model("a/b/c")


def test_local_fingerprint_changes_with_the_weights(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path / "ckpt")
    before = resolve_model(str(folder)).revision
    state = load_file(folder / "model.safetensors")
    state["logit_bias"] = state["logit_bias"] + 1
    save_file(state, folder / "model.safetensors")
    assert resolve_model(str(folder)).revision != before


# ------------------------------------------------------------------------ backends, devices
def test_flash_unavailable_on_cpu_says_why(tiny_checkpoint):
    with pytest.raises(BackendUnavailable, match="flash attention needs a CUDA device"):
        siglip_cli.load(tiny_checkpoint, device="cpu", attn="flash")


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the no-CUDA message")
def test_cuda_unavailable_says_why(tiny_checkpoint):
    with pytest.raises(BackendUnavailable, match="CUDA is not available"):
        siglip_cli.load(tiny_checkpoint, device="cuda")


def test_flash_missing_package_message():
    from siglip_cli.core.attention import why_unavailable

    reason = why_unavailable("flash", torch.device("cuda"), torch.float16, (64,))
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        assert reason is not None and "pip install" in reason
    assert "fp16 or bf16" in why_unavailable("flash", torch.device("cuda"), torch.float32, (64,))
    assert "multiple of 8" in why_unavailable("flash", torch.device("cuda"), torch.float16, (36,))
