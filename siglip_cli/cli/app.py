"""The `siglip` command: Typer wiring only. Each command parses its flags, runs its module
(classify.py, embed.py, similarity.py, search.py, info.py, bench.py), and hands the results to render.

torch and the model load inside the commands that need them, so `siglip --help`, every
command's `--help` and shell completion never import torch. Errors a user can fix are one line
on stderr with an exit code by kind (EXIT_CODES); only bugs keep a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Iterator, List, Optional

import typer

from .. import __version__
from ..core.errors import BackendUnavailable, InputError, ModelUnavailable, OutputError, SiglipError, UsageError
from .options import (
    DEFAULT_MODEL,
    HelpOpt,
    InstallCompletionOpt,
    ShowCompletionOpt,
    choices,
    help_option,
    Attn,
    AttnOpt,
    CpusPerWorkerOpt,
    DType,
    DeviceOpt,
    EngineKind,
    EngineOpt,
    Format,
    FormatOpt,
    GpusPerWorkerOpt,
    JsonOpt,
    ListFormat,
    ListFormatOpt,
    MaxPatchesOpt,
    MaxPixelsOpt,
    ModelOpt,
    ModelOptions,
    NoCacheOpt,
    NoTemplateOpt,
    NullOpt,
    OfflineOpt,
    OutDType,
    RecursiveOpt,
    ServerOpt,
    SortAction,
    DedupeLevel,
    KeepRule,
    NeighbourMethod,
    ShardSizeOpt,
    TemplateOpt,
    TextsFileOpt,
    WorkersPerNodeOpt,
    model_options,
)
from .terminal import activity, end_activity, error_line, note, progress_bar, status, truncation_note

EXIT_CODES = {UsageError: 2, ModelUnavailable: 3, BackendUnavailable: 4, InputError: 1, OutputError: 1}
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT); SIGTERM gives 143, as a shell reports 128 + the signal
_interrupted = False  # set by Ctrl-C or SIGTERM: whatever exception follows it is the interrupt's doing
_interrupt_signal = 2  # which of them
_stdout_gone = False  # set when stdout's reader left (a closed pipe) or stdout failed
_command_started: float | None = None  # when the command began: `wrote ... in N s` is the whole run
_process_started: float | None = None  # perf_counter() at the process's start, when run from the entry point


def process_age() -> float | None:
    """Seconds since this process started (interpreter start-up and imports included), from
    /proc on Linux; None elsewhere."""
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def on_interrupt(signum, frame) -> None:
    """SIGINT and SIGTERM handler: remember it, then interrupt as Python does for Ctrl-C. A
    KeyboardInterrupt that lands inside an import can surface as another exception (TypeError,
    ImportError); the flag lets us still report it as what it is. SIGTERM is treated like
    Ctrl-C: finished rows are committed and kept for --resume, temporaries removed."""
    global _interrupted, _interrupt_signal
    if not _interrupted:
        _interrupt_signal = signum
    _interrupted = True
    raise KeyboardInterrupt


def interrupted_exit_code() -> int:
    """130 after Ctrl-C, 143 after SIGTERM (128 + the signal's number)."""
    return 128 + int(_interrupt_signal)


def _interruption() -> str:
    return "terminated (SIGTERM)" if _interrupt_signal == 15 else "interrupted"


class _Siglip(typer.Typer):
    """Typer, with our --help/-h on every command (options.help_option): Typer's own shows a type
    placeholder (<bool>) from 0.29 on. A command declared with plain @app.command() gets it."""

    def command(self, *args, **kwargs):
        kwargs.setdefault("add_help_option", False)
        register = super().command(*args, **kwargs)
        return lambda function: register(help_option(function))


app = _Siglip(
    name="siglip",
    help="Zero-shot image classification, embeddings, similarity and search with Google's SigLIP.",
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    add_help_option=False,  # ours, and the completion flags, are declared in main_callback (options.HelpOpt)
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"siglip-cli {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", metavar="", callback=_version, is_eager=True, help="Print the version.")] = False,
    install_completion: InstallCompletionOpt = False,
    show_completion: ShowCompletionOpt = False,
    show_help: HelpOpt = False,
) -> None:
    """Zero-shot image classification, embeddings, similarity and search with Google's SigLIP.

    Scores are SigLIP's own: sigmoid(exp(t) * cosine + b) per image-text pair. Results go to stdout (a table on a terminal, JSON lines when piped); logs and progress to stderr.

    Exit status: 0 success (also when a reader such as `head` closes the pipe early), 1 some inputs failed or an output could not be written, 2 usage error, 3 model unavailable, 4 device or backend unavailable, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM; like Ctrl-C, finished rows are kept for --resume).
    """


# ----------------------------------------------------------------------------- plumbing
def exit_code(exc: SiglipError) -> int:
    for kind, code in EXIT_CODES.items():
        if isinstance(exc, kind):
            return code
    return 1


class _Interrupted(Exception):
    """Ctrl-C, after the command's own clean-up (finished rows are committed by then)."""


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """User-fixable errors -> one line on stderr and their exit code; Ctrl-C -> 130, SIGTERM -> 143. On a
    terminal, a spinner says what the command is doing from its first moment (terminal.activity)."""
    global _command_started
    _command_started = _process_started if _process_started is not None else time.perf_counter()
    activity("starting")
    try:
        yield
    except typer.Exit:
        raise  # a command's own exit code (130 after it said what Ctrl-C kept), not an error
    except KeyboardInterrupt:
        raise _Interrupted() from None
    except SiglipError as exc:
        if _interrupted:
            raise _Interrupted() from None
        error_line(str(exc))
        raise typer.Exit(exit_code(exc)) from None
    except BrokenPipeError:
        # `siglip classify ... | head -1`: the reader has what it wanted; a success, documented
        _silence_stdout()
        raise typer.Exit(0) from None
    except MemoryError:
        error_line("out of memory; try a smaller --batch-size")
        raise typer.Exit(4) from None
    except OSError as exc:
        if _interrupted:
            raise _Interrupted() from None
        if exc.errno == errno.EPIPE:
            _silence_stdout()
            raise typer.Exit(0) from None
        where = exc.filename or "standard output"
        error_line(f"{where}: cannot write ({exc.strerror or exc})")
        if exc.filename is None:
            _silence_stdout()
        raise typer.Exit(1) from None
    except Exception as exc:
        if _interrupted:
            raise _Interrupted() from None
        if type(exc).__name__ == "OutOfMemoryError":  # torch's (CUDA), without importing torch here
            error_line(f"the device ran out of memory ({str(exc).splitlines()[0]}); try a smaller --batch-size")
            raise typer.Exit(4) from None
        raise
    finally:
        end_activity()


def load_engine(options: ModelOptions, model: str | None = None):
    if options.server:
        from ..remote import connect

        engine = connect(options.server, model or options.model, options.dtype, options.exact, options.video_sampling())
        if options.verbose:
            note(describe_run(engine, options))
        return engine
    from ..engine import load
    from ..runtime import keep_freed_memory

    keep_freed_memory()
    with status("loading the model"):
        engine = load(
            model or options.model,
            device=options.device,
            dtype=options.dtype,
            attn=options.attn,
            offline=True if options.offline else None,
            batch_size=options.batch_size,
            workers=options.workers,
            max_pixels=options.max_pixels,
            use_cache=options.use_cache,
            max_patches=options.max_patches,
            decode=options.decode,
            exact=options.exact,
            video=options.video_sampling(),
        )
    activity("warming up: the weights and the first batch")
    engine.on_truncated = lambda texts, length: note(truncation_note(texts, length))
    if options.verbose:
        note(describe_run(engine, options))
    return engine


def describe_run(engine, options: ModelOptions) -> str:
    """One line for --verbose: how the model runs, and why where `auto` chose."""
    from ..runtime import resolve_precision

    dtype, decode = engine.precision, engine.decode
    if options.dtype == "auto" and not options.exact:
        dtype += f" (auto: {resolve_precision('auto', engine.device).reason})"
    if options.decode == "auto" and not options.exact:
        decode += " (auto: exact with fp32, else fast)"
    threads = f"{engine.workers} decode thread{'s' if engine.workers != 1 else ''}"
    budget = ""
    if engine.config.vision.naflex:
        why = "--max-patches" if options.max_patches is not None else "the checkpoint's max_num_patches"
        budget = f"; patch budget {engine.config.preprocess.max_num_patches} ({why})"
    return (f"model {engine.resolved.name} (revision {engine.resolved.revision}) on {engine.device}; dtype {dtype}; "
            f"decode {decode}; attn {engine.attn}; batch {engine.batch_size}; {threads}{budget}")


def output_format(fmt: Format, json_flag: bool, null: bool = False) -> str:
    """The format to print in; `paths0` is --format paths ended by NUL bytes (--null)."""
    from .render import resolve_format

    if json_flag:
        if fmt.value not in ("auto", "json") or null:
            raise UsageError(f"--json and {'--null' if null else '--format'} disagree; give one of them")
        return "json"
    if null:
        if fmt.value not in ("auto", "paths"):
            raise UsageError(f"--null prints paths; it does not go with --format {fmt.value}")
        return "paths0"
    return resolve_format(fmt.value)


def list_inputs(arguments: list[str], recursive: bool, videos: bool = False):
    """The inputs, with a hint when paths are about to be read from a terminal."""
    from ..sources import expand

    if "-" in arguments and sys.stdin.isatty():
        end_activity()  # the user types here
        note("reading image paths from the terminal, one per line; end with Ctrl-D")
    else:
        activity("listing inputs")
    listing = expand(arguments, recursive=recursive, videos=videos)
    if listing.duplicates:
        note(f"{listing.duplicates} input(s) were named more than once; each is used once")
    return listing


def read_texts(texts: list[str] | None, files: list[Path] | None) -> list[str]:
    from ..prompts import read_lines

    out = list(texts or [])
    for path in files or []:
        out += [line for line in read_lines(path, "texts file") if line.strip()]
    return out


def _summarize_failures(failed: int, total: int) -> None:
    if failed and total > 1:
        note(f"{failed} of {total} inputs failed")


# ----------------------------------------------------------------------------- classify
@app.command()
@model_options()
def classify(
    images: Annotated[Optional[List[str]], typer.Argument(metavar="IMAGE", hidden=True, help="Image files, folders, glob patterns, http(s) URLs, or - to read paths from stdin.", show_default=False)] = None,
    labels: Annotated[Optional[List[str]], typer.Option("--labels", "-l", metavar="LABELS", help='Comma-separated labels, e.g. "2 cats,2 dogs"; a label holding commas goes in double quotes.', rich_help_panel="Labels")] = None,
    label: Annotated[Optional[List[str]], typer.Option("--label", metavar="LABEL", help="One label, commas kept (repeatable).", rich_help_panel="Labels")] = None,
    labels_file: Annotated[Optional[List[Path]], typer.Option("--labels-file", metavar="FILE", help="A file with one label per line.", rich_help_panel="Labels")] = None,
    examples: Annotated[Optional[Path], typer.Option("--examples", metavar="DIR", help="A folder with one sub-folder of example images per label (2 or more each): each label's score adds the examples' vote to the text's (Tip-Adapter, weights chosen by leave-one-out on the examples, reported on stderr). Without --labels, the sub-folders are the labels.", rich_help_panel="Labels")] = None,
    template: TemplateOpt = None,
    no_template: NoTemplateOpt = False,
    softmax: Annotated[bool, typer.Option("--softmax", metavar="", help="Single-label mode: a softmax over the given labels (sums to 1) instead of SigLIP's independent sigmoid scores.", rich_help_panel="Scores")] = False,
    top_k: Annotated[Optional[int], typer.Option("--top-k", "-k", metavar="K", min=1, help="Keep only the best K labels per image.", rich_help_panel="Scores")] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", metavar="SCORE", min=0.0, max=1.0, help="Keep only labels scoring at least this.", rich_help_panel="Scores")] = None,
    recursive: RecursiveOpt = False,
    frames: Annotated[bool, typer.Option("--frames", metavar="", help="Videos: list every sampled frame in the table, not only each video's summary (JSON always has both).", rich_help_panel="Output")] = False,
    fmt: ListFormatOpt = ListFormat.auto,
    json_flag: JsonOpt = False,
    null: NullOpt = False,
    sort_into: Annotated[Optional[Path], typer.Option("--sort-into", metavar="DIR", help="Put each image into DIR/<best label>/ (DIR/_unsorted/ when no label passes --threshold). Never overwrites; every step is recorded in DIR/siglip-sort.jsonl first.", rich_help_panel="Act on the labels")] = None,
    multi: Annotated[bool, typer.Option("--multi", metavar="", help="With --sort-into: into the folder of every label that passes --threshold.", rich_help_panel="Act on the labels")] = False,
    action: Annotated[SortAction, typer.Option("--action", metavar=choices(SortAction), help="With --sort-into: copy, link (a hard link; a symbolic link where impossible, and says so) or move.", rich_help_panel="Act on the labels")] = SortAction.copy,
    dry_run: Annotated[bool, typer.Option("--dry-run", metavar="", help="With --sort-into: print the plan, change nothing.", rich_help_panel="Act on the labels")] = False,
    undo: Annotated[Optional[Path], typer.Option("--undo", metavar="DIR", help="Put back what --sort-into DIR did (moved files return, copies and links that still match are removed), or what --write-xmp did (the journal DIR it printed: sidecars get their old bytes back, new ones are removed).", rich_help_panel="Act on the labels")] = None,
    write_xmp: Annotated[bool, typer.Option("--write-xmp", metavar="", help="Write the labels that pass --threshold (or --top-k) as keywords into XMP sidecars beside the images (photo.jpg.xmp), merged into any sidecar already there; the images are never modified.", rich_help_panel="Act on the labels")] = False,
    xmp_prefix: Annotated[str, typer.Option("--xmp-prefix", metavar="PREFIX", help="With --write-xmp: the parent of the hierarchical keywords (lr:hierarchicalSubject PREFIX|label).", rich_help_panel="Act on the labels")] = "siglip",
    xmp_stem: Annotated[bool, typer.Option("--xmp-stem", metavar="", help="With --write-xmp: name sidecars photo.xmp (Lightroom, Capture One) instead of photo.jpg.xmp (darktable, digiKam, Immich).", rich_help_panel="Act on the labels")] = False,
    journal: Annotated[Optional[Path], typer.Option("--journal", metavar="DIR", help="With --write-xmp: keep the journal of the sidecar writes (and copies of the sidecars replaced) in DIR, for --undo DIR. Default: the --sort-into folder, else a new folder under ~/.local/state/siglip-cli/xmp/ ($SIGLIP_STATE_DIR, $XDG_STATE_HOME), printed at the end.", rich_help_panel="Act on the labels")] = None,
    options: ModelOptions = None,  # every model option: see options.model_options
) -> None:
    """Score images against labels (zero-shot).

    IMAGE: image files, folders, glob patterns, http(s) URLs, or - to read paths from stdin.

    Scores are SigLIP's per-label sigmoid probabilities: each label is judged on its own, so they do NOT sum to 100% (an image can match several labels, or none). Use --softmax to force a choice among the labels. Labels go through "This is a photo of {}." unless --template or --no-template says otherwise.

    [bold]Examples[/bold]

      siglip classify cat.jpg --labels "2 cats,2 dogs"

      find . -name '*.jpg' | siglip classify - --labels-file labels.txt --top-k 1

      siglip classify photos/ --labels "cat,dog" --threshold 0.1 --sort-into sorted/

      siglip classify --undo sorted/

      siglip classify photos/ --labels "beach,snow,city" --threshold 0.3 --write-xmp

      siglip classify photos/ --examples my-examples/     # my-examples/<label>/*.jpg

      siglip classify clip.mp4 --labels "a goal,a crowd" --every 1 --threshold 0.5
    """
    with handled():
        from .classify import ClassifyRequest, run as run_classify

        failed = run_classify(ClassifyRequest(
            images or [], labels or [], label or [], labels_file or [], template, no_template, softmax, top_k, threshold,
            recursive, fmt, json_flag, options, null=null, sort_into=sort_into, multi=multi, action=action.value, dry_run=dry_run,
            undo=undo, write_xmp=write_xmp, xmp_prefix=xmp_prefix, xmp_stem=xmp_stem, journal=journal, examples=examples, frames=frames,
        ))
    if failed:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- embed
@app.command()
@model_options(exclude=("no_cache",))
def embed(
    inputs: Annotated[Optional[List[str]], typer.Argument(metavar="IMAGE", hidden=True, help="Image files, folders (walked recursively, sorted), glob patterns, URLs, or - for paths on stdin.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="FILE", help="Output file: .npy (+ .paths.txt, .stamps.npy, .meta.json sidecars), .npz, .jsonl or .parquet.", rich_help_panel="Output")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", "-f", metavar="jsonl", help="jsonl: print {kind, path|text, embedding} lines to stdout instead of writing --out.", rich_help_panel="Output")] = None,
    out_dtype: Annotated[Optional[OutDType], typer.Option("--out-dtype", metavar=choices(OutDType), help="float32 (default) or float16, which halves the file.", rich_help_panel="Output", show_default=False)] = None,
    no_normalize: Annotated[bool, typer.Option("--no-normalize", metavar="", help="Write the raw tower outputs instead of L2-normalised rows.", rich_help_panel="Output")] = False,
    text: Annotated[Optional[List[str]], typer.Option("--text", metavar="TEXT", help="Also embed this text (repeatable); its row has kind text.", rich_help_panel="Texts")] = None,
    texts_file: TextsFileOpt = None,
    template: Annotated[Optional[List[str]], typer.Option("--template", "-t", metavar="TEMPLATE", help="Put each text into this template ({} = the text); several make an ensemble.", rich_help_panel="Texts")] = None,
    resume: Annotated[bool, typer.Option("--resume", metavar="", help="Continue an interrupted run from <out>.partial, skipping finished inputs.", rich_help_panel="Output")] = False,
    update: Annotated[Optional[str], typer.Option("--update", metavar="[=hash]", help="Bring --out up to date with the inputs (creating it if it does not exist yet): embed new or changed files, drop rows of files that are gone, keep the rest. Changed means another size or modification time; --update=hash compares content hashes.", rich_help_panel="Output", show_default=False)] = None,
    relative_to: Annotated[Optional[Path], typer.Option("--relative-to", metavar="DIR", help="With --update of a store written before paths were stored absolute: the folder its relative paths were typed in (default: the working folder or the store's folder, whichever matches the inputs).", rich_help_panel="Output", show_default=False)] = None,
    strict: Annotated[bool, typer.Option("--strict", metavar="", help="Stop at the first input that cannot be read, instead of skipping it.", rich_help_panel="Input")] = False,
    recursive: Annotated[bool, typer.Option("--recursive/--no-recursive", metavar="", help="Walk sub-folders.", rich_help_panel="Input")] = True,
    options: ModelOptions = None,  # every model option: see options.model_options
    engine_kind: EngineOpt = EngineKind.local,
    workers_per_node: WorkersPerNodeOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
    cpus_per_worker: CpusPerWorkerOpt = None,
    shard_size: ShardSizeOpt = None,
) -> None:
    """Embed images (and texts) into vectors on disk.

    IMAGE: image files, folders (walked recursively, sorted), glob patterns, URLs, or - for paths on stdin.

    Rows are L2-normalised float32 in input order (images, then texts). Every output has a <out>.meta.json with the model, settings and every skipped input with its reason. Files appear atomically when the run completes; Ctrl-C keeps finished batches in <out>.partial and --resume carries on from there. Two runs never write one output at once.

    [bold]Examples[/bold]

      siglip embed ./photos --out vecs.npy

      siglip embed ./photos --out vecs.npy --update     # later: only new or changed photos

      siglip embed ./photos --format jsonl | head -1

      RAY_ADDRESS=head:6379 siglip embed /shared/photos --out /shared/vecs.parquet --engine ray
    """
    with handled():
        from ..embedding import EmbedPlan
        from ..prompts import resolve_templates
        from ..store import check_output_path
        from .embed import (StrictStop, check_relative_to, embed_to_stdout, embed_to_store, previous_meta, refuse_foreign_file,
                            refuse_overwriting_inputs)

        # Every option is checked before the model loads: a mistake must not cost a whole run.
        if fmt is not None and fmt != "jsonl":
            hint = "; use --out vecs.npy (or .npz, .jsonl, .parquet) for files" if fmt in ("json", "csv", "table", "npy", "npz", "parquet") else ""
            raise UsageError(f"--format {fmt}: embed prints only jsonl to stdout{hint}")
        if out is None and fmt != "jsonl":
            raise UsageError("say where the vectors go: --out vecs.npy (or .npz, .jsonl, .parquet), or --format jsonl for stdout")
        if out is not None and fmt is not None:
            raise UsageError("give --out FILE or --format jsonl (stdout), not both")
        if options.server and out is not None:
            raise UsageError("--server embeds to stdout (--format jsonl); an --out file is written by a local run")
        if (resume or update) and out is None:
            raise UsageError("--resume and --update work on an --out file; JSON lines on stdout keep no state")
        if update not in (None, "mtime", "hash"):
            raise UsageError(f"--update={update}: use --update (size and modification time) or --update=hash (content)")
        check_relative_to(relative_to, update)
        if out is not None:
            check_output_path(out)
        from ..cluster import ClusterOptions

        cluster = ClusterOptions(workers_per_node, gpus_per_worker, cpus_per_worker, shard_size)
        check_engine_options(engine_kind, cluster, out, update, strict)
        templates = resolve_templates(template) if template else None
        if no_normalize and templates and len(templates) > 1:
            raise UsageError("--no-normalize needs a single template (an ensemble averages normalised embeddings)")
        if out is not None:  # the texts files now, the images once they are listed
            refuse_overwriting_inputs(out, EmbedPlan([]), texts_file or [])
        texts = read_texts(text, texts_file)
        listing = list_inputs(inputs or [], recursive, options.video)
        if not listing.sources and not texts:
            if listing.failures:
                for failure in listing.failures:
                    error_line(failure.error)
                raise InputError("nothing to embed: no readable images among the inputs")
            raise UsageError("nothing to embed: give image paths or folders, --text or --texts-file")
        plan = EmbedPlan.from_listing(listing, texts)
        if out is not None:
            refuse_overwriting_inputs(out, plan, [])
            refuse_foreign_file(out)
        base_meta = previous_meta(out, relative_to, plan) if update else {}
        # An update takes the model, its dtype, decode mode and patch budget from the store unless
        # told otherwise (a store made in fp16 on a GPU is refused, not silently mixed with fp32 rows).
        model_from_store = options.model is None and base_meta.get("model") is not None
        options.model = options.model or base_meta.get("model")
        options.dtype, options.decode = _update_precision(base_meta, options.dtype, options.decode, options.exact)
        options.max_patches = options.max_patches or base_meta.get("max_patches")
        dtype_name = (out_dtype.value if out_dtype else base_meta.get("dtype", "float32"))
        if engine_kind is EngineKind.ray:
            from ..core.video import is_video_name
            from .embed import embed_on_ray

            video = next((s.name for s in plan.images if is_video_name(s.name)), None)
            if video is not None:
                raise UsageError(f"{video}: video inputs do not run with --engine ray yet; embed videos with the local engine")

            report = embed_on_ray(options, plan, out, dtype_name, not no_normalize, templates, resume, cluster, progress_bar, note)
            _finish_embed(report, out)
            return
        try:
            engine = load_engine(options)
        except ModelUnavailable as exc:
            if not model_from_store:
                raise
            raise ModelUnavailable(f"--update: {out} was made with {options.model}, which is not found from here ({exc}); "
                                   "pass --model, or --relative-to DIR if it names a folder relative to where embed ran") from None
        if out is None:
            try:
                from . import render

                streaming_to_terminal = sys.stdout.isatty()
                with progress_bar(len(plan.images), "images", enabled=not streaming_to_terminal) as advance:
                    render.emit(embed_to_stdout(engine, plan, dtype_name, not no_normalize, templates, strict, note, advance), "jsonl", render.EMBED_VIEW)
            except StrictStop:
                note("stopped by --strict")
                raise typer.Exit(1) from None
            return
        report = embed_to_store(engine, plan, out, dtype_name, not no_normalize, templates, resume, update, strict,
                                progress_bar, note, relative_to=relative_to)
    _finish_embed(report, out)


def check_engine_options(engine_kind: EngineKind, cluster, out: Path | None, update: str | None, strict: bool) -> None:
    """--engine ray writes an --out file from shards; what it cannot do is refused before
    anything loads, and a missing Ray is named with the extra to install (exit 4)."""
    if engine_kind is EngineKind.local:
        given = [flag for flag, value in zip(("--workers-per-node", "--gpus-per-worker", "--cpus-per-worker", "--shard-size"), vars(cluster).values()) if value is not None]
        if given:
            raise UsageError(f"{given[0]} is an option of --engine ray")
        return
    if out is None:
        raise UsageError("--engine ray writes an --out file (.npy, .npz, .jsonl or .parquet); it does not stream to stdout")
    if update:
        raise UsageError("--update does not run with --engine ray; update with the local engine")
    if strict:
        raise UsageError("--strict does not run with --engine ray (workers skip bad files and go on); drop --strict")
    from ..cluster import import_ray

    import_ray()


def _update_precision(base_meta: dict, dtype, decode, exact: bool):
    """--update keeps the store's model dtype and decoding unless they are given: rows computed
    another way would not match the rows kept (a different choice is refused by name)."""
    if base_meta and not exact:
        if dtype == "auto" and base_meta.get("model_dtype"):
            dtype = base_meta["model_dtype"]
        if decode == "auto":
            decode = base_meta.get("decode", "exact")  # stores from before --decode decoded exactly
    return dtype, decode


def _finish_embed(report, out: Path) -> None:
    if report.interrupted_rows is not None:
        note(f"{_interruption()}: {report.interrupted_rows} rows kept in {report.partial}; run the same command with --resume to continue")
        raise typer.Exit(interrupted_exit_code())
    if report.stopped_by_strict:
        note("stopped by --strict; finished rows are kept, rerun with --resume after fixing the input")
        raise typer.Exit(1)
    summary = report.summary
    meta = summary.meta
    rate = f", {summary.computed / summary.elapsed:.1f} images/s" if summary.computed and summary.elapsed > 0 else ""
    parts = [f"{meta['image_rows']} image{'s' if meta['image_rows'] != 1 else ''}"] if meta["image_rows"] or not meta["text_rows"] else []
    if meta["text_rows"]:
        parts.append(f"{meta['text_rows']} text{'s' if meta['text_rows'] != 1 else ''}")
    reused = f"; {summary.reused} kept from before" if summary.reused else ""
    skipped = f"; skipped {meta['skipped_count']}, listed in {out}.meta.json" if meta["skipped_count"] else ""
    # the whole time, from the command's start: model loading and a Ray cluster's start included
    whole = time.perf_counter() - _command_started if _command_started is not None else summary.elapsed
    note(f"wrote {' and '.join(parts)} ({meta['dim']}-d {meta['dtype']}{reused}) to {out} in {max(whole, summary.elapsed):.1f} s{rate}{skipped}")
    if meta["skipped_count"]:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- similarity
@app.command()
@model_options()
def similarity(
    image: Annotated[Optional[List[str]], typer.Option("--image", "-i", metavar="IMAGE", help="Image file, folder, glob or URL (repeatable).", rich_help_panel="Inputs")] = None,
    text: Annotated[Optional[List[str]], typer.Option("--text", metavar="TEXT", help="A text (repeatable).", rich_help_panel="Inputs")] = None,
    texts_file: TextsFileOpt = None,
    template: Annotated[Optional[List[str]], typer.Option("--template", "-t", metavar="TEMPLATE", help="Put each text into this template first ({} = the text); several make an ensemble.", rich_help_panel="Inputs")] = None,
    rows: Annotated[str, typer.Option("--rows", metavar="all|images|texts", help="Which inputs are rows: all, images or texts.", rich_help_panel="Output")] = "all",
    cols: Annotated[str, typer.Option("--cols", metavar="all|images|texts", help="Which inputs are columns: all, images or texts.", rich_help_panel="Output")] = "all",
    recursive: RecursiveOpt = False,
    fmt: FormatOpt = Format.auto,
    json_flag: JsonOpt = False,
    options: ModelOptions = None,  # every model option: see options.model_options
) -> None:
    """Cosine similarity of images and texts, and SigLIP image-text probabilities.

    Every input is compared with every input (or --rows with --cols); each image-text pair also gets SigLIP's probability sigmoid(exp(t) * cosine + b). Texts are used as typed (no template) unless --template is given. JSON lines stream one cell per line.

    [bold]Examples[/bold]

      siglip similarity -i a.jpg -i b.jpg --text "a cat" --text "a dog"

      siglip similarity -i photos/ --texts-file captions.txt --rows images --cols texts --json
    """
    with handled():
        from ..prompts import resolve_templates
        from . import render
        from .similarity import GROUPS
        from .similarity import similarity as run_similarity

        for flag, value in (("--rows", rows), ("--cols", cols)):
            if value not in GROUPS:
                raise UsageError(f"{flag} {value}: choose all, images or texts")
        templates = resolve_templates(template) if template else None
        texts = read_texts(text, texts_file)
        listing = list_inputs(image or [], recursive, options.video) if image else None
        sources = listing.sources if listing else []
        if not image and not texts:
            raise UsageError("nothing to compare: give --image and/or --text")
        for flag, value in (("--rows", rows), ("--cols", cols)):
            if value == "images" and not image or value == "texts" and not texts:
                raise UsageError(f"{flag} {value}: no {value[:-1]} inputs were given")
        fmt_name = output_format(fmt, json_flag)
        from ..sources import Listing

        engine = load_engine(options)
        failed = 0

        def reported(results):
            nonlocal failed
            for result in results:
                if getattr(result, "error", None) is not None:
                    failed += 1
                    error_line(result.error)
                yield result

        with progress_bar(len(sources), "images", enabled=not (fmt_name == "jsonl" and sys.stdout.isatty())) as advance:
            results = list(reported(run_similarity(engine, listing or Listing(), texts, templates, rows, cols, advance)))
        render.emit(results, fmt_name, render.SIMILARITY_VIEW)
    if failed:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- search
@app.command()
def search(
    index: Annotated[Path, typer.Argument(metavar="INDEX", hidden=True, help="An index written by siglip embed: .npy (with its sidecars), .npz, .parquet or .jsonl.", show_default=False)],
    queries: Annotated[Optional[List[str]], typer.Argument(metavar="QUERY", hidden=True, help="Texts to search for; each gets its own ranking.", show_default=False)] = None,
    image: Annotated[Optional[List[str]], typer.Option("--image", "-i", metavar="IMAGE", help="Search for images like this one (a file, folder, pattern or URL; repeatable).", rich_help_panel="Queries")] = None,
    template: Annotated[Optional[List[str]], typer.Option("--template", "-t", metavar="TEMPLATE", help='Put each text query into this template ({} = the query; default "This is a photo of {}."); several make an ensemble.', rich_help_panel="Queries")] = None,
    no_template: Annotated[bool, typer.Option("--no-template", metavar="", help="Use the text queries as typed.", rich_help_panel="Queries")] = False,
    top_k: Annotated[int, typer.Option("--top-k", "-k", metavar="K", min=1, help="Hits per query.", rich_help_panel="Results")] = 10,
    threshold: Annotated[Optional[float], typer.Option("--threshold", metavar="SCORE", min=-1.0, max=1.0, help="Keep hits scoring at least this: SigLIP's probability for a text-image pair, the cosine for an image-image or text-text pair (which SigLIP gives no probability).", rich_help_panel="Results")] = None,
    texts: Annotated[bool, typer.Option("--texts", metavar="", help="Also search the index's text rows (from embed --text); by default only its images.", rich_help_panel="Results")] = False,
    preview: Annotated[bool, typer.Option("--preview", metavar="", help="Show thumbnails of the hits, in terminals that draw images (kitty graphics or sixel: kitty, iTerm2, WezTerm, foot, xterm -ti vt340...). Needs textual-image: pip install 'siglip-cli\\[preview]'.", rich_help_panel="Results")] = False,
    per_video: Annotated[Optional[int], typer.Option("--per-video", metavar="N", min=1, help="At most N hits (frames) from any one video; the next best rows fill the ranking.", rich_help_panel="Results")] = None,
    fmt: ListFormatOpt = ListFormat.auto,
    json_flag: JsonOpt = False,
    null: NullOpt = False,
    model: Annotated[Optional[str], typer.Option("--model", "-m", metavar="NAME|FOLDER", help="The checkpoint that made the index, if it is not where the index's meta says (it must be the same revision).", rich_help_panel="Model", show_default=False)] = None,
    device: Annotated[str, typer.Option("--device", metavar="DEVICE", help="Where queries are embedded: cpu (default: one query is one forward pass, faster than starting a GPU), auto, cuda or mps.", rich_help_panel="Model")] = "cpu",
    dtype: Annotated[DType, typer.Option("--dtype", metavar=choices(DType), help="auto: the dtype that made the index.", rich_help_panel="Model")] = DType.auto,
    attn: AttnOpt = Attn.auto,
    offline: OfflineOpt = False,
    max_pixels: MaxPixelsOpt = 100_000_000,
    no_cache: NoCacheOpt = False,
    server: ServerOpt = None,
) -> None:
    """Find the images of an index closest to texts or images.

    INDEX: a file written by siglip embed (.npy with its sidecars, .npz, .parquet or .jsonl). QUERY: texts to search for; each gets its own ranking.

    Every row is compared with every query (exact search; fine to about 10 million rows). Queries are embedded by the model that made the index (its meta says which): text queries go through the template, like classify's labels, and come from the on-disk cache when they were asked before, so the model is not even loaded. A text query's hits are scored by SigLIP's probability that the image matches the text.

    [bold]Examples[/bold]

      siglip embed ./photos --out photos.npy

      siglip search photos.npy "a red car" "a dog on a beach" --top-k 5

      siglip search photos.npy --image ./photos/beach.jpg --json
    """
    with handled():
        from ..prompts import resolve_templates
        from ..queries import IndexModel
        from ..store import open_store
        from . import render
        from .search import check_text_queries
        from .search import search as run_search

        texts_given = list(queries or [])
        if not texts_given and not image:
            raise UsageError("nothing to search for: give text queries after the index, or --image FILE")
        check_text_queries(texts_given)
        templates = resolve_templates(template, use_template=not no_template)
        fmt_name = output_format(fmt, json_flag, null)
        if fmt_name in ("paths", "paths0") and texts:
            raise UsageError("--format paths lists image files; --texts adds text rows, which are not paths: drop one of them")
        listing = list_inputs(image, recursive=False) if image else None
        if server:
            from ..remote import remote_search

            if per_video is not None:
                raise UsageError("--per-video is applied by a local search; leave out --server or --per-video")
            results = remote_search(server, index, texts_given, template, no_template, listing, top_k, threshold, texts)
        else:
            store = open_store(index)
            if store.path.suffix == ".jsonl":
                note(f"{index}: .jsonl is an exchange format, read whole into memory to be searched; "
                     "for an index, embed to .npy, .npz or .parquet")
            index_model = IndexModel(index, store.meta, model, device, dtype.value, attn.value, offline, not no_cache, max_pixels)
            index_model.on_truncated = lambda texts, length: note(truncation_note(texts, length))  # as classify says it
            activity("searching")
            results = list(run_search(store, index_model, texts_given, templates, listing, top_k, threshold, texts, per_video))
            end_activity()
        failed = [r for r in results if r.error is not None]
        for result in failed:
            error_line(result.error)
        if preview:
            from .preview import emit_with_thumbnails

            emit_with_thumbnails(results, fmt_name, note)
        else:
            render.emit(results, fmt_name, render.SEARCH_VIEW, note=note)
        _summarize_failures(len(failed), len(results))
    if failed:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- info
@app.command()
def info(
    index: Annotated[Path, typer.Argument(metavar="INDEX", hidden=True, help="An index written by siglip embed: .npy (with its sidecars), .npz, .jsonl or .parquet.", show_default=False)],
    fmt: FormatOpt = Format.auto,
    json_flag: JsonOpt = False,
) -> None:
    """What an index holds and how it was made.

    INDEX: a file written by siglip embed (.npy with its sidecars, .npz, .parquet or .jsonl).

    Model and revision, model dtype, decoding, patch budget (SigLIP 2 NaFlex), rows by kind, vector size and dtype, whether paths are absolute, skipped inputs, when it was made, and its files with their sizes. Reads only the index, never the model.

    [bold]Examples[/bold]

      siglip info photos.npy

      siglip info photos.parquet --json | jq '.skipped'
    """
    with handled():
        from . import render
        from .info import index_info

        fmt_name = output_format(fmt, json_flag)
        render.emit([index_info(index)], fmt_name, render.INFO_VIEW)


# ----------------------------------------------------------------------------- dedupe
@app.command()
@model_options()
def dedupe(
    inputs: Annotated[Optional[List[str]], typer.Argument(metavar="IMAGE", hidden=True, help="Image or video files, folders (walked recursively, sorted; videos with --video), glob patterns, or - for paths on stdin. Optional with --index.", show_default=False)] = None,
    index: Annotated[Optional[Path], typer.Option("--index", metavar="FILE", help="An embedding store (.npy, .npz, .jsonl, .parquet). With IMAGEs it is made, or brought up to date first exactly as embed --update would; alone, it is used as it is.", rich_help_panel="Input", show_default=False)] = None,
    level: Annotated[DedupeLevel, typer.Option("--level", metavar=choices(DedupeLevel), help="How alike images must be: exact (the same bytes), near (the same picture re-encoded, resized, lightly edited; the default) or similar (also the same scene, e.g. burst shots).", rich_help_panel="Duplicates")] = DedupeLevel.near,
    threshold: Annotated[Optional[float], typer.Option("--threshold", metavar="COSINE", help="The cosine (with the kept image) that the chosen level needs, instead of its default (near 0.98, similar 0.90; see --histogram).", rich_help_panel="Duplicates", show_default=False)] = None,
    keep: Annotated[KeepRule, typer.Option("--keep", metavar=choices(KeepRule), help="Which file of a group is kept: largest (pixels, per frame for videos, then bytes), oldest or newest (EXIF DateTimeOriginal, else modification time; videos: modification time), or first (input order).", rich_help_panel="Duplicates")] = KeepRule.largest,
    histogram: Annotated[bool, typer.Option("--histogram", metavar="", help="Also print a histogram of every image's nearest-neighbour cosine with the thresholds marked, to pick a threshold for your library.", rich_help_panel="Output")] = False,
    neighbours: Annotated[NeighbourMethod, typer.Option("--neighbours", metavar=choices(NeighbourMethod), help="How neighbours are found: exact (every pair), approximate (a faiss index saved beside --index; pip install 'siglip-cli\\[ann]'), or auto (approximate above 25,000 images when faiss is installed).", rich_help_panel="Duplicates")] = NeighbourMethod.auto,
    move_to: Annotated[Optional[Path], typer.Option("--move-to", metavar="DIR", help="Move every duplicate (never a kept image) into DIR, at its path relative to the grouped files' common root. One file at a time, never overwriting (a numbered name instead), each move recorded in DIR/siglip-dedupe.jsonl before it happens. Nothing is ever deleted.", rich_help_panel="Act on the duplicates", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", metavar="", help="With --move-to: print where each duplicate would go; change nothing.", rich_help_panel="Act on the duplicates")] = False,
    undo: Annotated[Optional[Path], typer.Option("--undo", metavar="DIR", help="Put every file that --move-to DIR moved back where it was (also after an interrupted run).", rich_help_panel="Act on the duplicates", show_default=False)] = None,
    recursive: Annotated[bool, typer.Option("--recursive/--no-recursive", metavar="", help="Walk sub-folders.", rich_help_panel="Input")] = True,
    fmt: FormatOpt = Format.auto,
    json_flag: JsonOpt = False,
    options: ModelOptions = None,  # every model option: see options.model_options
) -> None:
    """Find duplicate and near-duplicate images and videos; a report unless --move-to says otherwise.

    IMAGE: image or video files, folders (walked recursively, sorted; their videos with --video), glob patterns, or - for paths on stdin; optional with --index.

    Each group is one kept image and its duplicates, each with its level (exact, near, similar) and its cosine with the kept image. An image joins a group only when it is within the threshold of that group's kept image, so chains (A like B, B like C) never glue A and C together. A summary line (groups, duplicates, the bytes they take) goes to stderr.

    A video is one item, the mean of its sampled frames' embeddings, named by its file and compared only with other videos (photos only with photos).

    [bold]Examples[/bold]

      siglip dedupe ./photos

      siglip dedupe ./photos --index photos.npy --keep oldest --json

      siglip dedupe --index photos.npy --level similar --histogram

      siglip dedupe ./photos --move-to ./duplicates --dry-run

      siglip dedupe --undo ./duplicates

      siglip dedupe ~/Videos --video --index videos.npz
    """
    with handled():
        from .dedupe import DedupeRequest, run as run_dedupe

        failed = run_dedupe(DedupeRequest(
            inputs or [], index, level.value, threshold, keep.value, histogram, neighbours.value, move_to, dry_run, undo,
            recursive, fmt, json_flag, options,
        ))
    if failed:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- serve
@app.command()
# the video sampling is each request's own (form fields with the CLI's defaults), not the server's
@model_options(exclude=("server", "video", "every", "scenes", "min_gap", "max_frames"))
def serve(
    indexes: Annotated[Optional[List[Path]], typer.Argument(metavar="INDEX", hidden=True, help="Indexes written by siglip embed, to search and browse; all made by one model, which is then the one served.", show_default=False)] = None,
    host: Annotated[str, typer.Option("--host", metavar="HOST", help="Address to listen on. Anything but loopback needs --token or --no-auth.", rich_help_panel="Server")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", metavar="PORT", help="Port (0: any free one; the one taken is printed).", rich_help_panel="Server")] = 8000,
    token: Annotated[Optional[str], typer.Option("--token", metavar="TOKEN", envvar="SIGLIP_TOKEN", help="Require 'Authorization: Bearer TOKEN' on /v1/ (health excepted).", rich_help_panel="Server", show_default=False)] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", metavar="", help="Serve a non-loopback --host without a token (a trusted network only; warned on start).", rich_help_panel="Server")] = False,
    max_upload: Annotated[float, typer.Option("--max-upload", metavar="MB", min=0.001, help="Largest request body, in megabytes (10^6 bytes); larger is refused with 413.", rich_help_panel="Server")] = 50.0,
    allow_urls: Annotated[bool, typer.Option("--allow-urls", metavar="", help="Let clients name image URLs for the server to fetch (off: no requests to other hosts on a client's behalf).", rich_help_panel="Server")] = False,
    window_ms: Annotated[float, typer.Option("--window-ms", metavar="MS", min=0.0, max=1000.0, help="How long the first image of a batch waits for others to join it (micro-batching; bounded by --batch-size).", rich_help_panel="Server")] = 5.0,
    queue_size: Annotated[int, typer.Option("--queue-size", metavar="N", min=1, help="Images waiting for the model at most; past it requests get 503 with Retry-After.", rich_help_panel="Server")] = 256,
    reload_index: Annotated[bool, typer.Option("--reload-index", metavar="", help="Check the indexes every 2 s and re-read those that embed --update replaced (SIGHUP does it at once).", rich_help_panel="Server")] = False,
    options: ModelOptions = None,  # every model option: see options.model_options
) -> None:
    """Keep the model warm behind an HTTP API and a web page to search and browse.

    INDEX: indexes written by siglip embed, to search and browse; all made by one model, which is then the one served.

    The JSON API under /v1/ (classify, embed, search, thumbnail, info, health) answers with exactly what the commands print with --json; its OpenAPI description is at /openapi.json and readable at /docs; the page at / searches the indexes. Needs the serve extra: pip install 'siglip-cli\\[serve]'.

    [bold]Examples[/bold]

      siglip serve photos.npy

      siglip serve photos.npy --host 0.0.0.0 --token "$(openssl rand -hex 16)"
    """
    with handled():
        from .serve import ServeSettings
        from .serve import serve as run_serve

        settings = ServeSettings(host=host, port=port, token=token, no_auth=no_auth, max_upload=int(max_upload * 1_000_000),
                                 allow_urls=allow_urls, batch_size=options.batch_size, window_ms=window_ms,
                                 queue_size=queue_size, reload_index=reload_index)
        code = run_serve(indexes or [], options, settings, load_engine)
    raise typer.Exit(code)


# ----------------------------------------------------------------------------- bench
@app.command()
def bench(
    model: ModelOpt = None,
    attn: Annotated[str, typer.Option("--attn", metavar="BACKEND,...", help="A backend, several comma-separated, or all.")] = "all",
    dtype: Annotated[str, typer.Option("--dtype", metavar="DTYPE,...", help="One or several of fp32, fp16, bf16, int8, auto, comma-separated. auto: fp16,bf16 on CUDA; on a CPU fp32 plus what --dtype auto picks there (bf16 with native bf16 units).")] = "auto",
    batch_sizes: Annotated[Optional[str], typer.Option("--batch-sizes", metavar="N,N,...", help="Comma-separated batch sizes (default: 1,4 on CPU; 1,32,128 on CUDA).")] = None,
    towers: Annotated[str, typer.Option("--towers", metavar="TOWER,...", help="What to time: vision, text, classify, comma-separated.")] = "vision,text,classify",
    seconds: Annotated[float, typer.Option("--seconds", metavar="SECONDS", min=0.05, help="Time budget for each row's timed runs (at least one run). Warm-up: the correctness run, plus two more for fast rows, fewer for slow ones.")] = 2.0,
    repeats: Annotated[int, typer.Option("--repeats", metavar="N", min=1, help="At most this many timed runs per row.")] = 10,
    device: DeviceOpt = "auto",
    peak_tflops: Annotated[Optional[float], typer.Option("--peak-tflops", metavar="TFLOPS", min=0.0, help="The device's peak TFLOP/s for this dtype, to print % of peak.")] = None,
    compare: Annotated[Optional[str], typer.Option("--compare", metavar="transformers", help="transformers: also time the reference SiglipModel on the same weights and inputs.")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", metavar="table|json|csv", help="table, json or csv (one record per row).")] = "table",
    max_patches: MaxPatchesOpt = None,
) -> None:
    """Time the attention backends, dtypes and batch sizes.

    Before timing, every backend's outputs are compared with eager's on the same inputs, and the largest difference is shown: a fast but wrong kernel is visible. It never downloads: without a local folder or a cached copy of the weights, the architecture is built from the built-in table with random weights, which times the same but scores nothing.

    [bold]Examples[/bold]

      siglip bench     # the default run; it says first roughly how long it takes

      siglip bench --attn sdpa --dtype fp16

      siglip bench --model ./my-checkpoint --compare transformers --batch-sizes 1,8 --format json
    """
    with handled():
        from . import render
        from .bench import make_options, plan_line, run_bench
        from ..runtime import keep_freed_memory

        if fmt not in ("table", "json", "csv"):
            raise UsageError(f"--format {fmt}: bench prints table, json or csv")
        options = make_options(model or DEFAULT_MODEL, attn, dtype, batch_sizes, towers, seconds, repeats, device, peak_tflops,
                               compare, max_patches)
        keep_freed_memory()
        note(plan_line(options))
        rows = run_bench(options, note)
        end_activity()
        render.emit(rows, fmt, render.BENCH_VIEW)


# ----------------------------------------------------------------------------- entry point
_COMMANDS = ("classify", "embed", "similarity", "search", "info", "dedupe", "bench", "serve")


def normalize_argv(args: list[str]) -> list[str]:
    """`siglip` or `siglip CMD` alone shows help, but `siglip bench` alone runs the default
    benchmark (every option has a default); `--update` alone means `--update=mtime` (an option
    whose value is optional, which Typer's public API cannot declare). So `--update hash`
    would embed a file named `hash`: it is refused, pointing at `--update=hash`."""
    if not args:
        return ["--help"]
    if len(args) == 1 and args[0] in _COMMANDS and args[0] != "bench":
        return [args[0], "--help"]
    options_end = args.index("--") if "--" in args else len(args)
    for position, arg in enumerate(args[: options_end - 1]):
        if arg == "--update" and args[position + 1] in ("hash", "mtime"):
            value = args[position + 1]
            raise UsageError(f"--update {value}: write --update={value} (with '='; a word after a space is an input, "
                             f"so to embed a file named {value}, write ./{value})")
    return ["--update=mtime" if a == "--update" and i < options_end else a for i, a in enumerate(args)]


def _click_error(exc: Exception) -> int | None:
    """Click's own usage errors (an unknown option, a value out of range), duck-typed so that no
    private module of Typer's is imported, as one line on stderr like every other error."""
    if type(exc).__name__ == "Abort" or isinstance(exc, typer.Abort):
        error_line("aborted")
        return 1
    code, format_message = getattr(exc, "exit_code", None), getattr(exc, "format_message", None)
    if not isinstance(code, int) or not callable(format_message):
        return None
    context = getattr(exc, "ctx", None)
    typed = getattr(exc, "option_name", None)
    if isinstance(typed, str) and hasattr(exc, "possibilities"):  # No such option: ours, not Click's loose guesses
        message = f"No such option: {typed}"
        close = close_options(typed, getattr(getattr(context, "command", None), "params", []))
        if close:
            message += f"; did you mean {' or '.join(close)}?"
    else:
        message = " ".join(str(format_message()).split())
    hint = f" (see '{context.command_path} --help')" if getattr(context, "command_path", None) else ""
    error_line(message + hint)
    return code


def close_options(typed: str, params) -> list[str]:
    """The options `typed` was probably meant to be: a near spelling (--verbos, --top_k) or the
    start of one (--thresh), never a distant one (Click offers --verbose for --bogus)."""
    import difflib

    names = sorted({name for param in params for name in getattr(param, "opts", []) if name.startswith("--")})
    wanted = typed.split("=", 1)[0]
    close = [name for name in names if difflib.SequenceMatcher(None, wanted, name).ratio() >= 0.8]
    if not close and len(wanted) >= 5:
        close = [name for name in names if name.startswith(wanted)]
    return close[:3]


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that nothing complains about a stdout that can no longer
    be flushed (a closed pipe, a full disk) when the process exits. Also marks the run as one
    whose reader is gone: `run` then leaves without the interpreter's shutdown (see
    _quiet_exit)."""
    global _stdout_gone
    _stdout_gone = True
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _quiet_exit(code: int) -> None:
    """Leave at once with `code` after stdout went away (`siglip classify ... | head -1`).

    Not through the interpreter's shutdown: results stopped mid-stream, so decode threads may
    still be inside Pillow or numpy with the GIL released. When such a daemon thread wants the
    GIL back during shutdown, Python 3.11-3.13 ends it with pthread_exit, whose forced unwind
    through numpy's C++ (noexcept) frames calls std::terminate: "terminate called without an
    active exception", exit 134, seen once under load. Our own files are closed or committed by
    now (each command's finally blocks have run); stderr is flushed here."""
    _silence_stdout()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def run(args: list[str] | None = None) -> None:
    global _process_started
    _process_started = time.perf_counter() - (process_age() or 0.0)
    # File names that are not valid UTF-8 must neither crash output nor be lost when read back.
    for stream, errors in ((sys.stdout, "backslashreplace"), (sys.stdin, "surrogateescape")):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=errors)
    try:
        args = normalize_argv(sys.argv[1:] if args is None else list(args))
    except UsageError as exc:
        error_line(str(exc))
        sys.exit(exit_code(exc))
    try:
        code = app(args=args, prog_name="siglip", standalone_mode=False)
        sys.stdout.flush()
    except BaseException as exc:
        if _interrupted or isinstance(exc, (KeyboardInterrupt, _Interrupted)):
            _exit_interrupted()
        if isinstance(exc, SystemExit):
            raise
        if isinstance(exc, BrokenPipeError):
            _quiet_exit(0)  # `siglip classify ... | head -1`: the reader left; a success, as documented
        if isinstance(exc, OSError):
            error_line(f"standard output: cannot write ({exc.strerror or exc})")
            _quiet_exit(1)
        code = _click_error(exc) if isinstance(exc, Exception) else None
        if code is None:
            raise
    if _interrupted:
        _exit_interrupted(announce=code != interrupted_exit_code())  # (a command that said so itself)
    if _stdout_gone:
        _quiet_exit(code if isinstance(code, int) else 0)
    sys.exit(code if isinstance(code, int) else 0)


def _exit_interrupted(announce: bool = True) -> None:
    """One line and 130 (143 for SIGTERM), whatever the interrupt broke on its way; os._exit so
    that nothing in the interpreter's shutdown can turn it into another code or a traceback."""
    if announce:
        error_line(_interruption())
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(interrupted_exit_code())
