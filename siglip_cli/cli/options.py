"""Option types and the options every model command shares. Importing this stays cheap: no torch."""

from __future__ import annotations

import functools
import inspect
from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..core.config import MAX_PATCH_BUDGET  # plain Python: no torch

DEFAULT_MODEL = "google/siglip-base-patch16-224"


class DType(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"


class Decode(str, Enum):
    auto = "auto"
    exact = "exact"
    fast = "fast"


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


class ListFormat(str, Enum):
    """classify's and search's formats: Format's, plus one path per line."""

    auto = "auto"
    table = "table"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"
    paths = "paths"


class DedupeLevel(str, Enum):
    exact = "exact"
    near = "near"
    similar = "similar"


class KeepRule(str, Enum):
    largest = "largest"
    oldest = "oldest"
    newest = "newest"
    first = "first"


class NeighbourMethod(str, Enum):
    auto = "auto"
    exact = "exact"
    approximate = "approximate"


class SortAction(str, Enum):
    copy = "copy"
    link = "link"
    move = "move"


class EngineKind(str, Enum):
    local = "local"
    ray = "ray"


class OutDType(str, Enum):
    float32 = "float32"
    float16 = "float16"


def choices(kind: type[Enum]) -> str:
    """An Enum option's placeholder in help, written like every other choice: a|b|c."""
    return "|".join(member.value for member in kind)


MODEL_HELP = (
    "Local checkpoint folder (config.json, model.safetensors, preprocessor_config.json and the tokenizer: "
    "spiece.model for SigLIP, tokenizer.json for SigLIP 2) or Hugging Face hub id. "
    "Hub models download once into the Hugging Face cache (HF_HOME) and are used from there. "
    f"\\[default: {DEFAULT_MODEL}]"  # in the help, not show_default=, which Typer prints in parentheses
)
DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."
DTYPE_HELP = (
    "auto: fp16 on CUDA; on a CPU bf16 where it has native bf16 (AMX-BF16 or AVX512-BF16), else fp32. "
    "int8: the Linear layers in int8 (CPU only). fp16/bf16 run on any CPU, but slowly without native units."
)
DECODE_HELP = "fast: JPEGs 4x larger than the model's input decode at reduced scale (12 MP photos: 2.5x faster). auto: exact with fp32, else fast."
EXACT_HELP = "fp32 and exact decoding: transformers' numbers (same as --dtype fp32 --decode exact)."
ATTN_HELP = "Attention kernel: auto (= sdpa), eager (reference math), sdpa (torch fused), flash (flash-attn; CUDA, fp16/bf16)."
FORMAT_HELP = "auto: a table on a terminal, JSON lines when piped."

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", metavar="NAME|FOLDER", envvar="SIGLIP_MODEL", help=MODEL_HELP, show_default=False, rich_help_panel="Model"),
]
DeviceOpt = Annotated[str, typer.Option("--device", metavar="DEVICE", help=DEVICE_HELP, rich_help_panel="Model")]
DTypeOpt = Annotated[DType, typer.Option("--dtype", metavar=choices(DType), help=DTYPE_HELP, rich_help_panel="Model")]
AttnOpt = Annotated[Attn, typer.Option("--attn", metavar=choices(Attn), help=ATTN_HELP, rich_help_panel="Model")]
DecodeOpt = Annotated[Decode, typer.Option("--decode", metavar=choices(Decode), help=DECODE_HELP, rich_help_panel="Model")]
ExactOpt = Annotated[bool, typer.Option("--exact", metavar="", help=EXACT_HELP, rich_help_panel="Model")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", metavar="", help="Say on stderr how the model runs: device, dtype (and why auto chose it), decoding, attention.", rich_help_panel="Model")]
BatchOpt = Annotated[
    Optional[int],
    typer.Option("--batch-size", "-b", metavar="N", min=1, help="Images per model call (default: 16 on CPU, 128 on CUDA).", rich_help_panel="Model"),
]
WorkersOpt = Annotated[
    Optional[int],
    typer.Option("--workers", metavar="N", min=0, help="Threads decoding images ahead of the model (default: 1 on CPU, cores up to 16 on a GPU; 0 = none).", rich_help_panel="Model"),
]
OfflineOpt = Annotated[
    bool,
    typer.Option("--offline", metavar="", help="Never use the network: hub ids must already be in the local cache (as HF_HUB_OFFLINE=1).", rich_help_panel="Model"),
]
NoCacheOpt = Annotated[
    bool, typer.Option("--no-cache", metavar="", help="Do not read or write the on-disk cache of label embeddings.", rich_help_panel="Model")
]
MaxPatchesOpt = Annotated[
    Optional[int],
    typer.Option(
        "--max-patches", metavar="N", min=1, max=MAX_PATCH_BUDGET, show_default=False, rich_help_panel="Model",
        help="SigLIP 2 NaFlex models: the most patches per image (default: the checkpoint's max_num_patches, "
             "256 for the released ones). Images keep their aspect ratio; more patches keep more detail and cost "
             "more time.",
    ),
]
MaxPixelsOpt = Annotated[
    int,
    typer.Option("--max-pixels", metavar="PIXELS", min=1, help="Refuse images with more pixels than this (decompression bombs).", rich_help_panel="Input"),
]
VIDEO_PANEL = "Video (needs pip install 'siglip-cli\\[video]')"
VideoOpt = Annotated[bool, typer.Option(
    "--video", metavar="", rich_help_panel=VIDEO_PANEL,
    help="Folders also give their videos (.mp4 .mov .m4v .mkv .webm .avi). A video named as a file, or matched by a "
         "pattern, is always read. Each sampled frame is an input named clip.mp4#t=SECONDS.")]
EveryOpt = Annotated[float, typer.Option(
    "--every", metavar="SECONDS", min=0.01, rich_help_panel=VIDEO_PANEL,
    help="Sample one frame every SECONDS of video, from 0.")]
ScenesOpt = Annotated[bool, typer.Option(
    "--scenes", metavar="", rich_help_panel=VIDEO_PANEL,
    help="One frame per shot instead of --every: a new shot where consecutive frames differ enough, at least "
         "--min-gap apart. Decodes every frame (slower than --every).")]
MinGapOpt = Annotated[float, typer.Option(
    "--min-gap", metavar="SECONDS", min=0.0, rich_help_panel=VIDEO_PANEL, help="--scenes: the shortest shot.")]
MaxFramesOpt = Annotated[Optional[int], typer.Option(
    "--max-frames", metavar="N", min=1, rich_help_panel=VIDEO_PANEL,
    help="At most N frames per video: --every spreads N samples over a longer video; --scenes keeps the first N shots.")]
RecursiveOpt = Annotated[bool, typer.Option("--recursive", "-r", metavar="", help="Also take images from sub-folders.", rich_help_panel="Input")]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", metavar=choices(Format), help=FORMAT_HELP, rich_help_panel="Output")]
ListFormatOpt = Annotated[ListFormat, typer.Option("--format", "-f", metavar=choices(ListFormat), help=FORMAT_HELP + " paths: one path per line, for xargs and image viewers (see --null).", rich_help_panel="Output")]
NullOpt = Annotated[bool, typer.Option("--null", "-0", metavar="", help="--format paths with each path ended by a NUL byte instead of a newline (xargs -0), so any file name passes.", rich_help_panel="Output")]
JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="Short for --format json.", rich_help_panel="Output")]
TemplateOpt = Annotated[
    Optional[List[str]],
    typer.Option("--template", "-t", metavar="TEMPLATE", help="Prompt template with {} for the label; give several for a prompt ensemble.", rich_help_panel="Labels"),
]
NoTemplateOpt = Annotated[bool, typer.Option("--no-template", metavar="", help="Use the texts as the prompts, as typed.", rich_help_panel="Labels")]
TextsFileOpt = Annotated[Optional[List[Path]], typer.Option("--texts-file", metavar="FILE", help="A file with one text per line.", rich_help_panel="Texts")]

ServerOpt = Annotated[
    Optional[str],
    typer.Option("--server", metavar="URL", envvar="SIGLIP_SERVER", show_default=False, rich_help_panel="Model",
                 help="Send the work to a running `siglip serve` at URL (its token from SIGLIP_TOKEN) instead of "
                      "loading the model here; the output is the same. Down, or serving another model: exit 4."),
]

RAY_PANEL = "Scale out (--engine ray)"


def _ray_option(flag: str, metavar: str, help: str, **limits):
    return typer.Option(flag, metavar=metavar, help=help, rich_help_panel=RAY_PANEL, **limits)


EngineOpt = Annotated[EngineKind, _ray_option(
    "--engine", choices(EngineKind), "local: this process. ray: a Ray cluster (RAY_ADDRESS, else a local one started for the run); "
    "input paths must be readable on every node. Needs pip install 'siglip-cli\\[ray]'.")]  # \\[ so Rich does not read [ray] as markup
WorkersPerNodeOpt = Annotated[Optional[int], _ray_option(
    "--workers-per-node", "N", "Actors per node, each loading the model once (default: one per GPU; one per CPU-only node, "
    "using all its cores).", min=1)]
GpusPerWorkerOpt = Annotated[Optional[float], _ray_option(
    "--gpus-per-worker", "GPUS", "GPUs per actor (default 1 where the cluster has GPUs; 0.5 puts two actors on a GPU; "
    "0 runs on CPUs).", min=0.0)]
CpusPerWorkerOpt = Annotated[Optional[float], _ray_option(
    "--cpus-per-worker", "CORES", "CPU cores per actor (default: a node's cores shared among its actors; on GPU actors they "
    "decode images).", min=0.5)]
ShardSizeOpt = Annotated[Optional[int], _ray_option(
    "--shard-size", "N", "Inputs per shard, the unit of work, retry and --resume (default: about 1/256 of the inputs, "
    "16 to 4096).", min=1)]


class ModelOptions:
    """The options of every command that loads the model, gathered once per command."""

    def __init__(self, model, device, dtype, attn, batch_size=None, workers=None, offline=False, max_pixels=100_000_000,
                 no_cache=False, max_patches=None, decode="auto", exact=False, verbose=False, video=False, every=2.0,
                 scenes=False, min_gap=1.0, max_frames=None, server=None):
        self.model = model
        self.device = device
        self.dtype = dtype.value if isinstance(dtype, Enum) else dtype
        self.attn = attn.value if isinstance(attn, Enum) else attn
        self.batch_size = batch_size
        self.workers = workers
        self.offline = offline
        self.max_pixels = max_pixels
        self.use_cache = not no_cache
        self.max_patches = max_patches
        self.decode = decode.value if isinstance(decode, Enum) else decode
        self.exact = exact
        self.verbose = verbose
        self.video = video  # folders give their videos too
        self.every = every
        self.scenes = scenes
        self.min_gap = min_gap
        self.max_frames = max_frames
        self.server = server

    def video_sampling(self):
        """The video options as core.video's VideoSampling (imported here, not at --help)."""
        from ..core.video import VideoSampling

        return VideoSampling(every=self.every, scenes=self.scenes, max_frames=self.max_frames, min_gap=self.min_gap)


# Every model command's options, by the name ModelOptions takes them under: (type, default).
MODEL_OPTIONS = {
    "model": (ModelOpt, None),
    "device": (DeviceOpt, "auto"),
    "dtype": (DTypeOpt, DType.auto),
    "decode": (DecodeOpt, Decode.auto),
    "exact": (ExactOpt, False),
    "attn": (AttnOpt, Attn.auto),
    "batch_size": (BatchOpt, None),
    "workers": (WorkersOpt, None),
    "offline": (OfflineOpt, False),
    "max_pixels": (MaxPixelsOpt, 100_000_000),
    "no_cache": (NoCacheOpt, False),
    "max_patches": (MaxPatchesOpt, None),
    "verbose": (VerboseOpt, False),
    "video": (VideoOpt, False),
    "every": (EveryOpt, 2.0),
    "scenes": (ScenesOpt, False),
    "min_gap": (MinGapOpt, 1.0),
    "max_frames": (MaxFramesOpt, None),
    "server": (ServerOpt, None),
}


def model_options(exclude: tuple[str, ...] = ()):
    """Give a Typer command every model option (but `exclude`), declared once here; the command
    receives them gathered in its `options: ModelOptions` parameter. Typer reads a command's
    options from its signature, so the wrapper shows the command's own parameters plus these."""

    def decorate(command):
        names = [name for name in MODEL_OPTIONS if name not in exclude]
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "options"]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=MODEL_OPTIONS[name][1],
                                   annotation=MODEL_OPTIONS[name][0]) for name in names]

        @functools.wraps(command)
        def wrapper(**kwargs):
            return command(options=ModelOptions(**{name: kwargs.pop(name) for name in names}), **kwargs)

        wrapper.__signature__ = inspect.Signature([*own, *added])
        wrapper.__annotations__ = {p.name: p.annotation for p in (*own, *added)}
        del wrapper.__wrapped__  # Typer must see the wrapper's signature, not the command's
        return wrapper

    return decorate


# ----------------------------------------------------------------------------- --help, completion
# Typer >= 0.29 prints a type placeholder (<bool>) beside its own --help and completion flags; ours
# are declared like every other flag (metavar="") and do what Typer's own do.
def _show_help(ctx: typer.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        typer.echo(ctx.get_help(), color=ctx.color)
        raise typer.Exit()


HelpOpt = Annotated[bool, typer.Option("--help", "-h", metavar="", is_eager=True, expose_value=False, callback=_show_help,
                                       help="Show this message and exit.")]


def _completion_option(flag: str, action: str):
    from typer import completion

    callback = completion.install_callback if action == "install" else completion.show_callback
    help = ("Install completion for the current shell." if action == "install"
            else "Show completion for the current shell, to copy it or customize the installation.")
    return typer.Option(flag, metavar="", is_eager=True, expose_value=False, callback=callback, help=help)


InstallCompletionOpt = Annotated[bool, _completion_option("--install-completion", "install")]
ShowCompletionOpt = Annotated[bool, _completion_option("--show-completion", "show")]


def help_option(command):
    """Give a Typer command our --help/-h (declare the command with add_help_option=False)."""
    own = list(inspect.signature(command, eval_str=True).parameters.values())
    added = inspect.Parameter("show_help", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=HelpOpt)

    @functools.wraps(command)
    def wrapper(**kwargs):
        kwargs.pop("show_help", None)
        return command(**kwargs)

    wrapper.__signature__ = inspect.Signature([*own, added])
    wrapper.__annotations__ = {p.name: p.annotation for p in (*own, added)}
    if hasattr(wrapper, "__wrapped__"):
        del wrapper.__wrapped__  # Typer must see the wrapper's signature
    return wrapper
