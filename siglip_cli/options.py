"""Shared option types for the Typer app. Importing this must stay cheap: no torch."""

from __future__ import annotations

from enum import Enum


class DType(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class Attn(str, Enum):
    auto = "auto"
    eager = "eager"
    sdpa = "sdpa"
    flash = "flash"


class Format(str, Enum):
    auto = "auto"
    table = "table"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"


class OutDType(str, Enum):
    float32 = "float32"
    float16 = "float16"


MODEL_HELP = (
    "Local checkpoint folder (config.json, model.safetensors, spiece.model) or Hugging Face hub id. "
    "Hub models download once into the Hugging Face cache (HF_HOME) and are used from there."
)
DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."
DTYPE_HELP = "auto is fp16 on CUDA, fp32 elsewhere. fp16/bf16 run on CPU too, but slowly."
ATTN_HELP = "Attention kernel: auto (= sdpa), eager (reference math), sdpa (torch fused), flash (flash-attn; CUDA, fp16/bf16)."
FORMAT_HELP = "auto: a table on a terminal, JSON lines when piped."
