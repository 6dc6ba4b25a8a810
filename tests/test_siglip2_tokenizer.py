"""The tokenizer families: Gemma ids identical to transformers' Siglip2Tokenizer (lower-cased,
no BOS, EOS kept last, right-padded with 0), the family picked from the checkpoint, and clear
errors for missing or unsupported tokenizer files."""

from __future__ import annotations

import json
import shutil

import pytest

from siglip_cli.core.errors import ModelUnavailable
from siglip_cli.core.gemma_tokenizer import GemmaTokenizer
from siglip_cli.core.sentencepiece_tokenizer import SentencePieceTokenizer
from siglip_cli.core.tokenizer import load_tokenizer, tokenizer_family

from .siglip2_fixtures import gemma_tokenizer, multilingual_siglip, siglip2_fixed

TRICKY = [
    "", " ", "  ", "\t", "\n", "a", "A", "This is a photo of 2 cats.", "THIS IS A PHOTO OF 2 CATS.",
    "this is a photo of 2 cats", "MiXeD CaSe LaBeL", "The Quick Brown Fox", "İstanbul", "ΣΊΣΥΦΟΣ ς",
    "Zürich", "ZÜRICH", "café naïve résumé", "straße STRASSE", "e\u0301 combining accent", "ﬁ ligature",
    "１２３ full-width", "\u00a0nbsp", "zero\u200bwidth", "日本語のテキスト", "中文和English", "한국어 문장",
    "это фотография", "هذه صورة", "यह तस्वीर", "emoji 🐱 cats 😀", "😀😀😀", "🇨🇭 flag", "👩‍👩‍👧 family",
    "!!!", "...", "?!", "'", "\"quoted\"", "(parenthesised)", "e.g. this, that; other: more", "don't", "50% off!",
    "C++ & C#", "$100", "#hashtag @user", "path/to/file.jpg", "https://example.com/cat.png",
    "  leading and trailing  ", "lots    of     space", "tab\tand\nnewline", "\r\n", "▁", "a▁b",
    "1 2 3 10 42 100 2024", "<eos>", "<pad>", "<bos>", "<unk>", "<mask>", "<EOS>", "hi<eos>there", "x <pad> y",
    "\x00 control \x07", "\ufffd replacement", "a photo of " + "a very " * 40 + "long text", "word " * 62,
    "word " * 63, "word " * 64, "z" * 200, "日本" * 80, "🐱" * 70,
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import Siglip2Tokenizer

    folder = gemma_tokenizer(tmp_path_factory)
    return Siglip2Tokenizer.from_pretrained(folder), load_tokenizer(folder, "siglip", 64)


def test_at_least_fifty_tricky_strings():
    assert len(set(TRICKY)) >= 50


@pytest.mark.parametrize("text", TRICKY)
def test_ids_identical_to_siglip2_tokenizer(tokenizers, text):
    reference, ours = tokenizers
    assert ours([text])[0] == reference(text, padding="max_length", max_length=64, truncation=True)["input_ids"]


def test_gemma_layout(tokenizers):
    """No BOS; EOS (1) after the text; pad (0) after that, so a short text's last position is a
    pad, unlike SigLIP 1; lower-cased: the case of a label changes nothing."""
    _, ours = tokenizers
    assert isinstance(ours, GemmaTokenizer) and (ours.pad_id, ours.eos_id) == (0, 1)
    ids = ours(["a cat"])[0]
    end = ids.index(1)
    assert len(ids) == 64 and 2 not in ids[:end] and set(ids[end + 1:]) == {0} and ids[-1] == 0
    assert ours(["A CAT"]) == ours(["a cat"])


def test_truncation_keeps_eos_last_and_reports_lengths(tokenizers):
    _, ours = tokenizers
    texts = ["word " * 200, "a cat", "x" * 62]
    tokens = ours.tokenize(texts)
    assert all(len(row) == 64 for row in tokens.ids)
    assert tokens.ids[0][-1] == 1 and tokens.ids[0].count(1) == 1
    assert tokens.lengths[0] > 64 and tokens.lengths[1] < 64
    assert tokens.truncated(texts, 64) == {texts[0]: tokens.lengths[0]}


def test_the_family_follows_tokenizer_config(tmp_path_factory, tiny_checkpoint, tmp_path):
    assert tokenizer_family(tiny_checkpoint, "siglip") is SentencePieceTokenizer
    assert tokenizer_family(siglip2_fixed(tmp_path_factory), "siglip") is GemmaTokenizer
    assert tokenizer_family(multilingual_siglip(tmp_path_factory), "siglip") is SentencePieceTokenizer
    # A SigLIP 1 repository that also ships a tokenizer.json still reads spiece.model.
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "both")
    shutil.copy(gemma_tokenizer(tmp_path_factory) / "tokenizer.json", folder / "tokenizer.json")
    assert isinstance(load_tokenizer(folder, "siglip", 64), SentencePieceTokenizer)
    # Without tokenizer_config.json: NaFlex is Gemma; otherwise the file that is there.
    (folder / "tokenizer_config.json").unlink()
    assert tokenizer_family(folder, "siglip2") is GemmaTokenizer
    assert tokenizer_family(folder, "siglip") is SentencePieceTokenizer
    (folder / "spiece.model").unlink()
    assert tokenizer_family(folder, "siglip") is GemmaTokenizer


def _gemma_copy(tmp_path_factory, tmp_path):
    return shutil.copytree(gemma_tokenizer(tmp_path_factory), tmp_path / "tok")


def test_missing_tokenizer_json_is_one_line_naming_it(tmp_path_factory, tmp_path):
    folder = _gemma_copy(tmp_path_factory, tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelUnavailable, match=r"no tokenizer.json \(the gemma tokenizer this checkpoint needs\); copy it"):
        load_tokenizer(folder, "siglip", 64)


@pytest.mark.parametrize("change,message", [
    ({"tokenizer_class": "BertTokenizer"}, "tokenizer_class 'BertTokenizer' is not supported"),
    ({"add_bos_token": True}, "add_bos_token true is not supported"),
    ({"add_eos_token": False}, "add_eos_token false is not supported"),
    ({"eos_token": "<end>"}, "the eos_token '<end>' is not in the vocabulary"),
])
def test_unsupported_settings_are_refused(tmp_path_factory, tmp_path, change, message):
    folder = _gemma_copy(tmp_path_factory, tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelUnavailable, match=message):
        load_tokenizer(folder, "siglip", 64)


def test_special_tokens_fall_back_to_special_tokens_map(tmp_path_factory, tmp_path):
    folder = _gemma_copy(tmp_path_factory, tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["eos_token"], config["pad_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<pad>", "pad_token": "<eos>"}))
    swapped = load_tokenizer(folder, "siglip", 64)
    assert (swapped.eos_id, swapped.pad_id) == (0, 1)


def test_damaged_tokenizer_json(tmp_path_factory, tmp_path):
    folder = _gemma_copy(tmp_path_factory, tmp_path)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(ModelUnavailable, match="not a readable tokenizers file"):
        load_tokenizer(folder, "siglip", 64)


def test_multilingual_sentencepiece_ids_equal_siglip_tokenizer(tmp_path_factory):
    from transformers import SiglipTokenizer

    folder = multilingual_siglip(tmp_path_factory)
    reference = SiglipTokenizer.from_pretrained(folder)
    ours = load_tokenizer(folder, "siglip", 64)
    for text in TRICKY:
        assert ours([text])[0] == reference(text, padding="max_length", max_length=64, truncation=True)["input_ids"], text
