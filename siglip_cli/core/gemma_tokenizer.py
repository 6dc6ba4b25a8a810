"""The `gemma` tokenizer family: SigLIP 2's Gemma tokenizer (`tokenizer.json`), read with the
`tokenizers` library, the engine transformers' own `Siglip2Tokenizer` wraps.

SigLIP 2 was trained on lower-cased text (big_vision: `lower(key="text")|tok(..., bos="no",
eos="sticky")`), so a Lowercase normaliser goes in front of the file's own, exactly as
`Siglip2Tokenizer` does. The released repositories name `GemmaTokenizer`, which does not
lower-case: transformers' pipeline scores fixed-resolution SigLIP 2 on the text as typed,
which is not how the model was trained. Our ids equal `Siglip2Tokenizer`'s on the same file.

No BOS. The end-of-text token (`<eos>`, id 1) is appended and kept last on truncation; texts
are right-padded with `<pad>` (id 0) to the model's length, so a short text's last position,
the one the text tower pools, is a pad token (unlike SigLIP 1, whose pad is its eos). The ids
of both come from the tokenizer (tokenizer_config.json, else special_tokens_map.json, else
Gemma's names), never from config.json, whose implied text `pad_token_id` is 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .config import read_json_object
from .errors import ModelUnavailable
from .tokenizer import TextTokenizer, special_token


class GemmaTokenizer(TextTokenizer):
    family = "gemma"
    files = ("tokenizer.json",)
    tokenizer_classes = ("GemmaTokenizer", "Siglip2Tokenizer")

    def __init__(self, tokenizer_file: Path, max_length: int = 64, eos_token: str = "<eos>", pad_token: str = "<pad>"):
        from tokenizers import Tokenizer, normalizers

        try:
            backend = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise ModelUnavailable(f"{tokenizer_file}: not a readable tokenizers file ({str(exc).splitlines()[0][:120]})") from None
        steps = [normalizers.Lowercase()] + ([backend.normalizer] if backend.normalizer is not None else [])
        backend.normalizer = normalizers.Sequence(steps)
        backend.no_truncation()  # ours keeps eos last whatever the file says
        backend.no_padding()
        self.backend = backend
        self.max_length = max_length
        self.eos_id = self._special_id(eos_token, "eos_token", tokenizer_file)
        self.pad_id = self._special_id(pad_token, "pad_token", tokenizer_file)

    def _special_id(self, token: str, key: str, tokenizer_file: Path) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ModelUnavailable(f"{tokenizer_file}: the {key} {token!r} is not in the vocabulary")
        return token_id

    @classmethod
    def from_settings(cls, folder: Path, max_length: int, settings: dict) -> "GemmaTokenizer":
        config_file = folder / "tokenizer_config.json"
        # SigLIP 2 was trained without BOS and with EOS last; a file that says otherwise would
        # make ids the model never saw, so refuse rather than diverge silently.
        if settings.get("add_bos_token") is True:
            raise ModelUnavailable(f"{config_file}: add_bos_token true is not supported (SigLIP 2 reads no BOS token)")
        if settings.get("add_eos_token") is False:
            raise ModelUnavailable(f"{config_file}: add_eos_token false is not supported (SigLIP 2 needs the EOS token last)")
        return cls(folder / "tokenizer.json", max_length, **special_tokens(folder, settings))

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def largest_id(self) -> int:
        return max(self.backend.get_vocab(with_added_tokens=True).values(), default=-1)


def special_tokens(folder: Path, settings: dict) -> dict[str, str]:
    """eos and pad token names: tokenizer_config.json first, then special_tokens_map.json."""
    names = {}
    map_file = folder / "special_tokens_map.json"
    mapping = read_json_object(map_file) if map_file.is_file() else {}
    for key in ("eos_token", "pad_token"):
        value = special_token(settings.get(key)) or special_token(mapping.get(key))
        if value:
            names[key] = value
    return names
