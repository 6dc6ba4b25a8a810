"""A tokenizer that can produce ids past the text tower's embedding table is refused when it
loads, in one line (issue 17, item 14): it used to be an IndexError traceback when such a
piece first turned up in a label."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from siglip_cli.cli.app import app
from siglip_cli.core.errors import ModelUnavailable
from siglip_cli.core.tokenizer import load_tokenizer

from .siglip2_fixtures import siglip2_fixed


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("siglip: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_a_tokenizer_json_piece_past_the_embedding_table_is_refused_at_load(tmp_path_factory, tmp_path, image_dir, monkeypatch):
    folder = tmp_path / "ckpt"
    shutil.copytree(siglip2_fixed(tmp_path_factory), folder)
    tokenizer_file = folder / "tokenizer.json"
    data = json.loads(tokenizer_file.read_text())
    data["added_tokens"].append({"id": 700, "content": "zzqx", "single_word": False, "lstrip": False, "rstrip": False,
                                 "normalized": False, "special": False})
    tokenizer_file.write_text(json.dumps(data))
    monkeypatch.setenv("SIGLIP_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["classify", str(image_dir / "a.jpg"), "--labels", "zzqx,a dog", "--model", str(folder)])
    assert result.exit_code == 3
    line = _one_error_line(result.stderr)
    assert "tokenizer.json" in line and "ids up to 700" in line and "700 rows" in line
    # a label that never meets the piece is refused all the same: the file is wrong, not the text
    again = CliRunner().invoke(app, ["classify", str(image_dir / "a.jpg"), "--labels", "a cat", "--model", str(folder)])
    assert again.exit_code == 3 and "ids up to 700" in _one_error_line(again.stderr)


def test_sentencepiece_ids_are_checked_too(tiny_checkpoint):
    assert load_tokenizer(tiny_checkpoint, "siglip", 16, vocab_size=300).largest_id() < 300
    with pytest.raises(ModelUnavailable, match=r"spiece.model: the tokenizer has ids up to \d+, but the model's text embedding table has 100 rows"):
        load_tokenizer(tiny_checkpoint, "siglip", 16, vocab_size=100)
