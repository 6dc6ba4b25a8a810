"""What a newcomer reads (issue 18): messages without doubled parentheses, --verbose naming the
NaFlex patch budget, and one rule for the files a local checkpoint folder needs."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from siglip_cli.cli.app import app

from .siglip2_fixtures import siglip2_naflex


def _invoke(*args, env: dict | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


@pytest.fixture()
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGLIP_CACHE_DIR", str(tmp_path / "cache"))


def test_verbose_has_no_parentheses_inside_parentheses(cache_env, tiny_checkpoint, image_dir):
    result = _invoke("classify", image_dir / "a.jpg", "--labels", "a,b", "--model", tiny_checkpoint, "--device", "cpu",
                     "--json", "--verbose")
    assert result.exit_code == 0, result.stderr
    line = next(line for line in result.stderr.splitlines() if "dtype" in line)
    depth = 0
    for char in line:
        depth += {"(": 1, ")": -1}.get(char, 0)
        assert depth <= 1, line
    assert "patch budget" not in line  # a fixed-resolution model has none


def test_verbose_names_the_naflex_patch_budget(cache_env, tmp_path_factory, image_dir):
    naflex = siglip2_naflex(tmp_path_factory)
    args = ["classify", image_dir / "a.jpg", "--labels", "a,b", "--model", naflex, "--device", "cpu", "--json", "--verbose"]
    line = next(line for line in _invoke(*args).stderr.splitlines() if "dtype" in line)
    assert "patch budget 24 (the checkpoint's max_num_patches)" in line
    line = next(line for line in _invoke(*args, "--max-patches", "12").stderr.splitlines() if "dtype" in line)
    assert "patch budget 12 (--max-patches)" in line


def test_embed_summary_has_one_pair_of_parentheses(tiny_checkpoint, image_dir, tmp_path):
    out = tmp_path / "vecs.npy"
    first = _invoke("embed", image_dir, "--out", out, "--model", tiny_checkpoint, "--device", "cpu")
    assert first.exit_code == 0, first.stderr
    again = _invoke("embed", image_dir, "--out", out, "--model", tiny_checkpoint, "--device", "cpu", "--update=mtime")
    assert again.exit_code == 0, again.stderr
    line = next(line for line in again.stderr.splitlines() if line.startswith("siglip: wrote"))
    assert "5 kept from before" in line and ") (" not in line, line


def test_a_folder_without_preprocessor_config_is_refused_by_name(cache_env, tiny_checkpoint, image_dir, tmp_path):
    """The message, the README and the behaviour agree: preprocessor_config.json is required (it
    holds the resize filter, which differs between SigLIP and SigLIP 2 and cannot be guessed)."""
    folder = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "preprocessor_config.json").unlink()
    result = _invoke("classify", image_dir / "a.jpg", "--labels", "a,b", "--model", folder)
    assert result.exit_code == 3 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"siglip: error: {folder}: missing preprocessor_config.json (this checkpoint needs "
                                      "config.json, model.safetensors, spiece.model, preprocessor_config.json); "
                                      "copy them from the model's hub repository")


def test_the_not_cached_message_lists_every_file_a_folder_needs(cache_env, image_dir, tmp_path):
    result = _invoke("classify", image_dir / "a.jpg", "--labels", "a,b", "--model", "nobody/no-such-model", "--offline",
                     env={"HF_HOME": str(tmp_path / "hf")})
    assert result.exit_code == 3
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "spiece.model", "tokenizer.json"):
        assert name in result.stderr
