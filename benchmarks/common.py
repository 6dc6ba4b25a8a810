"""Shared helpers for the benchmark scripts: a full-size checkpoint with random weights in the
official Hugging Face layout, written by transformers itself, and a folder of JPEGs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VOCAB = ROOT / "tests" / "data" / "test_sentencepiece_no_bos.model"  # special ids as SigLIP's (eos 1, unk 2)


def build_checkpoint(folder: Path, name: str = "google/siglip-base-patch16-224", seed: int = 0) -> Path:
    """Random weights for the architecture `name` (from our built-in table), saved by transformers:
    SiglipModel for SigLIP and fixed-resolution SigLIP 2, Siglip2Model for NaFlex."""
    if (folder / "model.safetensors").exists():
        return folder
    import torch
    import transformers

    from siglip_cli.core.config import architecture

    arch = architecture(name)
    naflex = arch.vision.naflex
    text_config, vision_config = arch.hf_sub_configs()
    config_class = transformers.Siglip2Config if naflex else transformers.SiglipConfig
    model_class = transformers.Siglip2Model if naflex else transformers.SiglipModel
    torch.manual_seed(seed)
    model = model_class(config_class(text_config=text_config, vision_config=vision_config)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(np.log(10.0))
        model.logit_bias.fill_(-10.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if naflex:
        transformers.Siglip2ImageProcessorPil(patch_size=arch.vision.patch_size, max_num_patches=256).save_pretrained(folder)
    else:
        size = {"height": arch.vision.image_size, "width": arch.vision.image_size}
        transformers.SiglipImageProcessorPil(size=size, resample=arch.preprocess.resample).save_pretrained(folder)
    if arch.text.vocab_size == 256000:  # SigLIP 2: a Gemma-format tokenizer
        write_byte_tokenizer(folder)
    else:
        shutil.copy(VOCAB, folder / "spiece.model")
        transformers.SiglipTokenizer(vocab_file=str(VOCAB), model_input_names=["input_ids"]).save_pretrained(folder)
    return folder


def write_byte_tokenizer(folder: Path) -> None:
    """A Gemma-format tokenizer.json (pad 0, eos 1, bos 2, unk 3, mask 4, then one token per
    byte) with the tokenizer_config.json of the SigLIP 2 repositories: enough to run the model;
    token ids are compared with transformers' by the test suite, not here."""
    from tokenizers import Tokenizer, models, normalizers

    vocab = {name: i for i, name in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    vocab.update({f"<0x{b:02X}>": 5 + b for b in range(256)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.add_special_tokens(list(vocab)[:5])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": False, "add_eos_token": True,
              "eos_token": "<eos>", "pad_token": "<pad>", "padding_side": "right", "model_input_names": ["input_ids"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def make_jpegs(folder: Path, count: int, size=(640, 480), seed: int = 0) -> list[Path]:
    """COCO-sized JPEGs with some structure (smooth colour fields plus noise)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(seed)
    for i in range(count):
        path = folder / f"{i:05d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        w, h = size
        base = rng.integers(0, 256, (h // 32, w // 32, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC)).astype(np.int16)
        image = np.clip(image + rng.integers(-25, 25, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(path, quality=90)
    return paths


def write_unit_rows(path: Path, rows: int, dim: int, seed: int = 0) -> None:
    """`rows` random L2-normalised float32 vectors in a .npy file, written through a memory map a
    block at a time (any number of rows in little memory). Call it in a child process when the
    caller measures peaks: Linux carries a process's peak RSS into the programs it starts."""
    from numpy.lib.format import open_memmap

    values = open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    rng = np.random.default_rng(seed)
    for start in range(0, rows, 65536):
        block = rng.standard_normal((min(65536, rows - start), dim), dtype=np.float32)
        values[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    values.flush()


def run_process(argv: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run one whole process: {wall (s), peak (its peak RSS, MB), cpu (user + system s), stderr}.
    The figures are read by a fresh wrapper process whose only child is the command."""
    wrapper = (
        "import resource, subprocess, sys, json, time\n"
        "t = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
        "wall = time.perf_counter() - t\n"
        "usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(json.dumps({'wall': wall, 'peak': usage.ru_maxrss / 1024, 'cpu': usage.ru_utime + usage.ru_stime,\n"
        "                  'rc': p.returncode, 'stderr': p.stderr[-2000:]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True, text=True, env=env, cwd=cwd, check=True)
    result = json.loads(out.stdout)
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result['rc']}): {result['stderr']}")
    return result


def timed_process(argv: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, float, str]:
    """Run one whole process; (wall seconds, its peak RSS in MB, its stderr)."""
    result = run_process(argv, env, cwd)
    return result["wall"], result["peak"], result["stderr"]


def cpu_flags() -> str:
    """The CPU flags that decide speed per dtype (avx2, avx512*, amx*), present or not."""
    from siglip_cli.runtime import cpu_features

    features = cpu_features()
    present = [flag for flag, on in features.items() if on]
    absent = [flag for flag, on in features.items() if not on]
    return f"flags {' '.join(present) or '-'}; no {' '.join(absent) or '-'}"


def load_average() -> str:
    """The machine's 1/5/15-minute load: other work on a shared machine skews every figure."""
    try:
        return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load unknown"


def machine() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{cpu} ({cpu_flags()}), {os.cpu_count()} cores{gpu}; {load_average()}; {time.strftime('%Y-%m-%d %H:%M')}"
