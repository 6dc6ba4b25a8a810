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
    """Random weights for the architecture `name` (from our built-in table), saved by transformers."""
    if (folder / "model.safetensors").exists():
        return folder
    import torch
    from transformers import SiglipConfig, SiglipModel, SiglipTokenizer

    try:
        from transformers import SiglipImageProcessorPil
    except ImportError:  # older transformers: the slow processor had no suffix
        from transformers import SiglipImageProcessor as SiglipImageProcessorPil

    from siglip_cli.core.config import architecture

    arch = architecture(name)
    t, v = arch.text, arch.vision
    config = SiglipConfig(
        text_config={k: getattr(t, k) for k in t.__dataclass_fields__ if k != "projection_size"},
        vision_config={k: getattr(v, k) for k in v.__dataclass_fields__},
    )
    torch.manual_seed(seed)
    model = SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(np.log(10.0))
        model.logit_bias.fill_(-10.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    shutil.copy(VOCAB, folder / "spiece.model")
    SiglipTokenizer(vocab_file=str(VOCAB), model_input_names=["input_ids"]).save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": v.image_size, "width": v.image_size}).save_pretrained(folder)
    return folder


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
