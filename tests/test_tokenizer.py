"""Token ids identical to transformers' SiglipTokenizer (padding="max_length", truncation)."""

from __future__ import annotations

from pathlib import Path

import pytest

from siglip_cli.core.sentencepiece_tokenizer import SentencePieceTokenizer, canonicalize

TRICKY = [
    "", " ", "   ", "\t\n", "▁", "▁▁a", "a▁b", "a", "A", "This is a photo of 2 cats.", "this is a photo of 2 cats",
    "!!!", "...", "?!", "'", "\"quoted\"", "(parenthesised)", "e.g. this, that; other: more", "don't", "it's 50% off!",
    "C++ & C#", "$100", "#hashtag @user", "a,b,c", "path/to/file.jpg", "https://example.com/cat.png",
    "UPPER lower MiXeD", "The Quick Brown Fox", "  leading and trailing  ", "lots    of     space", "tab\tand\nnewline",
    "Zürich", "ZÜRICH", "café naïve résumé", "straße", "İstanbul", "ΑΒΓ δ", "мир", "日本語のテキスト", "中文",
    "emoji 🐱 cats 😀", "😀😀😀", "🇨🇭 flag", "e\u0301 combining accent", "ﬁ ligature", "１２３ full-width", "\u00a0nbsp",
    "zero\u200bwidth", "1 2 3 10 42 100 2024", "the the the the", "hello</s>", "</s>", "<unk>", "hi</s>there",
    " </s> x", "x <unk> y", "</s></s>", "<unk></s>", "a</s>b</s>c", "<s>", "</S>", "<UNK>", "<pad>",
    "this is a photo of a dog.</s>", "a photo of " + "a very " * 40 + "long text", "word " * 63, "word " * 64,
    "z" * 200, "x" * 61 + "</s>" * 5, "a" * 62 + " </s>",
]


FIXTURE_VOCAB = Path(__file__).parent / "data" / "test_sentencepiece_no_bos.model"


@pytest.fixture(scope="module", params=["trained-here", "transformers-fixture"])
def tokenizers(request, spiece_model):
    from transformers import SiglipTokenizer

    vocab = spiece_model if request.param == "trained-here" else FIXTURE_VOCAB
    return SiglipTokenizer(vocab_file=str(vocab)), SentencePieceTokenizer(vocab, max_length=64)


def test_at_least_fifty_tricky_strings():
    assert len(set(TRICKY)) >= 50


@pytest.mark.parametrize("text", TRICKY)
def test_ids_identical_to_reference(tokenizers, text):
    reference, ours = tokenizers
    expected = reference(text, padding="max_length", max_length=64, truncation=True)["input_ids"]
    assert ours([text])[0] == expected


def test_batch_is_padded_to_the_fixed_length_with_the_pad_token(tokenizers):
    _, ours = tokenizers
    batch = ours(["a cat", "a dog on a pink blanket"])
    assert [len(ids) for ids in batch] == [64, 64]
    assert batch[0][-1] == ours.pad_id == 1 and ours.eos_id == 1
    assert ours.unk_id == 2


def test_truncation_keeps_eos_last(tokenizers):
    _, ours = tokenizers
    ids = ours(["word " * 200])[0]
    assert len(ids) == 64 and ids[-1] == ours.eos_id


def test_shorter_model_length(spiece_model):
    """so400m-patch14-224 reads 16 tokens: pad and truncate to the model's length."""
    from transformers import SiglipTokenizer

    reference = SiglipTokenizer(vocab_file=str(spiece_model), model_max_length=16)
    ours = SentencePieceTokenizer(spiece_model, max_length=16)
    for text in ["a cat", "word " * 30]:
        assert ours([text])[0] == reference(text, padding="max_length", max_length=16, truncation=True)["input_ids"]


def test_canonicalize_matches_big_vision_rules():
    assert canonicalize("  Hello,   World!  ") == "hello world"
    assert canonicalize("Ünïcode—dash") == "ünïcode—dash"  # only ASCII punctuation goes


def test_from_folder_reads_tokenizer_config(tiny_checkpoint, tmp_path):
    import json
    import shutil

    tokenizer = SentencePieceTokenizer.from_folder(tiny_checkpoint, 64)
    assert tokenizer.eos_id == 1 and tokenizer.pad_id == 1 and tokenizer.lower_case
    folder = tmp_path / "cased"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["do_lower_case"] = False
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    cased = SentencePieceTokenizer.from_folder(folder, 64)
    assert not cased.lower_case and cased(["The Cat"]) != tokenizer(["The Cat"])
    config["additional_special_tokens"] = ["<extra>"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    from siglip_cli.core.errors import ModelUnavailable

    with pytest.raises(ModelUnavailable, match="additional_special_tokens"):
        SentencePieceTokenizer.from_folder(folder, 64)


def test_missing_spiece_model_names_the_folder(tmp_path):
    from siglip_cli.core.errors import ModelUnavailable

    with pytest.raises(ModelUnavailable, match="no spiece.model"):
        SentencePieceTokenizer.from_folder(tmp_path, 64)
