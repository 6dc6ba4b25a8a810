"""Hostile checkpoint configurations (hardening items 11, 12 and 22): every bad value in
config.json, preprocessor_config.json or tokenizer_config.json, and every mistyped --model
path, is one line on stderr with exit 3 (model unavailable): never a traceback, never a run
out of memory."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from siglip_cli.cli.app import app

from .siglip2_fixtures import siglip2_naflex


def _set(path: str, *keys_and_value):
    """An edit: set keys[...] = value in the JSON file `path` (a value of DELETE removes it)."""
    *keys, value = keys_and_value

    def edit(folder):
        file = folder / path
        data = json.loads(file.read_text()) if file.exists() else {}
        target = data
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = value
        file.write_text(json.dumps(data))

    return edit


def _write(path: str, content: bytes):
    return lambda folder: (folder / path).write_bytes(content)


# (edit, what the one line must say); applied to the tiny SigLIP checkpoint (32 px, patch 8)
HOSTILE = {
    "text heads 0": (_set("config.json", "text_config", "num_attention_heads", 0), "text_config.num_attention_heads must be at least 1"),
    "vision heads 0": (_set("config.json", "vision_config", "num_attention_heads", 0), "vision_config.num_attention_heads must be at least 1"),
    "patch 0": (_set("config.json", "vision_config", "patch_size", 0), "vision_config.patch_size must be at least 1"),
    "patch over image": (_set("config.json", "vision_config", "patch_size", 64), "patch_size 64 is larger than image_size 32"),
    "hidden a string": (_set("config.json", "vision_config", "hidden_size", "32"), "vision_config.hidden_size must be a whole number, not a string"),
    "layers a boolean": (_set("config.json", "text_config", "num_hidden_layers", True), "must be a whole number, not a boolean"),
    "vocab fractional": (_set("config.json", "text_config", "vocab_size", 300.5), "text_config.vocab_size must be a whole number"),
    "eps negative": (_set("config.json", "text_config", "layer_norm_eps", -1), "text_config.layer_norm_eps must be greater than 0"),
    "eps a string": (_set("config.json", "vision_config", "layer_norm_eps", "tiny"), "must be a finite number, not a string"),
    "activation": (_set("config.json", "text_config", "hidden_act", "swish"), "unsupported text_config.hidden_act 'swish'"),
    "channels 4": (_set("config.json", "vision_config", "num_channels", 4), "num_channels 4 is not supported"),
    "text_config a string": (_set("config.json", "text_config", "big"), "text_config must be a JSON object, not a string"),
    "vision_config a list": (_set("config.json", "vision_config", [1, 2]), "vision_config must be a JSON object, not a list"),
    "heads do not divide": (_set("config.json", "vision_config", "num_attention_heads", 5), "not divisible by num_attention_heads 5"),
    "model_type": (_set("config.json", "model_type", "siglip3"), "model_type 'siglip3' is not 'siglip' or 'siglip2'"),
    "config a list": (_write("config.json", b"[1, 2, 3]"), "expected a JSON object, not a list"),
    "config not UTF-8": (_write("config.json", b'{"model_type": "sig\xfflip"}'), "not UTF-8 text"),
    "config not JSON": (_write("config.json", b'{"model_type": '), "not valid JSON"),
    "config nested deeply": (_write("config.json", b"[" * 200_000), "config.json: JSON nested too deeply"),
    "size 100000": (_set("preprocessor_config.json", "size", {"height": 100000, "width": 100000}), "size 100000x100000 does not match the model's image_size 32"),
    "size 64": (_set("preprocessor_config.json", "size", {"height": 64, "width": 64}), "size 64x64 does not match the model's image_size 32"),
    "size a string": (_set("preprocessor_config.json", "size", "32"), "size must be a whole number, not a string"),
    "size shortest_edge": (_set("preprocessor_config.json", "size", {"shortest_edge": 32}), "size.shortest_edge is not supported"),
    "image_mean a string": (_set("preprocessor_config.json", "image_mean", "0.5"), "image_mean must be a number or a list of 3 numbers"),
    "image_mean 2 values": (_set("preprocessor_config.json", "image_mean", [0.5, 0.5]), "image_mean must be a number or a list of 3 numbers"),
    "image_std 0": (_set("preprocessor_config.json", "image_std", [0.5, 0, 0.5]), "image_std [0.5, 0.0, 0.5] has a 0"),
    "image_std NaN": (_write("preprocessor_config.json", b'{"image_std": NaN}'), "image_std must be a finite number"),
    "resample 9": (_set("preprocessor_config.json", "resample", 9), "resample 9 is not a PIL filter"),
    "rescale a string": (_set("preprocessor_config.json", "rescale_factor", "1/255"), "rescale_factor must be a finite number"),
    "do_resize a string": (_set("preprocessor_config.json", "do_resize", "yes"), "do_resize must be true or false"),
    "preprocessor not UTF-8": (_write("preprocessor_config.json", b"\xff\xfe{}"), "not UTF-8 text"),
    "tokenizer_config a list": (_write("tokenizer_config.json", b"[]"), "tokenizer_config.json: expected a JSON object"),
    "tokenizer class": (_set("tokenizer_config.json", "tokenizer_class", "BertTokenizer"), "tokenizer_class 'BertTokenizer' is not supported"),
}

# applied to the tiny NaFlex checkpoint (patch 8, a 4x4 position table, 24 patches)
HOSTILE_NAFLEX = {
    "budget 100000": (_set("preprocessor_config.json", "max_num_patches", 100000), "max_num_patches 100000 is over the limit of 4096"),
    "budget 0": (_set("preprocessor_config.json", "max_num_patches", 0), "max_num_patches must be at least 1"),
    "patch mismatch": (_set("preprocessor_config.json", "patch_size", 4), "patch_size 4 does not match the model's patch_size 8"),
    "positions not square": (_set("config.json", "vision_config", "num_patches", 15), "num_patches 15 is not a square grid"),
    "no resize": (_set("preprocessor_config.json", "do_resize", False), "do_resize false is not supported for NaFlex"),
}


def _classify(folder, image):
    return CliRunner().invoke(app, ["classify", str(image), "--labels", "a cat", "--model", str(folder), "--no-cache"])


def _assert_one_line_exit_3(result, message):
    assert result.exit_code == 3, (result.exit_code, result.stderr, result.exception)
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("siglip: error: ") and message in result.stderr, result.stderr


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_siglip_configs(tiny_checkpoint, image_dir, tmp_path, name):
    edit, message = HOSTILE[name]
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    edit(folder)
    _assert_one_line_exit_3(_classify(folder, image_dir / "a.jpg"), message)


@pytest.mark.parametrize("name", sorted(HOSTILE_NAFLEX))
def test_hostile_naflex_configs(tmp_path_factory, image_dir, tmp_path, name):
    edit, message = HOSTILE_NAFLEX[name]
    folder = shutil.copytree(siglip2_naflex(tmp_path_factory), tmp_path / "ckpt")
    edit(folder)
    _assert_one_line_exit_3(_classify(folder, image_dir / "a.jpg"), message)


@pytest.mark.parametrize("value", ["../no-such-ck", "./no-such-ck", "~/no-such-ck-siglip", "/no/such/ck", "sub/ck"])
def test_a_mistyped_model_path_is_no_such_folder(image_dir, tmp_path, monkeypatch, value):
    (tmp_path / "work" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")  # "sub" exists here, "sub/ck" does not
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = _classify(value, image_dir / "a.jpg")
    _assert_one_line_exit_3(result, f"{value}: no such folder")
    assert "HFValidationError" not in result.stderr and "Repo id" not in result.stderr
