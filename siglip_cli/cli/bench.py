"""`siglip bench`: speed of attention backends, dtypes and batch sizes, checked for correctness.

For every (dtype, tower, batch size) the backends run on the same inputs; before any timing
each one's output is compared with `eager`'s and the largest absolute difference is reported,
so a fast but wrong kernel shows. Our engine and transformers' model (`--compare`) are timed by
the same function: warm-up, device synchronisation around every run, repeated runs within a
time budget, median with min and max.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..core import attention as attention_backends
from ..core.config import SiglipConfig, architecture, config_from_folder
from ..core.errors import ModelUnavailable, UsageError
from ..core.model import Siglip, random_init_, skip_init
from ..core.quantize import quantize_int8
from ..core.scoring import sigmoid
from ..core.images import Patches, normalization_table, patchify
from ..engine import Engine
from ..hub import ResolvedModel, resolve_model
from ..pipeline import PatchBatch
from ..results import BenchRow
from ..runtime import PRECISIONS, Precision, cpu_features, native_bf16, cpu_flags, resolve_device, resolve_precision
from .terminal import activity

TOWERS = ("vision", "text", "classify")
CLASSIFY_LABELS = 10  # label embeddings an end-to-end classify call scores against


@dataclass
class BenchOptions:
    model: str
    backends: list[str]
    show_eager: bool
    dtypes: list[str]
    batch_sizes: list[int]
    towers: list[str]
    seconds: float = 2.0
    repeats: int = 10
    device: str = "auto"
    peak_tflops: float | None = None
    compare: str | None = None
    max_patches: int | None = None  # NaFlex: the patch budget per image (None: the checkpoint's)
    auto_dtype: Precision | None = None  # what --dtype auto picks on this device


# ----------------------------------------------------------------------------- options
def parse_list(text: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in items if x not in allowed]
    if unknown or not items:
        raise UsageError(f"--{what} {text!r}: choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def parse_batch_sizes(text: str | None, device: torch.device) -> list[int]:
    if text is None:
        return {"cuda": [1, 32, 128], "mps": [1, 16]}.get(device.type, [1, 4])
    try:
        sizes = list(dict.fromkeys(int(x) for x in text.split(",")))
    except ValueError:
        raise UsageError(f"--batch-sizes {text!r}: give integers, e.g. 1,8,32") from None
    if not sizes or any(b < 1 for b in sizes):
        raise UsageError("--batch-sizes must be positive integers, e.g. 1,8,32")
    return sizes


def make_options(model, attn, dtype, batch_sizes, towers, seconds, repeats, device, peak_tflops, compare,
                 max_patches: int | None = None) -> BenchOptions:
    torch_device = resolve_device(device)
    backends = list(attention_backends.BACKENDS) if attn == "all" else parse_list(attn, attention_backends.BACKENDS, "attn")
    show_eager = "eager" in backends
    if not show_eager:
        backends.insert(0, "eager")  # the reference every other backend is checked and timed against
    auto = resolve_precision("auto", torch_device)
    dtypes = bench_dtypes(dtype, torch_device, auto)
    if compare not in (None, "transformers"):
        raise UsageError(f"--compare {compare}: only 'transformers' is supported")
    if compare:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise UsageError("--compare transformers: transformers is not installed (pip install 'siglip-cli[test]')") from None
    return BenchOptions(model, backends, show_eager, dtypes, parse_batch_sizes(batch_sizes, torch_device),
                        parse_list(towers, TOWERS, "towers"), seconds, repeats, str(torch_device), peak_tflops, compare,
                        max_patches, auto)


def timed_rows(options: BenchOptions) -> int:
    """How many rows run timed: every backend this kind of device can run (eager too, as the
    hidden reference), plus transformers' model with --compare, for each dtype, tower and batch."""
    runnable = [b for b in options.backends if b != "flash" or options.device.startswith("cuda")]
    per_group = len(runnable) + (1 if options.compare else 0)
    return len(options.dtypes) * len(options.towers) * len(options.batch_sizes) * per_group


def plan_line(options: BenchOptions) -> str:
    """Said before anything runs: what will be timed and roughly how long it takes. Each row takes
    its --seconds budget plus warm-up, at most; each dtype builds the model once (seconds)."""
    rows = timed_rows(options)
    estimate = rows * (options.seconds + 0.5) + len(options.dtypes) * 4
    if estimate < 90:
        roughly = f"{max(5, round(estimate / 5) * 5):.0f} s"
    else:
        roughly = f"{round(estimate / 60):.0f} minute{'s' if round(estimate / 60) != 1 else ''}"
    shape = " x ".join(f"{len(values)} {name}" for name, values in (
        ("dtypes" if len(options.dtypes) != 1 else "dtype", options.dtypes),
        ("towers" if len(options.towers) != 1 else "tower", options.towers),
        ("batch sizes" if len(options.batch_sizes) != 1 else "batch size", options.batch_sizes)))
    return (f"timing {rows} rows of {options.model} ({shape}, each backend) for up to {options.seconds:g} s each: "
            f"about {roughly} on an idle machine; --seconds, --towers and --batch-sizes make it shorter, Ctrl-C stops")


def bench_dtypes(text: str, device: torch.device, auto: Precision) -> list[str]:
    """The dtypes to time. `auto` (alone or in a list): on CUDA fp16 and bf16; elsewhere fp32 and,
    where it differs, what `--dtype auto` picks here, so its gain shows beside fp32."""
    if device.type == "cuda":
        default = ["fp16", "bf16"]
    else:
        default = list(dict.fromkeys(["fp32", auto.name]))
    names = parse_list(text, ("auto", *PRECISIONS), "dtype")
    return list(dict.fromkeys(d for name in names for d in (default if name == "auto" else [name])))


# ----------------------------------------------------------------------------- FLOPs
def _layer_flops(tokens: int, hidden: int, inter: int, queries: int | None = None) -> float:
    """Multiply-adds x 2 of one encoder layer; `queries` < tokens when only some positions go on."""
    q = tokens if queries is None else queries
    qkv = 2 * tokens * hidden * 3 * hidden
    scores = 2 * 2 * q * tokens * hidden  # QK^T and AV
    out_mlp = 2 * q * hidden * hidden + 2 * 2 * q * hidden * inter
    return qkv + scores + out_mlp


def vision_tokens(config: SiglipConfig) -> int:
    """Patches the vision tower sees per image: the fixed grid, or NaFlex's whole budget (bench
    images are cut to exactly fill it)."""
    return config.preprocess.max_num_patches if config.vision.naflex else config.vision.num_patches


def vision_flops(config: SiglipConfig) -> float:
    v = config.vision
    n, d, i = vision_tokens(config), v.hidden_size, v.intermediate_size
    patch = 2 * n * v.num_channels * v.patch_size**2 * d
    head = 2 * n * 2 * d * d + 2 * 2 * n * d + 2 * d * d + 2 * 2 * d * i  # kv proj, attention, out, mlp
    return patch + v.num_hidden_layers * _layer_flops(n, d, i) + head


def text_flops(config: SiglipConfig) -> float:
    t = config.text
    length, d, i = config.text_length, t.hidden_size, t.intermediate_size
    layers = (t.num_hidden_layers - 1) * _layer_flops(length, d, i) + _layer_flops(length, d, i, queries=1)
    return layers + 2 * d * t.embed_dim


# ----------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
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
    synchronize(device)
    times: list[float] = []
    budget_end = time.perf_counter() + seconds
    while len(times) < repeats:
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        if time.perf_counter() >= budget_end:
            break
    return times


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif sys.platform.startswith("linux"):
        try:  # Linux resets the process's peak RSS (VmHWM) on "5" (since 4.0)
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass


def _peak_memory_mb(device: torch.device) -> tuple[float | None, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda allocator peak of the row"
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, "process peak RSS during the row"
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss / 2**20 if sys.platform == "darwin" else rss / 2**10), "process peak RSS so far"


def measure(row: BenchRow, call: Callable[[], torch.Tensor], device: torch.device, options: BenchOptions, flops: float,
            reference_output: torch.Tensor | None) -> torch.Tensor | None:
    """Run `call` once to compare its output, then time it; fills `row`. The one timing
    function for our engine and for transformers. Returns the first output (None on failure)."""
    try:
        start = time.perf_counter()
        output = call().float()
        synchronize(device)
        first_call_s = time.perf_counter() - start
        if reference_output is not None:
            row.max_abs_diff_vs_eager = float((output.cpu() - reference_output.cpu()).abs().max())
        _reset_peak_memory(device)
        times = time_runs(call, device, options.seconds, options.repeats, warmup_runs(first_call_s, options.seconds))
    except Exception as exc:  # an OOM or kernel error is a row, not a crash
        row.status, row.reason = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        return None
    median = statistics.median(times)
    row.runs = len(times)
    row.ms_per_batch = median * 1e3
    row.ms_min, row.ms_max = min(times) * 1e3, max(times) * 1e3
    row.items_per_s = row.batch_size / median
    row.tflops = flops * row.batch_size / median / 1e12
    if options.peak_tflops:
        row.pct_of_peak = 100 * row.tflops / options.peak_tflops
    row.peak_mem_mb, row.peak_mem_kind = _peak_memory_mb(device)
    return output


# ----------------------------------------------------------------------------- the engine under test
def open_engine(model: str, device: torch.device, dtype: torch.dtype, note: Callable[[str], None] | None,
                max_patches: int | None = None, towers: tuple[str, ...] = ("text", "vision"),
                quantize: str | None = None) -> tuple[Engine, str]:
    """Our engine on real weights when a local folder or a cached hub copy is at hand; else on
    the architecture from the built-in table with random weights. Never downloads: weights do
    not change speed. Only `towers` are built (SigLIP 2's 256k-token text embedding alone is
    786 MB in fp32)."""
    path = Path(model).expanduser()
    try:
        resolved = resolve_model(str(path) if path.is_dir() else model, offline=True)
    except ModelUnavailable:
        if path.is_dir():
            raise
        resolved = None
    if resolved is not None:
        config = _with_budget(config_from_folder(resolved.folder), model, max_patches)
        engine = Engine(resolved, config, device, dtype, "eager", use_cache=False, quantize=quantize)
        for tower in towers:
            engine.tower(tower)  # loaded before any timing
        return engine, "checkpoint"
    try:
        config = architecture(model)
    except ModelUnavailable:
        raise ModelUnavailable(
            f"{model}: no local checkpoint and not in the built-in table of architectures; "
            "pass a checkpoint folder or a released SigLIP id"
        ) from None
    config = _with_budget(config, model, max_patches)
    if note:
        note(f"{model}: weights not available here (not cached); timing the architecture with random weights")
    resolved = ResolvedModel(model, Path("."), "random")
    network = random_network(config, device, dtype, towers)
    return Engine(resolved, config, device, dtype, "eager", use_cache=False, network=network, quantize=quantize), "random"


def random_network(config: SiglipConfig, device: torch.device, dtype: torch.dtype,
                   towers: tuple[str, ...] = ("text", "vision")) -> Siglip:
    """The architecture with the same random weights every time (seed 0)."""
    with skip_init():
        network = Siglip(config, towers=towers, device="meta")
    network = network.to_empty(device="cpu")
    random_init_(network)
    network = network.to(device=device, dtype=dtype).eval().requires_grad_(False)
    network.logit_scale.data, network.logit_bias.data = network.logit_scale.float(), network.logit_bias.float()
    return network


def _with_budget(config: SiglipConfig, model: str, max_patches: int | None) -> SiglipConfig:
    if max_patches is not None and not config.vision.naflex:
        raise UsageError(f"--max-patches: {model} is a fixed-resolution model; only SigLIP 2 NaFlex models take a patch budget")
    return config.with_max_patches(max_patches)


def to_transformers(engine: Engine, weights: str):
    """transformers' SiglipModel (Siglip2Model for NaFlex) with the same weights, kept on the CPU
    between its rows; for int8, quantized the same way as ours."""
    reference = _transformers_model(engine, weights)
    return quantize_int8(reference) if engine.quantize == "int8" else reference


def _transformers_model(engine: Engine, weights: str):
    import transformers

    from ..core.weights import to_checkpoint_state

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    naflex = engine.config.vision.naflex
    model_class = transformers.Siglip2Model if naflex else transformers.SiglipModel
    if weights == "checkpoint":
        return model_class.from_pretrained(engine.resolved.folder, attn_implementation="sdpa", dtype=engine.dtype).eval()
    config_class = transformers.Siglip2Config if naflex else transformers.SiglipConfig
    text_config, vision_config = engine.config.hf_sub_configs()
    hf_config = config_class(text_config=text_config, vision_config=vision_config)
    hf_config._attn_implementation = "sdpa"
    reference = model_class(hf_config).to(engine.dtype)
    # our towers may be quantized already: the same random weights, rebuilt in full precision
    network = engine.network
    built = tuple(t for t in ("text", "vision") if getattr(network, f"{t}_model") is not None)
    state = to_checkpoint_state(random_network(engine.config, torch.device("cpu"), engine.dtype, built))
    missing, unexpected = reference.load_state_dict(state, strict=False)
    prefixes = tuple(f"{t}_model." for t in built)
    if unexpected or any(name.startswith(prefixes) for name in missing):  # only towers not built may be missing
        raise RuntimeError(f"transformers' model does not take our weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return reference.eval().requires_grad_(False)


def bench_grid(budget: int) -> tuple[int, int]:
    """NaFlex: the patch grid of bench images, as square as fills the budget exactly."""
    rows = math.isqrt(budget)
    while budget % rows:
        rows -= 1
    return rows, budget // rows


def make_inputs(config: SiglipConfig, batch: int, seed: int = 0) -> dict:
    """Random uint8 frames, already prepared as the pipeline prepares them (square pixels, or
    NaFlex patches filling the budget), and token ids that end in padding."""
    generator = torch.Generator().manual_seed(seed)
    pre, vision = config.preprocess, config.vision
    if vision.naflex:
        rows, columns = bench_grid(pre.max_num_patches)
        size = (batch, rows * vision.patch_size, columns * vision.patch_size, 3)
    else:
        size = (batch, pre.height, pre.width, 3)
    pixels_u8 = torch.randint(0, 256, size, dtype=torch.uint8, generator=generator)
    frames = list(pixels_u8.numpy())
    if vision.naflex:
        frames = [Patches(patchify(frame, vision.patch_size), (rows, columns)) for frame in frames]
    ids = torch.randint(3, config.text.vocab_size, (batch, config.text_length), generator=generator)
    ids[:, -8:] = 1  # padding ends the text, as the tokenizer makes it
    return {"frames": frames, "ids": ids}


def dtype_unavailable(name: str, device: torch.device) -> str | None:
    if device.type == "cuda" and name == "bf16" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16 support"
    if device.type != "cpu" and name == "int8":
        return "int8 (torch's dynamic quantization) runs on the CPU only"
    return None


# ----------------------------------------------------------------------------- the run
class _Calls:
    """What each tower row runs, for our engine and for the reference, on the same inputs."""

    def __init__(self, engine: Engine, inputs: dict, labels: np.ndarray):
        self.engine = engine
        device = engine.device
        self.frames = inputs["frames"]
        self.pipeline = engine.image_pipeline(batch_size=len(self.frames))
        layout = self.pipeline.layout
        table = torch.from_numpy(normalization_table(engine.config.preprocess)).to(device)
        self.images = layout.to_device(layout.collate(self.frames, None), device, table)  # PixelBatch or PatchBatch
        self.ids = inputs["ids"].to(device)
        self.labels = labels

    @torch.inference_mode()
    def ours(self, tower: str) -> torch.Tensor:
        if tower == "vision":
            return self.engine.vision_model(*self.images.model_inputs())
        if tower == "text":
            return self.engine.text_model(self.ids)
        # classify: uint8 frames through the pipeline's own launch (pinned memory on CUDA),
        # the vision tower, then SigLIP's scores on the host, as `siglip classify` does
        features = self.pipeline.embed_pixels(self.frames, self.engine.encode_images)
        return torch.from_numpy(sigmoid(self.engine.logits(features, self.labels)))

    @torch.inference_mode()
    def reference(self, model, tower: str) -> torch.Tensor:
        if tower == "vision":
            return model.get_image_features(**_reference_image_inputs(self.images)).pooler_output
        return model.get_text_features(input_ids=self.ids).pooler_output


def _reference_image_inputs(images) -> dict:
    """Our device batch under transformers' argument names."""
    if isinstance(images, PatchBatch):
        return {"pixel_values": images.patches, "pixel_attention_mask": images.mask, "spatial_shapes": images.spatial_shapes}
    return {"pixel_values": images.pixels}


def run_bench(options: BenchOptions, note: Callable[[str], None]) -> list[BenchRow]:
    device = torch.device(options.device)
    rows: list[BenchRow] = []
    _note_dtypes(options, device, note)
    noted = False
    features = [flag for flag, present in cpu_features().items() if present]
    for dtype_name in options.dtypes:
        picked = options.auto_dtype.reason if options.auto_dtype and options.auto_dtype.name == dtype_name else None
        reason = dtype_unavailable(dtype_name, device)
        if reason:
            rows += [BenchRow(options.model, "-", str(device), dtype_name, a, t, b, "unavailable", reason,
                              cpu_features=features, dtype_auto=picked)
                     for t in options.towers for b in options.batch_sizes for a in options.backends]
            continue
        towers = tuple(t for t in ("text", "vision") if t in options.towers or (t == "vision" and "classify" in options.towers))
        precision = resolve_precision(dtype_name, device)
        activity(f"building the model in {dtype_name}")
        engine, weights = open_engine(options.model, device, precision.dtype, None if noted else note, options.max_patches,
                                      towers, precision.quantize)
        noted = True
        reference = to_transformers(engine, weights) if options.compare else None
        labels = np.random.default_rng(1).standard_normal((CLASSIFY_LABELS, engine.embed_dim)).astype(np.float32)
        labels /= np.linalg.norm(labels, axis=1, keepdims=True)
        flops = {"vision": vision_flops(engine.config), "text": text_flops(engine.config), "classify": vision_flops(engine.config)}
        for tower in options.towers:
            for batch in options.batch_sizes:
                calls = _Calls(engine, make_inputs(engine.config, batch), labels)
                base = dict(model=options.model, weights=weights, device=str(device), dtype=dtype_name, tower=tower,
                            batch_size=batch, max_patches=engine.describe().get("max_patches"),
                            cpu_features=features, dtype_auto=picked)
                measured, eager_output, eager_median = _backend_rows(engine, calls, tower, base, options, flops[tower])
                rows += measured
                if reference is not None and tower != "classify":
                    rows.append(_reference_row(reference, calls, tower, base, options, flops[tower], eager_output, eager_median, rows))
                del calls
        del engine, reference
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _note_dtypes(options: BenchOptions, device: torch.device, note: Callable[[str], None]) -> None:
    """Say what --dtype auto is here, and warn before dtypes this CPU computes slowly."""
    if options.auto_dtype is not None and options.auto_dtype.name in options.dtypes:
        note(f"--dtype auto is {options.auto_dtype.name} here ({options.auto_dtype.reason})")
    if device.type != "cpu":
        return
    slow = [d for d in options.dtypes if d == "fp16" or d == "bf16" and not native_bf16(cpu_flags())]
    if slow:
        note(f"{' and '.join(slow)} run on this CPU without native units, slower than fp32")


def _backend_rows(engine: Engine, calls: _Calls, tower: str, base: dict, options: BenchOptions, flops: float):
    """Every backend's row for one (tower, batch size), plus eager's output and median time,
    which the reference row is compared with."""
    device, head_dims = engine.device, engine.config.head_dims
    available = {b: attention_backends.why_unavailable(b, device, engine.dtype, head_dims, engine.masked) for b in options.backends}
    others_run = any(not why for b, why in available.items() if b != "eager")
    rows, eager_output, eager_median = [], None, None
    for backend in options.backends:
        if backend == "eager" and not options.show_eager and not others_run:
            continue  # a hidden reference for backends that cannot run here: not worth timing
        row = BenchRow(attn=backend, **base)
        if available[backend]:
            row.status, row.reason = "unavailable", available[backend]
            rows.append(row)
            continue
        engine.set_attention(backend)
        activity(f"timing {tower}, {base['dtype']}, batch {base['batch_size']}, {backend}: "
                 f"checking against eager, warming up, then up to {options.seconds:g} s")
        output = measure(row, lambda: calls.ours(tower), device, options, flops, eager_output)
        if backend == "eager":
            eager_output, eager_median = output, row.ms_per_batch
            if output is not None:
                row.max_abs_diff_vs_eager = 0.0
        if eager_median and row.ms_per_batch:
            row.speedup_vs_eager = eager_median / row.ms_per_batch
        if backend != "eager" or options.show_eager or row.status != "ok":
            rows.append(row)  # a hidden eager reference shows only when it failed
    return rows, eager_output, eager_median


def _reference_row(reference, calls: _Calls, tower: str, base: dict, options: BenchOptions, flops: float,
                   eager_output, eager_median, rows: list[BenchRow]) -> BenchRow:
    engine = calls.engine
    device = engine.device
    row = BenchRow(attn="transformers", **base)
    activity(f"timing {tower}, {base['dtype']}, batch {base['batch_size']}, transformers' model")
    reference.to(device)  # on the device only for its own rows: it must not inflate ours
    try:
        measure(row, lambda: calls.reference(reference, tower), device, options, flops, eager_output)
    finally:
        reference.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if eager_median and row.ms_per_batch:
        row.speedup_vs_eager = eager_median / row.ms_per_batch
    ours = [r for r in rows if r.tower == tower and r.batch_size == base["batch_size"] and r.dtype == base["dtype"] and r.attn == "sdpa" and r.ms_per_batch]
    if ours and row.ms_per_batch:
        row.ours_sdpa_speedup = row.ms_per_batch / ours[-1].ms_per_batch
    return row
