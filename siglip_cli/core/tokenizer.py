"""Text tokenizers: one interface, one implementation per family, chosen from the checkpoint.

Families (one file each in core/):
- `sentencepiece` (sentencepiece_tokenizer.py): SigLIP's `spiece.model`, English and
  multilingual, as transformers' `SiglipTokenizer`;
- `gemma` (gemma_tokenizer.py): SigLIP 2's Gemma `tokenizer.json`, lower-cased, as
  transformers' `Siglip2Tokenizer`.

Every family turns a text into ids, appends the end-of-text token, truncates to the model's
length keeping that token last, and right-pads with its pad token: the text tower reads the
LAST position of the padded sequence. `tokenize` also says how long each text was before
truncation, so that callers can tell the user which texts were cut.

The family comes from `tokenizer_config.json`'s `tokenizer_class` when the checkpoint has one
(SigLIP 1 repositories now ship a `tokenizer.json` too, so files alone do not decide), else
from `config.json`'s model_type and the files present.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import ModelUnavailable


@dataclass(frozen=True)
class Tokens:
    ids: list[list[int]]  # one row per text, each exactly max_length ids
    lengths: list[int]  # each text's length in tokens (end-of-text included) before truncation

    def truncated(self, texts: Sequence[str], max_length: int) -> dict[str, int]:
        """{text: its untruncated length} for the texts that did not fit."""
        return {text: n for text, n in zip(texts, self.lengths) if n > max_length}


class TextTokenizer:
    """The interface. A family sets the class attributes and implements `token_ids`."""

    family = ""
    files: tuple[str, ...] = ()  # files the family reads from a checkpoint folder
    tokenizer_classes: tuple[str, ...] = ()  # `tokenizer_class` values that select it
    # SigLIP's sentencepiece tokenizer does not append eos to a text that already ends with it
    # (its "sticky" eos); Gemma's template appends it always.
    eos_unless_last = False

    max_length: int
    eos_id: int
    pad_id: int

    @classmethod
    def from_folder(cls, folder: Path, max_length: int) -> "TextTokenizer":
        """The family's tokenizer from a checkpoint folder; a missing file is one line naming it."""
        for name in cls.files:
            if not (folder / name).is_file():
                raise ModelUnavailable(missing_tokenizer_file(folder, cls, name))
        return cls.from_settings(folder, max_length, tokenizer_settings(folder))

    @classmethod
    def from_settings(cls, folder: Path, max_length: int, settings: dict) -> "TextTokenizer":
        """`settings`: the folder's tokenizer_config.json ({} if none); the files are there."""
        raise NotImplementedError

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids without end-of-text token, truncation or padding."""
        raise NotImplementedError

    def largest_id(self) -> int:
        """The largest id this tokenizer can produce (its vocabulary, added tokens included)."""
        raise NotImplementedError

    def source_file(self, folder: Path) -> Path:
        """The file the vocabulary came from, for messages."""
        return folder / self.files[0]

    def tokenize(self, texts: Sequence[str]) -> Tokens:
        rows, lengths = [], []
        for ids in self.token_ids(texts):
            ends_with_eos = bool(ids) and ids[-1] == self.eos_id
            lengths.append(len(ids) + (0 if self.eos_unless_last and ends_with_eos else 1))
            ids = ids[: self.max_length - 1]
            if not (self.eos_unless_last and ids and ids[-1] == self.eos_id):
                ids = ids + [self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return Tokens(rows, lengths)

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids for each text, truncated to `max_length` (end-of-text kept last) and padded to it."""
        return self.tokenize(texts).ids


def families() -> dict[str, type[TextTokenizer]]:
    """Every tokenizer family, by name. A new family is one file in core/ and one line here."""
    from .gemma_tokenizer import GemmaTokenizer
    from .sentencepiece_tokenizer import SentencePieceTokenizer

    return {cls.family: cls for cls in (SentencePieceTokenizer, GemmaTokenizer)}


def special_token(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or a serialised AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_settings(folder: Path) -> dict:
    from .config import read_json_object

    path = folder / "tokenizer_config.json"
    return read_json_object(path) if path.is_file() else {}


def tokenizer_family(folder: Path, model_type: str) -> type[TextTokenizer]:
    """The family a checkpoint folder's tokenizer belongs to; its files may still be missing."""
    known = families()
    name = tokenizer_settings(folder).get("tokenizer_class")
    if name is not None:
        plain = str(name).removesuffix("Fast")
        for family in known.values():
            if plain in family.tokenizer_classes:
                return family
        supported = ", ".join(c for family in known.values() for c in family.tokenizer_classes)
        raise ModelUnavailable(
            f"{folder / 'tokenizer_config.json'}: tokenizer_class {name!r:.60} is not supported (supported: {supported})"
        )
    if model_type == "siglip2":
        return known["gemma"]
    if not (folder / "spiece.model").is_file() and (folder / "tokenizer.json").is_file():
        return known["gemma"]
    return known["sentencepiece"]


def load_tokenizer(folder: Path, model_type: str, max_length: int, vocab_size: int | None = None) -> TextTokenizer:
    """The checkpoint's tokenizer. With `vocab_size` (the rows of the text tower's embedding
    table), a tokenizer that can produce an id past the table is refused here, in one line,
    instead of an IndexError deep in the text tower when such a piece first turns up."""
    tokenizer = tokenizer_family(folder, model_type).from_folder(folder, max_length)
    if vocab_size is not None:
        largest = tokenizer.largest_id()
        if largest >= vocab_size:
            raise ModelUnavailable(
                f"{tokenizer.source_file(folder)}: the tokenizer has ids up to {largest}, but the model's text "
                f"embedding table has {vocab_size} rows (config.json text_config.vocab_size); the tokenizer "
                "does not belong to this checkpoint"
            )
    return tokenizer


def missing_tokenizer_file(folder: Path, family: type[TextTokenizer], name: str) -> str:
    return (
        f"{folder}: no {name} (the {family.family} tokenizer this checkpoint needs); "
        "copy it from the model's hub repository into the folder"
    )
