"""The `sentencepiece` tokenizer family: SigLIP's `spiece.model` (English, and the 250k
multilingual vocabularies) plus the reference's text canonicalisation.

Reproduces transformers' slow `SiglipTokenizer` id for id:
1. the text gets a leading "▁" (any "▁" inside becomes a space);
2. it is split around the special tokens (`</s>`, `<unk>`), which swallow the whitespace on
   both sides, exactly as the reference's added tokens do (lstrip=rstrip=True);
3. every other piece is canonicalised as big_vision does for SigLIP: lower-cased, ASCII
   punctuation deleted, whitespace runs collapsed, stripped;
4. each piece is encoded as "<unk>" + piece and the pieces of "<unk>" are dropped (the
   reference's trick to keep sentencepiece from eating the leading "▁");
5. `</s>` (eos) is appended unless the ids already end with it; texts are truncated to
   `max_length` (keeping eos last) and right-padded with the pad token (`</s>` for SigLIP).

The text tower pools the LAST position, so every text must be padded to the model's fixed
length: an unpadded text gives a different, wrong embedding. Steps 5 (eos, truncation,
padding) are the shared `TextTokenizer.tokenize`.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Sequence

import sentencepiece

from .errors import ModelUnavailable
from .tokenizer import TextTokenizer, special_token

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_WHITESPACE = re.compile(r"\s+")
SPIECE_UNDERLINE = "▁"


def canonicalize(text: str, lower_case: bool = True) -> str:
    """big_vision's `canonicalize_text`: lower-case, drop ASCII punctuation, squeeze spaces."""
    if lower_case:
        text = text.lower()
    text = text.translate(_PUNCTUATION)
    return _WHITESPACE.sub(" ", text).strip()


class SentencePieceTokenizer(TextTokenizer):
    family = "sentencepiece"
    files = ("spiece.model",)
    tokenizer_classes = ("SiglipTokenizer",)
    eos_unless_last = True

    def __init__(
        self,
        model_file: Path,
        max_length: int = 64,
        eos_token: str = "</s>",
        pad_token: str = "</s>",
        unk_token: str = "<unk>",
        lower_case: bool = True,
    ):
        self.processor = sentencepiece.SentencePieceProcessor()
        try:
            self.processor.Load(str(model_file))
        except (OSError, RuntimeError) as exc:
            raise ModelUnavailable(f"{model_file}: not a readable sentencepiece model ({exc})") from None
        self.max_length = max_length
        self.lower_case = lower_case
        self.special_tokens = [t for t in dict.fromkeys((eos_token, unk_token, pad_token)) if t]
        self.eos_token = eos_token
        self.eos_id = self._special_id(eos_token, model_file)
        self.pad_id = self._special_id(pad_token, model_file)
        self.unk_id = self.processor.unk_id()
        self._unk_token = unk_token
        self._unk_piece_count = len(self.processor.encode(unk_token))
        # Longest first, so that a token that contains another still wins (like a trie).
        alternatives = "|".join(re.escape(t) for t in sorted(self.special_tokens, key=len, reverse=True))
        self._special_split = re.compile(f"({alternatives})")

    @classmethod
    def from_settings(cls, folder: Path, max_length: int, settings: dict) -> "SentencePieceTokenizer":
        config_file = folder / "tokenizer_config.json"
        kwargs = {}
        for key in ("eos_token", "pad_token", "unk_token"):
            value = special_token(settings.get(key))
            if value:
                kwargs[key] = value
        if "do_lower_case" in settings:
            kwargs["lower_case"] = bool(settings["do_lower_case"])
        # Settings the released SigLIP tokenizers never use; refuse rather than diverge silently.
        if settings.get("additional_special_tokens"):
            raise ModelUnavailable(f"{config_file}: additional_special_tokens are not supported")
        if settings.get("legacy") is False:
            raise ModelUnavailable(f"{config_file}: legacy=false sentencepiece handling is not supported")
        return cls(folder / "spiece.model", max_length=max_length, **kwargs)

    def _special_id(self, token: str, model_file: Path) -> int:
        token_id = self.processor.piece_to_id(token)
        if self.processor.id_to_piece(token_id) != token:
            raise ModelUnavailable(f"{model_file}: special token {token!r} is not in the vocabulary")
        return token_id

    def _pieces_plain(self, text: str) -> list[str]:
        text = canonicalize(text, self.lower_case)
        pieces = self.processor.encode(self._unk_token + text, out_type=str)
        return pieces[self._unk_piece_count :] if len(pieces) >= self._unk_piece_count else pieces

    def _split_special(self, text: str) -> list[str]:
        parts = self._special_split.split(text)
        for i, part in enumerate(parts):
            if part in self.special_tokens:
                if i > 0:
                    parts[i - 1] = parts[i - 1].rstrip()
                if i + 1 < len(parts):
                    parts[i + 1] = parts[i + 1].lstrip()
        return parts

    def pieces(self, text: str) -> list[str]:
        """The reference's `tokenize`: sentencepiece pieces and special tokens, no eos."""
        text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        pieces: list[str] = []
        for part in self._split_special(text):
            if part in self.special_tokens:
                pieces.append(part)
            elif part:
                pieces.extend(self._pieces_plain(part))
        # A bare "▁" directly before a special token at the start is dropped, as the reference does.
        if len(pieces) > 1 and pieces[0] == SPIECE_UNDERLINE and pieces[1] in self.special_tokens:
            pieces = pieces[1:]
        return pieces

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [[self.processor.piece_to_id(piece) for piece in self.pieces(text)] for text in texts]

    def largest_id(self) -> int:
        return self.processor.get_piece_size() - 1
