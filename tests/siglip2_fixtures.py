"""Builders for SigLIP 2 and multilingual SigLIP test checkpoints, in the official Hugging Face
layout, written by transformers itself with random weights; and transformers' own objects for
them (the reference numbers).

- A Gemma-style tokenizer: a small sentencepiece BPE model with byte fallback and Gemma's
  special ids (pad 0, eos 1, bos 2, unk 3, mask 4), trained here; `tokenizer.json` made from it
  by transformers' `GemmaTokenizer.from_pretrained` on a folder holding the `.model` file (the
  route that converts it: `GemmaTokenizer(vocab_file=...)` silently ignores the file and keeps
  only the five special tokens). Its `save_pretrained` writes neither `special_tokens_map.json`
  nor `add_eos_token`, which the official repositories carry, so those are written here as the
  official files have them.
- Fixed-resolution SigLIP 2: `SiglipModel` (model_type siglip), Gemma tokenizer, bilinear
  `SiglipImageProcessorPil`.
- NaFlex: `Siglip2Model` (model_type siglip2), Gemma tokenizer, `Siglip2ImageProcessorPil`.
- Multilingual SigLIP 1: a unigram `spiece.model` trained on many scripts, `SiglipTokenizer`.

Builders are memoised per test session (keyed by name), so test modules share checkpoints.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np

from .conftest import CORPUS, build_checkpoint

GEMMA_IDS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}

MULTILINGUAL = """\
Ceci est une photo de deux chats.
Das ist ein Foto von zwei Hunden im Schnee.
Esto es una foto de un avión sobre las montañas.
Это фотография кошки на розовом одеяле.
这是一张两只猫的照片。
これは二匹の猫の写真です。
이것은 고양이 두 마리의 사진입니다.
هذه صورة لقطتين على بطانية وردية.
यह दो बिल्लियों की तस्वीर है।
Αυτή είναι μια φωτογραφία δύο γατών.
""".splitlines()

_built: dict[str, Path] = {}


def _memo(name: str, tmp_path_factory, build) -> Path:
    if name not in _built:
        _built[name] = build(tmp_path_factory.mktemp(name))
    return _built[name]


def _train_sentencepiece(**options) -> bytes:
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(model_writer=buffer, character_coverage=1.0, hard_vocab_limit=False,
                                   minloglevel=2, **options)
    return buffer.getvalue()


# ------------------------------------------------------------------------------ tokenizers
def gemma_tokenizer(tmp_path_factory) -> Path:
    """A folder with tokenizer.model, tokenizer.json, tokenizer_config.json and
    special_tokens_map.json as a SigLIP 2 repository has them."""

    def build(folder: Path) -> Path:
        from transformers import GemmaTokenizer

        model = _train_sentencepiece(
            sentence_iterator=iter((CORPUS + MULTILINGUAL) * 30), vocab_size=700, model_type="bpe",
            pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
            unk_piece="<unk>", control_symbols=["<mask>"], byte_fallback=True, add_dummy_prefix=False,
            remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
            normalization_rule_name="identity",
        )
        source = folder / "spm"
        source.mkdir()
        (source / "tokenizer.model").write_bytes(model)
        # As transformers' convert_siglip2_to_hf.py builds it from google/gemma-7b.
        tokenizer = GemmaTokenizer.from_pretrained(
            source, add_bos_token=False, add_eos_token=True, padding_side="right", do_lower_case=True,
            model_input_names=["input_ids"],
        )
        out = folder / "tokenizer"
        tokenizer.save_pretrained(out)
        shutil.copy(source / "tokenizer.model", out / "tokenizer.model")
        config = {
            "add_bos_token": False, "add_eos_token": True, "bos_token": "<bos>", "clean_up_tokenization_spaces": False,
            "do_lower_case": True, "eos_token": "<eos>", "mask_token": "<mask>", "model_input_names": ["input_ids"],
            "model_max_length": 1000000000000000019884624838656, "pad_token": "<pad>", "padding_side": "right",
            "processor_class": "SiglipProcessor", "tokenizer_class": "GemmaTokenizer", "unk_token": "<unk>",
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")}
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
        return out

    return _memo("gemma-tokenizer", tmp_path_factory, build)


def multilingual_spiece(tmp_path_factory) -> Path:
    """A unigram sentencepiece model over many scripts with SigLIP's ids (pad 0, eos 1, unk 2)."""

    def build(folder: Path) -> Path:
        path = folder / "spiece.model"
        path.write_bytes(_train_sentencepiece(
            sentence_iterator=iter((CORPUS + MULTILINGUAL) * 30), vocab_size=700, model_type="unigram",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        ))
        return path

    return _memo("multilingual-spiece", tmp_path_factory, build)


# ------------------------------------------------------------------------------ checkpoints
TINY_TOWER = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}


def _spread(model, seed: int, logit_scale: float = 2.3, logit_bias: float = -1.5) -> None:
    """Random init leaves some tensors at zero or one; spread them so every weight matters."""
    import torch

    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "position_embedding" in name:
                param.add_(torch.randn_like(param) * 0.1)
        model.logit_scale.fill_(logit_scale)
        model.logit_bias.fill_(logit_bias)


def _official_config(folder: Path, architecture: str, model_type: str, defaults: dict) -> None:
    """Drop the keys the released config.json files omit (library defaults), as conftest does."""
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    out = {"architectures": [architecture], "model_type": model_type, "initializer_factor": 1.0}
    for section in ("text_config", "vision_config"):
        out[section] = {k: v for k, v in raw[section].items() if k in defaults[section] and defaults[section][k] != v}
    if raw["text_config"].get("projection_size") not in (None, raw["text_config"]["hidden_size"]):
        out["text_config"]["projection_size"] = raw["text_config"]["projection_size"]
    path.write_text(json.dumps(out, indent=2))


_TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                      layer_norm_eps=1e-6)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
FIXED_DEFAULTS = {"text_config": _TEXT_DEFAULTS, "vision_config": {**_VISION_DEFAULTS, "image_size": 224}}
NAFLEX_DEFAULTS = {"text_config": _TEXT_DEFAULTS, "vision_config": {**_VISION_DEFAULTS, "num_patches": 256}}


def _copy_tokenizer(tokenizer: Path, folder: Path) -> None:
    for item in tokenizer.iterdir():
        shutil.copy(item, folder / item.name)


def _save(model, folder: Path, model_type: str, processor, tokenizer: Path, seed: int) -> Path:
    """Spread the weights, then write model, official config.json, processor and tokenizer."""
    _spread(model, seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    defaults = NAFLEX_DEFAULTS if model_type == "siglip2" else FIXED_DEFAULTS
    _official_config(folder, type(model).__name__, model_type, defaults)
    processor.save_pretrained(folder)
    _copy_tokenizer(tokenizer, folder)
    return folder


def build_siglip2_fixed(folder: Path, tokenizer: Path, text: dict | None = None, vision: dict | None = None,
                        seed: int = 0) -> Path:
    """Fixed-resolution SigLIP 2: SiglipModel, the Gemma tokenizer, bilinear preprocessing."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    text = {"vocab_size": 700, **TINY_TOWER, **(text or {})}
    vision = {**TINY_TOWER, "image_size": 32, "patch_size": 8, **(vision or {})}
    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    size = vision["image_size"]
    processor = SiglipImageProcessorPil(size={"height": size, "width": size}, resample=2)
    return _save(model, folder, "siglip", processor, tokenizer, seed)


def build_siglip2_naflex(folder: Path, tokenizer: Path, text: dict | None = None, vision: dict | None = None,
                         max_num_patches: int = 24, seed: int = 0) -> Path:
    """SigLIP 2 NaFlex: Siglip2Model (a 4x4 position table unless `vision` says otherwise), the
    Gemma tokenizer, Siglip2ImageProcessorPil with a small patch budget."""
    import torch
    from transformers import Siglip2Config, Siglip2ImageProcessorPil, Siglip2Model

    text = {"vocab_size": 700, **TINY_TOWER, **(text or {})}
    vision = {**TINY_TOWER, "patch_size": 8, "num_patches": 16, **(vision or {})}
    torch.manual_seed(seed)
    model = Siglip2Model(Siglip2Config(text_config=text, vision_config=vision)).eval()
    processor = Siglip2ImageProcessorPil(patch_size=vision["patch_size"], max_num_patches=max_num_patches)
    return _save(model, folder, "siglip2", processor, tokenizer, seed)


def siglip2_fixed(tmp_path_factory, name: str = "siglip2-fixed", **kwargs) -> Path:
    tokenizer = gemma_tokenizer(tmp_path_factory)
    return _memo(name, tmp_path_factory, lambda folder: build_siglip2_fixed(folder / "ckpt", tokenizer, **kwargs))


def siglip2_naflex(tmp_path_factory, name: str = "siglip2-naflex", **kwargs) -> Path:
    tokenizer = gemma_tokenizer(tmp_path_factory)
    return _memo(name, tmp_path_factory, lambda folder: build_siglip2_naflex(folder / "ckpt", tokenizer, **kwargs))


def multilingual_siglip(tmp_path_factory) -> Path:
    """SigLIP 1 with a multilingual sentencepiece vocabulary (as siglip-base-patch16-256-multilingual)."""
    spiece = multilingual_spiece(tmp_path_factory)
    return _memo("siglip-multilingual", tmp_path_factory,
                 lambda folder: build_checkpoint(folder / "ckpt", spiece, text={"vocab_size": 700}, seed=3))


# ------------------------------------------------------------------------------ the reference
class Reference2:
    """transformers' objects for a SigLIP 2 folder: SiglipModel or Siglip2Model, Siglip2Tokenizer
    (lower-cased, on the folder's tokenizer.json), and the PIL image processor."""

    def __init__(self, folder: Path):
        from transformers import (
            Siglip2ImageProcessorPil,
            Siglip2Model,
            Siglip2Tokenizer,
            SiglipImageProcessorPil,
            SiglipModel,
        )

        self.folder = folder
        self.naflex = json.loads((folder / "config.json").read_text())["model_type"] == "siglip2"
        model_class = Siglip2Model if self.naflex else SiglipModel
        self.model = model_class.from_pretrained(folder, attn_implementation="eager").eval()
        self.tokenizer = Siglip2Tokenizer.from_pretrained(folder)
        processor_class = Siglip2ImageProcessorPil if self.naflex else SiglipImageProcessorPil
        self.processor = processor_class.from_pretrained(folder)

    def ids(self, texts):
        return self.tokenizer(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")["input_ids"]

    def image_inputs(self, images, max_num_patches: int | None = None) -> dict:
        # Siglip2ImageProcessorPil leaves RGBA, L or P images as they are (and then fails on the
        # channel count); SiglipImageProcessorPil's conversion (transparency onto white) is ours.
        kwargs = {"max_num_patches": max_num_patches} if max_num_patches else {}
        return dict(self.processor(images=images, return_tensors="pt", do_convert_rgb=True, **kwargs))

    def text_embeds(self, texts) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.model.get_text_features(input_ids=self.ids(texts)).pooler_output
        return torch.nn.functional.normalize(out, dim=-1).numpy()

    def image_embeds(self, images, max_num_patches: int | None = None) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.model.get_image_features(**self.image_inputs(images, max_num_patches)).pooler_output
        return torch.nn.functional.normalize(out, dim=-1).numpy()

    def logits(self, images, texts, max_num_patches: int | None = None) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.model(input_ids=self.ids(texts), **self.image_inputs(images, max_num_patches))
        return out.logits_per_image.numpy()

    def pipeline(self):
        """transformers' zero-shot pipeline with Siglip2Tokenizer: the model card's recipe with
        the prompts lower-cased, as SigLIP 2 was trained."""
        from transformers import pipeline

        return pipeline("zero-shot-image-classification", model=self.model, tokenizer=self.tokenizer,
                        image_processor=self.processor)


_references: dict[Path, Reference2] = {}


def reference2(folder: Path) -> Reference2:
    if folder not in _references:
        _references[folder] = Reference2(folder)
    return _references[folder]
