"""`siglip bench`: speed of attention backends, dtypes and batch sizes, checked for correctness.

For every (dtype, tower, batch size) the backends run on the same inputs; before any timing
each one's output is compared with `eager`'s and the largest absolute difference is reported,
so a fast but wrong kernel shows. Timing: warm-up, device synchronisation around every run,
repeated runs within a time budget, median with min and max.
"""

from __future__ import annotations

import math
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import attention as attention_backends
from .config import SiglipConfig, architecture, config_from_folder
from .errors import ModelUnavailable, UsageError
from .hub import resolve_model
from .model import Siglip, normalize, random_init_, skip_init
from .runtime import DTYPES, resolve_device
from .weights import load_model

TOWERS = ("vision", "text", "classify")
CLASSIFY_LABELS = 10  # label embeddings an end-to-end classify call scores against


@dataclass
class Row:
    model: str
    weights: str
    device: str
    dtype: str
    attn: str
    tower: str
    batch_size: int
    status: str = "ok"  # ok | unavailable | failed
    reason: str | None = None
    items_per_s: float | None = None
    ms_per_batch: float | None = None
    ms_min: float | None = None
    ms_max: float | None = None
    runs: int = 0
    speedup_vs_eager: float | None = None
    max_abs_diff_vs_eager: float | None = None
    peak_mem_mb: float | None = None
    peak_mem_kind: str | None = None
    tflops: float | None = None
    pct_of_peak: float | None = None
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- FLOPs
def _layer_flops(tokens: int, hidden: int, inter: int, queries: int | None = None) -> float:
    """Multiply-adds x 2 of one encoder layer; `queries` < tokens when only some positions go on."""
    q = tokens if queries is None else queries
    qkv = 2 * tokens * hidden * 3 * hidden
    scores = 2 * 2 * q * tokens * hidden  # QK^T and AV
    out_mlp = 2 * q * hidden * hidden + 2 * 2 * q * hidden * inter
    return qkv + scores + out_mlp


def vision_flops(config: SiglipConfig) -> float:
    v = config.vision
    n, d, i = v.num_patches, v.hidden_size, v.intermediate_size
    patch = 2 * n * v.num_channels * v.patch_size**2 * d
    head = 2 * n * 2 * d * d + 2 * 2 * n * d + 2 * d * d + 2 * 2 * d * i  # kv proj, attention, out, mlp
    return patch + v.num_hidden_layers * _layer_flops(n, d, i) + head


def text_flops(config: SiglipConfig) -> float:
    t = config.text
    length, d, i = config.text_length, t.hidden_size, t.intermediate_size
    layers = (t.num_hidden_layers - 1) * _layer_flops(length, d, i) + _layer_flops(length, d, i, queries=1)
    return layers + 2 * d * t.embed_dim


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def warmup_runs(first_call_s: float, seconds: float) -> int:
    """Warm-up runs after a first (untimed) call that took `first_call_s`: two more when runs are
    short against the budget, one when they are long, none when one run alone exceeds half the
    budget (fp16 on a CPU: seconds per batch); there the first call was warm-up enough, and more
    would multiply the bench's time without changing its figures."""
    if first_call_s >= seconds / 2:
        return 0
    return 2 if first_call_s < seconds / 10 else 1


def time_runs(fn: Callable[[], object], device: torch.device, seconds: float, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    budget_end = time.perf_counter() + seconds
    while len(times) < repeats:
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        if time.perf_counter() >= budget_end:
            break
    return times


def _peak_memory_mb(device: torch.device) -> tuple[float | None, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda allocator peak"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss / 2**20 if sys.platform == "darwin" else rss / 2**10), "process peak RSS"


# ----------------------------------------------------------------------------- model
def build_network(
    model: str, device: torch.device, dtype: torch.dtype, note: Callable[[str], None]
) -> tuple[Siglip, SiglipConfig, str, Path | None]:
    """Real weights when a local folder or a cached hub copy is at hand; else the architecture
    from the built-in table with random weights. Never downloads: weights do not change speed."""
    attend = attention_backends.eager_attention
    folder = None
    path = Path(model).expanduser()
    if path.is_dir():
        folder = resolve_model(str(path)).folder
    else:
        try:
            folder = resolve_model(model, offline=True).folder
        except ModelUnavailable:
            folder = None
    if folder is not None:
        config = config_from_folder(folder)
        network = load_model(folder / "model.safetensors", config, ("text", "vision"), attend, device, dtype)
        return network, config, "checkpoint", folder
    try:
        config = architecture(model)
    except ModelUnavailable:
        raise ModelUnavailable(
            f"{model}: no local checkpoint and not in the built-in table of architectures; "
            "pass a checkpoint folder or a released SigLIP id"
        ) from None
    note(f"{model}: weights not available here (not cached); timing the architecture with random weights")
    with skip_init():
        network = Siglip(config, attend, device="meta")
    network = network.to_empty(device="cpu")
    random_init_(network)
    return network.to(device=device, dtype=dtype).eval().requires_grad_(False), config, "random", None


def to_transformers(network: Siglip, config: SiglipConfig, folder: Path | None, dtype: torch.dtype, device: torch.device):
    """The reference SiglipModel with the same weights, for --compare transformers."""
    from transformers import SiglipModel
    from transformers import SiglipConfig as HFConfig

    if folder is not None:
        reference = SiglipModel.from_pretrained(folder, attn_implementation="sdpa", dtype=dtype)
    else:
        t, v = config.text, config.vision
        hf_config = HFConfig(
            text_config={k: getattr(t, k) for k in t.__dataclass_fields__ if k != "projection_size"} | {"projection_size": t.embed_dim},
            vision_config={k: getattr(v, k) for k in v.__dataclass_fields__},
        )
        hf_config._attn_implementation = "sdpa"
        reference = SiglipModel(hf_config).to(dtype)
        from .weights import to_checkpoint_state

        reference.load_state_dict(to_checkpoint_state(network), strict=True)
    return reference.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- the run
def parse_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in items if x not in allowed]
    if unknown or not items:
        raise UsageError(f"--{what} {text!r}: choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def default_batch_sizes(device: torch.device) -> list[int]:
    return {"cuda": [1, 32, 128], "mps": [1, 16]}.get(device.type, [1, 4])


def dtype_unavailable(dtype: torch.dtype, device: torch.device) -> str | None:
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16 support"
    return None


def make_inputs(config: SiglipConfig, batch: int, device: torch.device, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    pre = config.preprocess
    pixels_u8 = torch.randint(0, 256, (batch, pre.height, pre.width, 3), dtype=torch.uint8, generator=generator)
    ids = torch.randint(3, config.text.vocab_size, (batch, config.text_length), generator=generator)
    ids[:, -8:] = 1  # padding ends the text, as the tokenizer makes it
    return {"pixels_u8": pixels_u8, "ids": ids.to(device)}


def run_bench(
    model: str,
    attn: str,
    dtypes: str,
    batch_sizes: str | None,
    towers: str,
    seconds: float,
    repeats: int,
    device: str,
    peak_tflops: float | None,
    compare: str | None,
    fmt: str,
    note: Callable[[str], None],
) -> list[Row]:
    from .images import normalization_table, pixels_to_model_input

    torch_device = resolve_device(device)
    backend_names = list(attention_backends.BACKENDS) if attn == "all" else parse_list(attn, attention_backends.BACKENDS, "attn")
    if "eager" not in backend_names:
        backend_names.insert(0, "eager")  # the reference every other backend is checked and timed against
        show_eager = False
    else:
        show_eager = True
    if dtypes == "auto":
        dtype_names = ["fp16", "bf16"] if torch_device.type == "cuda" else ["fp32"]
    else:
        dtype_names = parse_list(dtypes, tuple(DTYPES), "dtype")
    try:
        if batch_sizes is not None and not batch_sizes.strip():
            raise ValueError
        sizes = list(dict.fromkeys(int(x) for x in batch_sizes.split(","))) if batch_sizes else default_batch_sizes(torch_device)
    except ValueError:
        raise UsageError(f"--batch-sizes {batch_sizes!r}: give integers, e.g. 1,8,32") from None
    if any(b < 1 for b in sizes):
        raise UsageError("--batch-sizes must be positive")
    tower_names = parse_list(towers, TOWERS, "towers")
    if torch_device.type == "cpu" and any(d != "fp32" for d in dtype_names):
        note("fp16/bf16 on the CPU run, but most CPUs compute them slower than fp32")
    if compare == "transformers":
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise UsageError("--compare transformers: transformers is not installed (pip install 'siglip-cli[test]')") from None

    rows: list[Row] = []
    for dtype_name in dtype_names:
        dtype = DTYPES[dtype_name]
        reason = dtype_unavailable(dtype, torch_device)
        if reason:
            rows += [Row(model, "-", str(torch_device), dtype_name, a, t, b, "unavailable", reason)
                     for t in tower_names for b in sizes for a in backend_names]
            continue
        network, config, weights, folder = build_network(model, torch_device, dtype, note)
        head_dims = config.head_dims
        table = torch.from_numpy(normalization_table(config.preprocess)).to(torch_device)
        labels = normalize(torch.randn(CLASSIFY_LABELS, config.vision.hidden_size, generator=torch.Generator().manual_seed(1))).to(torch_device)
        scale, bias = network.logit_scale.float().exp(), network.logit_bias.float()
        reference = to_transformers(network, config, folder, dtype, torch_device) if compare else None
        flops = {"vision": vision_flops(config), "text": text_flops(config), "classify": vision_flops(config)}

        for tower in tower_names:
            for batch in sizes:
                inputs = make_inputs(config, batch, torch_device)
                pixels = pixels_to_model_input(inputs["pixels_u8"].to(torch_device), table)

                def call(tower=tower, inputs=inputs, pixels=pixels):
                    with torch.inference_mode():
                        if tower == "vision":
                            return network.vision_model(pixels)
                        if tower == "text":
                            return network.text_model(inputs["ids"])
                        host = inputs["pixels_u8"].to(torch_device, non_blocking=True)
                        image = normalize(network.vision_model(pixels_to_model_input(host, table)))
                        return torch.sigmoid(image @ labels.t() * scale + bias).cpu()

                base = dict(model=model, weights=weights, device=str(torch_device), dtype=dtype_name, tower=tower, batch_size=batch)
                eager_out, eager_median = None, None
                others_run = any(
                    not attention_backends.why_unavailable(b, torch_device, dtype, head_dims) for b in backend_names if b != "eager"
                )
                for backend in backend_names:
                    if backend == "eager" and not show_eager and not others_run:
                        continue  # a hidden reference for backends that cannot run here: not worth timing
                    row = Row(attn=backend, **base)
                    why = attention_backends.why_unavailable(backend, torch_device, dtype, head_dims)
                    if why:
                        row.status, row.reason = "unavailable", why
                        rows.append(row)
                        continue
                    network.set_attention(attention_backends.resolve(backend, torch_device, dtype, head_dims))
                    try:
                        start = time.perf_counter()
                        output = call().float()  # the outputs compared with eager's; also the first warm-up
                        _sync(torch_device)
                        first_call_s = time.perf_counter() - start
                        if backend == "eager":
                            eager_out = output
                        if eager_out is not None:  # eager failed (e.g. out of memory): timed, not compared
                            row.max_abs_diff_vs_eager = float((output - eager_out).abs().max())
                        if torch_device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats(torch_device)
                        times = time_runs(call, torch_device, seconds, repeats, warmup_runs(first_call_s, seconds))
                    except Exception as exc:  # an OOM or kernel error is a row, not a crash
                        row.status, row.reason = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                        rows.append(row)
                        continue
                    _fill_timing(row, times, batch, flops[tower], peak_tflops, torch_device)
                    if backend == "eager":
                        eager_median = row.ms_per_batch
                    if eager_median and row.ms_per_batch:
                        row.speedup_vs_eager = eager_median / row.ms_per_batch
                    if backend != "eager" or show_eager:
                        rows.append(row)
                if reference is not None and tower != "classify":
                    rows.append(_reference_row(reference, tower, inputs, pixels, base, seconds, repeats, torch_device, flops[tower], peak_tflops, eager_out, eager_median, rows))
        del network, reference
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()

    _print(rows, fmt, peak_tflops)
    return rows


def _fill_timing(row: Row, times: list[float], batch: int, flops: float, peak: float | None, device: torch.device) -> None:
    median = statistics.median(times)
    row.runs = len(times)
    row.ms_per_batch = median * 1e3
    row.ms_min, row.ms_max = min(times) * 1e3, max(times) * 1e3
    row.items_per_s = batch / median
    row.tflops = flops * batch / median / 1e12
    if peak:
        row.pct_of_peak = 100 * row.tflops / peak
    row.peak_mem_mb, row.peak_mem_kind = _peak_memory_mb(device)


def _reference_row(reference, tower, inputs, pixels, base, seconds, repeats, device, flops, peak, eager_out, eager_median, rows) -> Row:
    row = Row(attn="transformers", **base)

    def call():
        with torch.inference_mode():
            if tower == "vision":
                return reference.get_image_features(pixel_values=pixels).pooler_output
            return reference.get_text_features(input_ids=inputs["ids"]).pooler_output

    try:
        start = time.perf_counter()
        output = call().float()
        _sync(device)
        first_call_s = time.perf_counter() - start
        if eager_out is not None:
            row.max_abs_diff_vs_eager = float((output - eager_out).abs().max())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = time_runs(call, device, seconds, repeats, warmup_runs(first_call_s, seconds))
    except Exception as exc:
        row.status, row.reason = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        return row
    _fill_timing(row, times, base["batch_size"], flops, peak, device)
    if eager_median:
        row.speedup_vs_eager = eager_median / row.ms_per_batch
    ours = [r for r in rows if r.tower == tower and r.batch_size == base["batch_size"] and r.dtype == base["dtype"] and r.attn == "sdpa" and r.ms_per_batch]
    if ours:
        row.extra["ours_sdpa_speedup"] = row.ms_per_batch / ours[-1].ms_per_batch
    return row


def _print(rows: list[Row], fmt: str, peak: float | None) -> None:
    if fmt == "json":
        import json

        records = []
        for row in rows:
            record = asdict(row)
            extra = record.pop("extra")
            record.update(extra)
            # A NaN difference (a broken kernel) is what the column exists to show; JSON has no
            # NaN, so non-finite numbers become null (and the row's status says what happened).
            records.append({k: (float(f"{v:.6g}") if math.isfinite(v) else None) if isinstance(v, float) else v for k, v in record.items()})
        json.dump(records, sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
        return
    from rich.table import Table
    from rich.text import Text

    from .render import stdout_console

    from rich import box

    console = stdout_console()
    if not console.is_terminal:
        console.width = max(console.width, 120)  # a saved report keeps its columns
    if not rows:
        console.print("no rows")
        return
    first = rows[0]
    console.print(Text(f"{first.model} ({first.weights} weights) on {first.device}", style="bold"))
    unit = {"vision": "images/s", "text": "texts/s", "classify": "images/s"}
    reasons: dict[str, int] = {}
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.tower, row.dtype), []).append(row)
    for (tower, dtype), group in groups.items():
        table = Table(title=f"{tower} tower, {dtype}" if tower != "classify" else f"classify, {dtype}",
                      title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for name in ("batch", "attn", unit[tower], "ms median", "min–max (runs)", "vs eager", "max|Δ| vs eager", "peak MB", "TFLOP/s"):
            table.add_column(name, justify="left" if name == "attn" else "right", no_wrap=name == "attn")
        if peak:
            table.add_column("% peak", justify="right", no_wrap=True)
        for row in group:
            if row.status != "ok":
                mark = reasons.setdefault(f"{row.attn} {row.status}: {row.reason}", len(reasons) + 1)
                cells = [str(row.batch_size), row.attn, Text(f"{row.status} [{mark}]", style="yellow")] + ["–"] * 6
            else:
                cells = [
                    str(row.batch_size),
                    row.attn,
                    f"{row.items_per_s:,.1f}",
                    f"{row.ms_per_batch:,.2f}",
                    f"{row.ms_min:,.2f}–{row.ms_max:,.2f} ({row.runs})",
                    f"{row.speedup_vs_eager:.2f}x" if row.speedup_vs_eager else "–",
                    f"{row.max_abs_diff_vs_eager:.1e}" if row.max_abs_diff_vs_eager is not None else "–",
                    f"{row.peak_mem_mb:,.0f}" if row.peak_mem_mb else "–",
                    f"{row.tflops:.3g}" if row.tflops is not None else "–",
                ]
            if peak:
                cells.append(f"{row.pct_of_peak:.1f}%" if row.pct_of_peak is not None else "")
            table.add_row(*cells)
        console.print(table)
    for reason, mark in reasons.items():
        console.print(Text(f"[{mark}] {reason}", style="yellow"))
    for row in rows:
        if "ours_sdpa_speedup" in row.extra:
            console.print(
                f"{row.tower} {row.dtype} batch {row.batch_size}: ours (sdpa) is {row.extra['ours_sdpa_speedup']:.2f}x "
                "the speed of transformers' SiglipModel (sdpa) on the same weights and inputs"
            )
    kinds = {r.peak_mem_kind for r in rows if r.peak_mem_kind}
    console.print(Text(
        f"classify = uint8 pixels to the device, normalise, vision tower, sigmoid against {CLASSIFY_LABELS} cached "
        f"labels, back to the host. max|Δ| = largest absolute output difference from eager on the same inputs. "
        f"peak MB: {', '.join(sorted(kinds)) or '–'}.",
        style="dim",
    ))
