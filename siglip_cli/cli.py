"""The `siglip` command. Each command is a thin layer: flags -> engine -> render.

torch and the model load inside the commands that need them, so `siglip --help`, every
command's `--help` and shell completion never import torch.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Annotated, Iterator, List, Optional

import typer

from . import __version__
from .errors import SiglipError, UsageError
from .options import ATTN_HELP, DEVICE_HELP, DTYPE_HELP, FORMAT_HELP, MODEL_HELP, Attn, DType, Format, OutDType

app = typer.Typer(
    name="siglip",
    help="Zero-shot image classification, embeddings and similarity with Google's SigLIP.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

DEFAULT_MODEL = "google/siglip-base-patch16-224"

# ----------------------------------------------------------------------------- shared options
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", envvar="SIGLIP_MODEL", help=MODEL_HELP, show_default=DEFAULT_MODEL, rich_help_panel="Model"),
]
DeviceOpt = Annotated[str, typer.Option("--device", help=DEVICE_HELP, rich_help_panel="Model")]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help=DTYPE_HELP, rich_help_panel="Model")]
AttnOpt = Annotated[Attn, typer.Option("--attn", help=ATTN_HELP, rich_help_panel="Model")]
BatchOpt = Annotated[
    Optional[int],
    typer.Option("--batch-size", "-b", min=1, help="Images per model call (default: 16 on CPU, 128 on CUDA).", rich_help_panel="Model"),
]
WorkersOpt = Annotated[
    Optional[int],
    typer.Option("--workers", min=0, help="Threads decoding images ahead of the model (default: 1 on CPU, cores up to 16 on a GPU; 0 = none).", rich_help_panel="Model"),
]
OfflineOpt = Annotated[
    bool,
    typer.Option("--offline", help="Never use the network: hub ids must already be in the local cache (as HF_HUB_OFFLINE=1).", rich_help_panel="Model"),
]
MaxPixelsOpt = Annotated[
    int,
    typer.Option("--max-pixels", min=1, help="Refuse images with more pixels than this (decompression bombs).", rich_help_panel="Input"),
]
RecursiveOpt = Annotated[bool, typer.Option("--recursive", "-r", help="Also take images from sub-folders.", rich_help_panel="Input")]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help=FORMAT_HELP, rich_help_panel="Output")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Short for --format json.", rich_help_panel="Output")]
TemplateOpt = Annotated[
    Optional[List[str]],
    typer.Option("--template", "-t", help="Prompt template with {} for the label; give several for a prompt ensemble.", rich_help_panel="Labels"),
]
NoCacheOpt = Annotated[
    bool, typer.Option("--no-cache", help="Do not read or write the on-disk cache of label embeddings.", rich_help_panel="Model")
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"siglip-cli {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """Zero-shot image classification, embeddings and similarity with Google's SigLIP.

    Scores are SigLIP's own: sigmoid(exp(t) * cosine + b) per image-label pair.
    Results go to stdout (a table on a terminal, JSON lines when piped); logs to stderr.
    """


# ----------------------------------------------------------------------------- plumbing
def _stderr_console():
    from .render import stderr_console

    return stderr_console()


_live_bar = None  # the progress bar on screen, if any: stderr lines must go through it


def _stderr_line(line: str) -> None:
    if _live_bar is not None:
        # printed above the bar by Rich, instead of being glued to the bar's line
        _live_bar.console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)
        return
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def error_line(message: str) -> None:
    _stderr_line(f"siglip: error: {message}")


def note(message: str) -> None:
    _stderr_line(f"siglip: {message}")


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """User-fixable errors -> one line on stderr and the error's exit code; Ctrl-C -> 130."""
    try:
        yield
    except SiglipError as exc:
        error_line(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        error_line("interrupted")
        raise typer.Exit(130) from None
    except MemoryError:
        error_line("out of memory; try a smaller --batch-size")
        raise typer.Exit(4) from None
    except RuntimeError as exc:  # torch.OutOfMemoryError (CUDA) without importing torch here
        if type(exc).__name__ != "OutOfMemoryError":
            raise
        error_line(f"the device ran out of memory ({str(exc).splitlines()[0]}); try a smaller --batch-size")
        raise typer.Exit(4) from None


def _load(model, device, dtype, attn, offline, batch_size=None, workers=None, max_pixels=None, use_cache=True):
    from .engine import load
    from .images import DEFAULT_MAX_PIXELS
    from .runtime import keep_freed_memory

    keep_freed_memory()
    return load(
        model,
        device=device,
        dtype=dtype.value,
        attn=attn.value,
        offline=True if offline else None,
        batch_size=batch_size,
        workers=workers,
        max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
        use_cache=use_cache,
    )


@contextlib.contextmanager
def progress_bar(total: int, what: str, enabled: bool = True):
    """A Rich progress bar on stderr, only when stderr is a terminal; yields an advance(n) function.
    Not when results stream to stdout on the same terminal: the records show the progress, and a
    bar redrawn between them would garble both."""
    global _live_bar
    console = _stderr_console()
    if not enabled or not console.is_terminal or total < 2:
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    ]
    # redirect_*=False: stdout carries results and must never pass through the bar
    with Progress(*columns, console=console, transient=True, redirect_stdout=False, redirect_stderr=False) as bar:
        _live_bar = bar
        task = bar.add_task(what, total=total, rate="")
        started = time.perf_counter()
        done = 0

        def advance(n: int = 1) -> None:
            nonlocal done
            done += n
            rate = done / max(time.perf_counter() - started, 1e-9)
            bar.update(task, advance=n, rate=f"{rate:.1f} {what}/s")

        try:
            yield advance
        finally:
            _live_bar = None


def _output_format(fmt: Format, json_flag: bool) -> str:
    from .render import resolve_format

    if json_flag:
        if fmt not in (Format.auto, Format.json):
            raise UsageError("--json and --format disagree; give one of them")
        return "json"
    return resolve_format(fmt.value)


# ----------------------------------------------------------------------------- classify
@app.command(no_args_is_help=True)
def classify(
    images: Annotated[List[str], typer.Argument(help="Image files, folders, glob patterns, http(s) URLs, or - to read paths from stdin.", show_default=False)],
    labels: Annotated[Optional[List[str]], typer.Option("--labels", "-l", help='Comma-separated labels, e.g. "2 cats,2 dogs".', rich_help_panel="Labels")] = None,
    label: Annotated[Optional[List[str]], typer.Option("--label", help="One label, commas kept (repeatable).", rich_help_panel="Labels")] = None,
    labels_file: Annotated[Optional[List[Path]], typer.Option("--labels-file", help="A file with one label per line.", rich_help_panel="Labels")] = None,
    template: TemplateOpt = None,
    no_template: Annotated[bool, typer.Option("--no-template", help="Use the labels as the prompts, as typed.", rich_help_panel="Labels")] = False,
    softmax: Annotated[bool, typer.Option("--softmax", help="Single-label mode: a softmax over the given labels (sums to 1) instead of SigLIP's independent sigmoid scores.", rich_help_panel="Scores")] = False,
    top_k: Annotated[Optional[int], typer.Option("--top-k", "-k", min=1, help="Keep only the best K labels per image.", rich_help_panel="Scores")] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", min=0.0, max=1.0, help="Keep only labels scoring at least this.", rich_help_panel="Scores")] = None,
    recursive: RecursiveOpt = False,
    fmt: FormatOpt = Format.auto,
    json_flag: JsonOpt = False,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.auto,
    attn: AttnOpt = Attn.auto,
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    offline: OfflineOpt = False,
    max_pixels: MaxPixelsOpt = 100_000_000,
    no_cache: NoCacheOpt = False,
) -> None:
    """Score images against labels (zero-shot).

    Scores are SigLIP's per-label sigmoid probabilities: each label is judged on its own, so
    they do NOT sum to 100% (an image can match several labels, or none). Use --softmax to
    force a choice among the labels. Labels go through "This is a photo of {}." unless
    --template or --no-template says otherwise.

    Exit status: 0 all scored, 1 some inputs failed (the rest are still printed), 2 usage error,
    3 model unavailable, 4 device or backend unavailable.
    """
    with handled():
        from .prompts import collect_labels, resolve_templates
        from .sources import expand

        label_set = collect_labels(labels or [], label or [], labels_file or [])
        for duplicate in label_set.duplicates:
            note(f"label {duplicate!r} given more than once; scored once")
        templates = resolve_templates(template, use_template=not no_template)
        output = _output_format(fmt, json_flag)
        sources = expand(images, recursive=recursive)
        if not sources:
            raise UsageError("no images given (stdin was empty)")
        engine = _load(model, device, dtype, attn, offline, batch_size, workers, max_pixels, use_cache=not no_cache)
        failed = _run_classify(engine, sources, label_set.labels, templates, softmax, top_k, threshold, output)
    if failed:
        raise typer.Exit(1)


def _run_classify(engine, sources, labels, templates, use_softmax, top_k, threshold, output) -> int:
    from . import render

    results = []
    failed = 0
    out = sys.stdout
    with progress_bar(len(sources), "images", enabled=not (output == "jsonl" and out.isatty())) as advance:
        scored = engine.iter_classify(
            [s.value for s in sources], [s.name for s in sources], labels, templates, use_softmax, top_k, threshold, advance
        )
        for result in scored:
            if result.error is not None:
                failed += 1
                error_line(result.error)
            if output == "jsonl":  # stream: a pipeline sees each image as soon as it is scored
                render.write_jsonl(render.classify_records([result]), out)
                out.flush()
            else:
                results.append(result)
    if output == "json":
        render.write_json(render.classify_records(results), out)
    elif output == "csv":
        render.write_classify_csv(render.classify_records(results), out)
    elif output == "table":
        render.stdout_console().print(render.classify_table(results, labels, "softmax" if use_softmax else "sigmoid"))
    if failed and len(sources) > 1:
        note(f"{failed} of {len(sources)} inputs failed")
    return failed


# ----------------------------------------------------------------------------- embed
@app.command(no_args_is_help=True)
def embed(
    inputs: Annotated[Optional[List[str]], typer.Argument(help="Image files, folders (walked recursively, sorted), glob patterns, URLs, or - for paths on stdin.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output file: .npy (+ .paths.txt, .meta.json), .npz or .jsonl.", rich_help_panel="Output")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", "-f", help="jsonl: print {path, embedding} lines to stdout instead of writing --out.", rich_help_panel="Output")] = None,
    out_dtype: Annotated[OutDType, typer.Option("--out-dtype", help="float16 halves the file size.", rich_help_panel="Output")] = OutDType.float32,
    no_normalize: Annotated[bool, typer.Option("--no-normalize", help="Write the raw tower outputs instead of L2-normalised rows.", rich_help_panel="Output")] = False,
    text: Annotated[Optional[List[str]], typer.Option("--text", help="Also embed this text (repeatable); its row is named text:<the text>.", rich_help_panel="Texts")] = None,
    texts_file: Annotated[Optional[Path], typer.Option("--texts-file", help="Also embed each line of this file.", rich_help_panel="Texts")] = None,
    template: Annotated[Optional[List[str]], typer.Option("--template", "-t", help="Put each text into this template ({} = the text); several make an ensemble.", rich_help_panel="Texts")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from <out>.partial, skipping finished inputs.", rich_help_panel="Output")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first input that cannot be read, instead of skipping it.", rich_help_panel="Input")] = False,
    recursive: Annotated[bool, typer.Option("--recursive/--no-recursive", help="Walk sub-folders.", rich_help_panel="Input")] = True,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.auto,
    attn: AttnOpt = Attn.auto,
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    offline: OfflineOpt = False,
    max_pixels: MaxPixelsOpt = 100_000_000,
) -> None:
    """Embed images (and texts) into vectors on disk.

    Rows are L2-normalised float32 in input order; `vecs.paths.txt` names the source of each row
    and `vecs.meta.json` records the model, settings and every skipped input with its reason.
    Files appear atomically when the run completes; Ctrl-C keeps finished batches in
    <out>.partial and --resume carries on from there.

    Exit status: 0 all embedded, 1 some inputs skipped (or --strict stopped), 2 usage error,
    3 model unavailable, 4 device or backend unavailable, 130 interrupted.
    """
    with handled():
        if out is None and fmt != "jsonl":
            raise UsageError("say where the vectors go: --out vecs.npy (or .npz, .jsonl), or --format jsonl for stdout")
        if out is not None and fmt is not None:
            raise UsageError("give --out FILE or --format jsonl (stdout), not both")
        if fmt not in (None, "jsonl"):
            raise UsageError(f"--format {fmt}: embed prints only jsonl; use --out for .npy/.npz files")
        if resume and out is None:
            raise UsageError("--resume continues an --out file; JSON lines on stdout keep no state to resume")
        from .embed_job import EmbedJob
        from .prompts import read_lines, resolve_templates
        from .sources import expand

        # Every option is checked before the model loads: a mistake must not cost a whole run.
        if template:
            templates = resolve_templates(template)
            if no_normalize and len(templates) > 1:
                raise UsageError("--no-normalize needs a single template (an ensemble averages normalised embeddings)")
        if out is not None and texts_file is not None and out.resolve() == texts_file.resolve():
            raise UsageError(f"--out {out}: would overwrite the texts file")
        texts = list(text or [])
        if texts_file is not None:
            texts += [line for line in read_lines(texts_file, "texts file") if line.strip()]
        sources = expand(inputs or [], recursive=recursive)
        if not sources and not texts:
            raise UsageError("nothing to embed: give image paths or folders, --text or --texts-file")
        engine = _load(model, device, dtype, attn, offline, batch_size, workers, max_pixels)
        job = EmbedJob(engine, out, out_dtype.value, not no_normalize, template, strict, resume)
        code = job.run(sources, texts, progress_bar, note, error_line)
    if code:
        raise typer.Exit(code)


# ----------------------------------------------------------------------------- similarity
@app.command(no_args_is_help=True)
def similarity(
    image: Annotated[Optional[List[str]], typer.Option("--image", "-i", help="Image file, folder, glob or URL (repeatable).", rich_help_panel="Inputs")] = None,
    text: Annotated[Optional[List[str]], typer.Option("--text", help="A text (repeatable).", rich_help_panel="Inputs")] = None,
    texts_file: Annotated[Optional[List[Path]], typer.Option("--texts-file", help="A file with one text per line.", rich_help_panel="Inputs")] = None,
    template: Annotated[Optional[List[str]], typer.Option("--template", "-t", help="Put each text into this template first ({} = the text); several make an ensemble.", rich_help_panel="Inputs")] = None,
    rows: Annotated[str, typer.Option("--rows", help="Which inputs are rows: all, images or texts.", rich_help_panel="Output")] = "all",
    cols: Annotated[str, typer.Option("--cols", help="Which inputs are columns: all, images or texts.", rich_help_panel="Output")] = "all",
    recursive: RecursiveOpt = False,
    fmt: FormatOpt = Format.auto,
    json_flag: JsonOpt = False,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.auto,
    attn: AttnOpt = Attn.auto,
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    offline: OfflineOpt = False,
    max_pixels: MaxPixelsOpt = 100_000_000,
    no_cache: NoCacheOpt = False,
) -> None:
    """Cosine similarity of images and texts, and SigLIP image-text probabilities.

    Every input is compared with every input (or --rows with --cols); each image-text pair also
    gets SigLIP's probability sigmoid(exp(t) * cosine + b). Texts are used as typed (no template)
    unless --template is given.
    """
    with handled():
        from .prompts import read_lines, resolve_templates
        from .similarity import run_similarity
        from .sources import expand

        groups = ("all", "images", "texts")
        for flag, value in (("--rows", rows), ("--cols", cols)):
            if value not in groups:
                raise UsageError(f"{flag} {value}: choose all, images or texts")
        if template:
            resolve_templates(template)  # checked before any work
        texts = list(text or [])
        for path in texts_file or []:
            texts += [line for line in read_lines(path, "texts file") if line.strip()]
        sources = expand(image or [], recursive=recursive)
        if not sources and not texts:
            raise UsageError("nothing to compare: give --image and/or --text")
        for flag, value in (("--rows", rows), ("--cols", cols)):
            if value == "images" and not sources or value == "texts" and not texts:
                raise UsageError(f"{flag} {value}: no {value[:-1]} inputs were given")
        output = _output_format(fmt, json_flag)
        engine = _load(model, device, dtype, attn, offline, batch_size, workers, max_pixels, use_cache=not no_cache)
        failed = run_similarity(engine, sources, texts, template, rows, cols, output, error_line)
    if failed:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- bench
@app.command()
def bench(
    model: ModelOpt = None,
    attn: Annotated[str, typer.Option("--attn", help="A backend, several comma-separated, or all.")] = "all",
    dtype: Annotated[str, typer.Option("--dtype", help="One or several of fp32, fp16, bf16, comma-separated (default: fp32 on CPU, fp16,bf16 on CUDA).")] = "auto",
    batch_sizes: Annotated[Optional[str], typer.Option("--batch-sizes", help="Comma-separated batch sizes (default: 1,4 on CPU; 1,32,128 on CUDA).")] = None,
    towers: Annotated[str, typer.Option("--towers", help="What to time: vision, text, classify, comma-separated.")] = "vision,text,classify",
    seconds: Annotated[float, typer.Option("--seconds", min=0.05, help="Time budget for each row's timed runs (at least one run). Warm-up: the correctness run, plus two more for fast rows, fewer for slow ones.")] = 2.0,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="At most this many timed runs per row.")] = 10,
    device: DeviceOpt = "auto",
    peak_tflops: Annotated[Optional[float], typer.Option("--peak-tflops", min=0.0, help="The device's peak TFLOP/s for this dtype, to print % of peak.")] = None,
    compare: Annotated[Optional[str], typer.Option("--compare", help="transformers: also time the reference SiglipModel on the same weights and inputs.")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table or json (one record per row).")] = "table",
) -> None:
    """Time the attention backends, dtypes and batch sizes.

    Before timing, every backend's outputs are compared with eager's on the same inputs, and
    the largest difference is shown: a fast but wrong kernel is visible. It never downloads:
    without a local folder or a cached copy of the weights, the architecture is built from the
    built-in table with random weights, which times the same but scores nothing.
    """
    with handled():
        from .bench import run_bench
        from .runtime import keep_freed_memory

        keep_freed_memory()

        if fmt not in ("table", "json"):
            raise UsageError(f"--format {fmt}: bench prints table or json")
        if compare not in (None, "transformers"):
            raise UsageError(f"--compare {compare}: only 'transformers' is supported")
        run_bench(
            model=model or DEFAULT_MODEL,
            attn=attn,
            dtypes=dtype,
            batch_sizes=batch_sizes,
            towers=towers,
            seconds=seconds,
            repeats=repeats,
            device=device,
            peak_tflops=peak_tflops,
            compare=compare,
            fmt=fmt,
            note=note,
        )


def main() -> None:
    # File names that are not valid UTF-8 must neither crash output nor be lost when read back.
    for stream, errors in ((sys.stdout, "backslashreplace"), (sys.stdin, "surrogateescape")):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=errors)
    try:
        code = app(standalone_mode=False)
    except Exception as exc:
        code = _usage_error(exc)
    except BrokenPipeError:
        # `siglip classify ... | head -1`: the reader left; stop quietly like other Unix tools.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def _usage_error(exc: Exception) -> int:
    """Click's own usage errors (an unknown option, a value out of range) as one line on stderr,
    like every other error of ours, instead of a framed box."""
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
    from typer.exceptions import Abort

    if isinstance(exc, NoArgsIsHelpError):  # `siglip classify` alone: its help, as typer shows it
        from typer import rich_utils

        rich_utils.rich_format_error(exc)
        return exc.exit_code
    if isinstance(exc, Abort):
        error_line("aborted")
        return 1
    if not isinstance(exc, ClickException):
        raise exc
    message = " ".join(exc.format_message().split())
    context = getattr(exc, "ctx", None)
    hint = f" (see '{context.command_path} --help')" if context is not None else ""
    error_line(message + hint)
    return exc.exit_code


if __name__ == "__main__":
    main()
