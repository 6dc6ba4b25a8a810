"""`siglip embed`: inputs -> rows in a store (--out), or JSON lines on stdout.

The run itself (plan, compute, resume, update, atomic files) lives in `embedding.py` and
`store.py`; this module holds the output's lock, reports on stderr and decides nothing about
exit codes (app.py does, from the report).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..core.errors import UsageError
from ..embedding import EmbedPlan, EmbedRun, EmbedSummary, check_base, settle_stored_paths
from ..paths import stored_model
from ..results import EmbeddingRow
from ..safefiles import remove_stale_temporaries
from ..store import OutputLock, embedding_values, is_store, open_store, output_files
from .render import display_path
from .terminal import activity


@dataclass
class EmbedReport:
    summary: EmbedSummary | None = None  # None when stopped early
    stopped_by_strict: bool = False
    interrupted_rows: int | None = None  # rows kept in the partial state after Ctrl-C
    partial: Path | None = None


def refuse_overwriting_inputs(out: Path, plan: EmbedPlan, texts_files: Sequence[Path]) -> None:
    targets = {os.path.realpath(p) for p in output_files(out)}
    for source in plan.images:
        if isinstance(source.value, str) and os.path.realpath(source.value) in targets:
            raise UsageError(f"--out {out}: would overwrite the input {source.name}")
    for texts_file in texts_files:
        if os.path.realpath(texts_file) in targets:
            raise UsageError(f"--out {out}: would overwrite the texts file")


def shown_error(error: str) -> str:
    """A skipped input's error on stderr: the store names it by its absolute path (and so does
    the error); shown, like in tables, relative to the working folder when inside it."""
    head, separator, cause = error.partition(": ")
    return display_path(head) + separator + cause if separator and os.path.isabs(head) else error


def refuse_foreign_file(out: Path) -> None:
    """An existing file that siglip did not write is never replaced; a store is, with a note."""
    if out.exists() and not is_store(out):
        raise UsageError(f"--out {out}: exists and is not a siglip embedding file; remove it or choose another name")


def check_relative_to(relative_to: Path | None, update: str | None) -> None:
    if relative_to is not None and not update:
        raise UsageError("--relative-to reads an older store's relative paths; it works with --update")
    if relative_to is not None and not relative_to.expanduser().is_dir():
        raise UsageError(f"--relative-to {relative_to}: no such folder")


def previous_meta(out: Path, relative_to: Path | None, plan: EmbedPlan) -> dict:
    """For --update, the existing store's meta (none when --update creates it): the update
    reuses its model (found from here, see paths.stored_model) and dtypes unless given. Its
    paths are checked against the inputs now, so that a refusal costs no model load (the run
    checks them again under the output's lock)."""
    if not out.exists():
        return {}
    store = open_store(out)
    settle_stored_paths(store, plan, relative_to, lambda message: None)
    meta = dict(store.meta)
    meta["model"] = stored_model(meta, out, (relative_to,) if relative_to is not None else ())
    return meta


def embed_to_store(
    engine,
    plan: EmbedPlan,
    out: Path,
    out_dtype: str,
    normalized: bool,
    templates: Sequence[str] | None,
    resume: bool,
    update: str | None,
    strict: bool,
    progress_bar,
    note: Callable[[str], None],
    make_run: Callable[..., EmbedRun] = EmbedRun,
    relative_to: Path | None = None,
) -> EmbedReport:
    """The whole run under the output's lock: two runs never write one output at once.
    `make_run` builds the run: EmbedRun computes here; a ClusterRun (cluster.py) on Ray.
    `--update` of an output that does not exist yet creates it (a nightly job runs one line)."""
    with OutputLock(out):
        _remove_stale_temporaries(out, note)
        base = None
        if update and not out.exists():
            note(f"--update: {out} does not exist yet; creating it")
        elif update:
            base = open_store(out)
            check_base(base, engine, normalized, templates, out_dtype)
            base = settle_stored_paths(base, plan, relative_to, note)
        elif out.exists():
            note(f"{out} will be replaced when this run completes")
        run = make_run(engine, plan, out, out_dtype, normalized, templates, resume, base, hash_files=update == "hash")
        try:
            if run.partial.inputs_changed:
                note(f"resuming {run.partial.folder}: the inputs changed since it was made (files added, removed "
                     "or renamed); rows of files still listed and unchanged are kept, the rest embedded again")
            if run.resumed:
                note(f"resuming: {run.resumed} rows already done in {run.partial.folder}")
            images, _, texts = run.todo()
            if base is not None:
                times = base.times
                stills = {name: row for name, row in base.image_rows().items() if times[row] < 0}
                known = {**stills, **base.video_rows()}  # files: a video once, not each frame
                for video in run.cut_short_videos():
                    known.pop(video, None)  # cut short before: sampled again, as a skipped input
                changed = sum(1 for s in images if s.name in known)
                gone = len(set(known) - {s.name for s in plan.images})
                note(f"--update: {len(images) - changed} new (or skipped before), {changed} changed, "
                     f"{len(plan.images) - len(images)} unchanged, {gone} gone")
            with progress_bar(len(images), "images") as advance:
                finished = run.embed(advance, lambda error: note(f"skipped {shown_error(error)}"), strict)
            if not finished:
                return EmbedReport(stopped_by_strict=True, partial=run.partial.folder)
            return EmbedReport(run.finish())
        except KeyboardInterrupt:
            return EmbedReport(interrupted_rows=run.done_rows(), partial=run.partial.folder)
        finally:
            run.close()


def _remove_stale_temporaries(out: Path, note: Callable[[str], None]) -> None:
    """Temporaries that a killed run (SIGKILL, a power cut) left beside the output: ours to
    remove now that we hold its lock (they can be as large as the store)."""
    removed = remove_stale_temporaries(output_files(out))
    if removed:
        size = sum(size for _, size in removed)
        note(f"removed {len(removed)} temporary file{'s' if len(removed) != 1 else ''} ({size / 1e6:.1f} MB) "
             f"left beside {out} by a run that was killed")


def embed_to_stdout(engine, plan: EmbedPlan, out_dtype: str, normalized: bool, templates, strict: bool, note, on_progress=None) -> Iterator[EmbeddingRow]:
    """Rows as they are computed, for `--format jsonl`; skipped inputs go to stderr only."""
    dtype = np.dtype(out_dtype)
    for failure in plan.failures:
        note(f"skipped {failure.error}")
        if strict:
            raise StrictStop()
    if plan.images:
        for item in engine.iter_image_features(plan.images, normalized, on_progress=on_progress):
            if item.error is not None:
                note(f"skipped {item.error}")
                if strict:
                    raise StrictStop()
                continue
            yield EmbeddingRow("image", item.name, embedding_values(item.vector.astype(dtype)), item.time)
    if plan.texts:
        texts = list(dict.fromkeys(plan.texts))
        for text, vector in zip(texts, engine.embed_texts(texts, templates or None, normalize=normalized)):
            yield EmbeddingRow("text", text, embedding_values(vector.astype(dtype)))


def embed_on_ray(options, plan: EmbedPlan, out: Path, out_dtype: str, normalized: bool, templates, resume: bool,
                 cluster, progress_bar, note: Callable[[str], None]) -> EmbedReport:
    """`--engine ray`: the same run as `embed_to_store`, its rows computed by a Ray actor pool."""
    import functools

    import torch

    from ..cluster import ClusterRun, WorkerSettings, connected, plan_layout
    from ..engine import load, resolve_exactness

    activity("starting Ray")
    started = time.perf_counter()
    with connected() as nodes:
        ray_start = time.perf_counter() - started
        activity("loading the model's description")
        layout = plan_layout(nodes, cluster, options.device)
        # Resolved once, here, for the workers' device: every worker computes alike (an `auto`
        # that each node resolved for itself could mix bf16 and fp32 rows in one output).
        precision, decode = resolve_exactness(options.dtype, options.decode, options.exact, torch.device(layout.device))
        dtype = precision.name
        # The driver only describes the run (model, revision, dtype, width): no weights load here.
        handle = load(options.model, device="cpu", dtype=dtype, decode=decode, max_patches=options.max_patches,
                      offline=True if options.offline else None, use_cache=False)
        described = handle.describe()
        local_folder = Path(described["model"]).expanduser().is_dir()
        settings = WorkerSettings(
            # a local checkpoint by its absolute path: workers run in folders of their own
            model=str(handle.resolved.folder.resolve()) if local_folder else described["model"], revision=described["revision"], device=layout.device, dtype=dtype,
            attn=options.attn, offline=options.offline, max_pixels=options.max_pixels, batch_size=options.batch_size,
            decode=decode, max_patches=options.max_patches,
            # a GPU actor's cores decode for it; a CPU actor keeps the local default (one thread)
            decode_threads=options.workers if options.workers is not None or not layout.gpus else int(layout.cpus),
            torch_threads=max(1, int(layout.cpus)), normalized=normalized, templates=tuple(templates or ()),
            out=str(out), out_dtype=out_dtype,
        )
        gpus = f" and {layout.gpus:g} GPU" if layout.gpus else ""
        note(f"Ray: {len(nodes)} node(s), {layout.workers} worker(s) with {layout.cpus:g} CPU{gpus} each; "
             f"{'started' if not os.environ.get('RAY_ADDRESS') else 'reached'} in {ray_start:.1f} s")
        activity("warming up: the workers load the model")
        make_run = functools.partial(ClusterRun, settings=settings, layout=layout, shard_size=cluster.shard_size)
        return embed_to_store(handle, plan, out, out_dtype, normalized, templates, resume, None, False, progress_bar, note, make_run)


class StrictStop(Exception):
    """--strict met a bad input while streaming to stdout."""
