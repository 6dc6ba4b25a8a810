"""Fixtures: checkpoints in the exact Hugging Face layout, written by transformers itself with
random weights, a sentencepiece model trained here on a few lines of text, and images made
with Pillow. Nothing is downloaded."""

from __future__ import annotations

import http.server

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

CORPUS = """\
This is a photo of 2 cats.
This is a photo of 2 dogs.
a photo of a cat lying on a pink blanket next to two remote controls
The quick brown fox jumps over the lazy dog.
a picture of a laptop with the lockscreen on, a cup of cappucino, salt and pepper grinders
The view through the window reveals lake Zürich and the Alps in the background of the city.
an airplane flying over the mountains at sunset
A red car parked in front of an old building in San Francisco
a bowl of fruit: apples, bananas, oranges and grapes
people walking on the beach with their dogs in the morning
café naïve résumé über straße
emoji 🐱 cats 😀 smile
日本語のテキストと中文
numbers 1 2 3 10 42 100 2024
""".splitlines()


@pytest.fixture(scope="session")
def spiece_model(tmp_path_factory) -> Path:
    """A unigram sentencepiece model with SigLIP's special-token layout (pad 0, eos 1, unk 2)."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 30),
        model_writer=buffer,
        vocab_size=300,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("spm") / "spiece.model"
    path.write_bytes(buffer.getvalue())
    return path


# Keys transformers writes although they equal the defaults; official config.json files omit them.
_TEXT_DEFAULTS = dict(
    vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=64, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0,
    pad_token_id=1, bos_token_id=49406, eos_token_id=49407,
)
_VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
    image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0,
    vision_use_head=True,
)


def strip_to_official(config: dict) -> dict:
    """Drop every key whose value is the library default, as the released config.json files do."""
    out = {"architectures": ["SiglipModel"], "model_type": "siglip", "initializer_factor": 1.0}
    text = {k: v for k, v in config["text_config"].items() if k in _TEXT_DEFAULTS and _TEXT_DEFAULTS[k] != v}
    if config["text_config"].get("projection_size") not in (None, config["text_config"].get("hidden_size", 768)):
        text["projection_size"] = config["text_config"]["projection_size"]
    vision = {k: v for k, v in config["vision_config"].items() if k in _VISION_DEFAULTS and _VISION_DEFAULTS[k] != v}
    out["text_config"], out["vision_config"] = text, vision
    return out


def build_checkpoint(
    folder: Path,
    spiece: Path,
    text: dict | None = None,
    vision: dict | None = None,
    seed: int = 0,
    official_config: bool = True,
    logit_scale: float = 2.3,
    logit_bias: float = -1.5,
) -> Path:
    """Random-weight SiglipModel + SiglipTokenizer + SiglipImageProcessorPil saved by transformers."""
    import shutil

    import torch
    from transformers import SiglipConfig, SiglipModel, SiglipTokenizer

    try:
        from transformers import SiglipImageProcessorPil
    except ImportError:  # older transformers: the slow processor had no suffix
        from transformers import SiglipImageProcessor as SiglipImageProcessorPil

    text = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, **(text or {})}
    vision = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8, **(vision or {})}
    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():
        # Random init leaves some tensors at zero or one; spread them so every weight matters.
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
        model.logit_scale.fill_(logit_scale)
        model.logit_bias.fill_(logit_bias)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    shutil.copy(spiece, folder / "spiece.model")
    # As the converter and the released tokenizer_config.json do: no attention mask (SigLIP
    # never masks its padding), 64 tokens.
    tokenizer = SiglipTokenizer(vocab_file=str(spiece), model_input_names=["input_ids"])
    tokenizer.save_pretrained(folder)
    size = vision["image_size"]
    SiglipImageProcessorPil(size={"height": size, "width": size}).save_pretrained(folder)
    if official_config:
        config_path = folder / "config.json"
        config_path.write_text(json.dumps(strip_to_official(json.loads(config_path.read_text())), indent=2))
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, spiece_model) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", spiece_model)


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory, spiece_model):
    built: dict = {}

    def make(name: str, **kwargs) -> Path:
        if name not in built:
            built[name] = build_checkpoint(tmp_path_factory.mktemp("ckpt") / name, spiece_model, **kwargs)
        return built[name]

    return make


class Reference:
    """transformers' own objects for a checkpoint folder: the numbers we must match."""

    def __init__(self, folder: Path):
        from transformers import SiglipModel, SiglipTokenizer

        try:
            from transformers import SiglipImageProcessorPil
        except ImportError:
            from transformers import SiglipImageProcessor as SiglipImageProcessorPil

        self.folder = folder
        self.model = SiglipModel.from_pretrained(folder, attn_implementation="eager").eval()
        self.tokenizer = SiglipTokenizer.from_pretrained(folder)
        self.processor = SiglipImageProcessorPil.from_pretrained(folder)

    def pipeline(self):
        from transformers import pipeline

        return pipeline(
            "zero-shot-image-classification", model=self.model, tokenizer=self.tokenizer, image_processor=self.processor
        )

    def text_embeds(self, texts):
        import torch

        ids = self.tokenizer(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = self.model.get_text_features(input_ids=ids["input_ids"]).pooler_output
        return torch.nn.functional.normalize(out, dim=-1).numpy()

    def image_embeds(self, images):
        import torch

        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = self.model.get_image_features(pixel_values=pixels).pooler_output
        return torch.nn.functional.normalize(out, dim=-1).numpy()

    def logits(self, images, texts):
        import torch

        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        ids = self.tokenizer(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
        with torch.no_grad():
            return self.model(input_ids=ids["input_ids"], pixel_values=pixels).logits_per_image.numpy()


@pytest.fixture(scope="session")
def reference_factory():
    cache: dict = {}

    def make(folder: Path) -> Reference:
        if folder not in cache:
            cache[folder] = Reference(folder)
        return cache[folder]

    return make


def random_image(seed: int, size=(48, 40), mode="RGB"):
    """A smooth-ish random picture (pure noise would hide resampling mistakes less well)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    noise = rng.integers(-20, 20, (h, w, 3))
    image = Image.fromarray(np.clip(np.asarray(image).astype(int) + noise, 0, 255).astype(np.uint8))
    return image.convert(mode) if mode != "RGB" else image


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    """Good images of several formats, plus a corrupt one and a non-image, in a folder tree."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    random_image(1, (64, 48)).save(folder / "a.jpg", quality=92)
    random_image(2, (40, 60)).save(folder / "b.png")
    random_image(3, (50, 50)).save(folder / "c.webp", lossless=True)
    frames = [random_image(10 + i, (30, 30)).convert("P") for i in range(3)]
    frames[0].save(folder / "d.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    sub = folder / "sub"
    sub.mkdir()
    random_image(4, (70, 30)).save(sub / "e.jpg")
    return folder


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    buffer = io.BytesIO()
    random_image(5, (64, 64)).save(buffer, format="JPEG")
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    not_image = folder / "notes.jpg"
    not_image.write_text("this is not a picture\n")
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    # A tiny PNG whose header is 12000x12000 pixels (144 megapixels): a decompression bomb for the pixel cap.
    bomb = folder / "bomb.png"
    from PIL import Image

    Image.new("1", (12000, 12000)).save(bomb)
    return {"truncated": truncated, "not_image": not_image, "empty": empty, "bomb": bomb}


@pytest.fixture()
def run(tiny_checkpoint, tmp_path, monkeypatch):
    """The CLI in-process on the tiny checkpoint, with a label cache of the test's own:
    run("classify", path, "--labels", "a,b") -> typer's Result (stdout, stderr, exit_code)."""
    from typer.testing import CliRunner

    from siglip_cli.cli.app import app

    monkeypatch.setenv("SIGLIP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SIGLIP_STATE_DIR", str(tmp_path / "state"))  # --write-xmp journals
    monkeypatch.setenv("SIGLIP_MODEL", str(tiny_checkpoint))

    def invoke(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    return invoke

class LocalHTTPServer(http.server.ThreadingHTTPServer):
    """A local HTTP server for URL inputs. A client that hangs up before its (deliberately slow)
    answer is expected here: socketserver would print that error's traceback to sys.stderr from
    a handler thread, seconds later, into whatever test then captures stderr."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        import sys

        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)):
            return
        super().handle_error(request, client_address)
