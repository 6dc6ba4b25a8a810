"""`siglip dedupe`: inputs -> embeddings -> neighbours (knn.py) -> groups (duplicates.py).

Inputs are listed and embedded as `embed` does: in memory for PATHS alone; with --index, the
store is brought up to date first by the very code `embed --update` runs (embed_to_store), so a
second run embeds only what changed; --index alone reads the store as it is.

Videos (named, or in folders with --video) are sampled as `embed` samples them; each video is
one item, its vector the mean of its frames' (duplicates.mean_vector), named by its file, and
compared only with other videos (stills only with stills): two runs of one grouping rule.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..actions import check_destination
from ..core.errors import InputError, UsageError
from ..duplicates import (
    Thresholds,
    candidate_links,
    exact_classes,
    file_facts,
    form_groups,
    keep_order,
    mean_vector,
    nearest_histogram,
    video_facts,
)
from ..knn import INDEX_SUFFIX, self_neighbours
from ..results import DuplicateGroup, NeighbourHistogram

NEIGHBOURS_PER_IMAGE = 16  # a row with more above the floor is asked again (knn.refine_saturated)


@dataclass
class DedupeInputs:
    names: list[str]  # still images in input order
    rows: np.ndarray  # (N, D) L2-normalised rows (a memory map for a .npy/.npz store of stills)
    store: Path | None = None
    identity: str | None = None  # the store's meta digest: ties a saved index to this store
    skipped: list[str] = field(default_factory=list)  # inputs that could not be embedded, as error lines
    video_names: list[str] = field(default_factory=list)  # video files in input order
    video_rows: np.ndarray | None = None  # (V, D): each video's mean_vector


@dataclass
class DedupeReport:
    groups: list[DuplicateGroup]
    histogram: NeighbourHistogram | None
    method: str
    skipped: list[str]
    stamps: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (size, mtime_ns) when scanned


# ============================================================================ inputs
def embed_in_memory(engine, listing, progress_bar, note: Callable[[str], None]) -> DedupeInputs:
    """PATHS without --index: embedded as `embed --format jsonl` does, kept in memory; a video's
    frames summed as they come (never all held), then made its mean vector."""
    skipped = [failure.error for failure in listing.failures]
    names, vectors = [], []
    frame_sums: dict[int, np.ndarray] = {}  # source position -> the sum of its frames' unit vectors
    failed: set[int] = set()
    with progress_bar(len(listing.sources), "images") as advance:
        for item in engine.iter_image_features(listing.sources, True, on_progress=advance):
            if item.error is not None:
                if item.index in frame_sums or item.time >= 0:
                    failed.add(item.index)  # a video cut short, or one of its frames unusable
                    skipped.append(partial_video_error(item.error, listing.sources[item.index].name))
                else:
                    skipped.append(item.error)
                continue
            if item.time >= 0:
                vector = item.vector.astype(np.float32)
                frame_sums[item.index] = frame_sums.get(item.index, 0) + vector / max(float(np.linalg.norm(vector)), 1e-12)
                continue
            names.append(item.name)
            vectors.append(item.vector.astype(np.float32))
    rows = np.stack(vectors) if vectors else np.zeros((0, engine.embed_dim), np.float32)
    videos = [i for i in sorted(frame_sums) if i not in failed]
    video_rows = np.stack([mean_vector(frame_sums[i][None]) for i in videos]) if videos else None
    return DedupeInputs(names, rows, skipped=skipped, video_names=[listing.sources[i].name for i in videos], video_rows=video_rows)


def partial_video_error(error: str, video: str) -> str:
    """A video that did not decode to its end, or one of whose frames could not be used: its mean
    would stand for part of it only, so it is left out of the groups. The pipeline's message
    says the frames before the fault are kept (true of a store); here they are not."""
    import re

    error = re.sub(r"; the \d+ frames? before are kept$", "", error)
    return f"{error}; {video} is left out of the groups (a part of a video is not compared)"


def update_store(options, listing, index: Path, load_engine, progress_bar, note: Callable[[str], None]) -> list[str]:
    """PATHS with --index: the store made, or brought up to date exactly as `embed --out INDEX
    [--update]` would. Returns the inputs skipped (as error lines)."""
    from ..embedding import EmbedPlan
    from ..store import check_output_path
    from .app import _update_precision
    from .embed import embed_to_store, previous_meta, refuse_foreign_file, refuse_overwriting_inputs

    check_output_path(index)
    plan = EmbedPlan.from_listing(listing)  # files by absolute path, as embed stores them
    refuse_overwriting_inputs(index, plan, [])
    update = index.exists()
    refuse_foreign_file(index)
    base_meta = previous_meta(index, None, plan)  # {} when it is made now
    options.model = options.model or base_meta.get("model")
    options.dtype, options.decode = _update_precision(base_meta, options.dtype, options.decode, options.exact)
    options.max_patches = options.max_patches or base_meta.get("max_patches")
    engine = load_engine(options)
    report = embed_to_store(engine, plan, index, base_meta.get("dtype", "float32"), True, None, False,
                            "mtime" if update else None, False, progress_bar, note)
    if report.interrupted_rows is not None:
        note(f"interrupted: {report.interrupted_rows} rows kept in {report.partial}; run the same command again to continue")
        raise KeyboardInterrupt
    summary = report.summary
    note(f"{index}: {summary.computed} embedded, {summary.reused} kept from before")
    return [s["error"] if s["error"].startswith(s["path"]) else f"{s['path']}: {s['error']}" for s in summary.skipped]


def read_store(index: Path, note: Callable[[str], None]) -> DedupeInputs:
    """The image rows of a store as they are (--index alone, or after the update): still rows
    as stored; each video's frame rows (named clip.mp4#t=...) made one mean vector named by
    the video. A video the store lists as skipped (cut short, or a frame unusable) is left out."""
    from ..store import open_store, sidecar

    store = open_store(index)
    count = store.image_count
    if count == 0:
        raise UsageError(f"{index}: holds no image rows")
    identity = hashlib.sha256(sidecar(index, ".meta.json").read_bytes()).hexdigest()
    times = store.times[:count]
    stills = np.flatnonzero(times < 0)
    if len(stills) == count:  # no video rows: the rows as they are (a memory map, no copy)
        rows, names = store.rows[:count], store.names_at(range(count))
    else:
        rows, names = store.rows[stills], store.names_at(stills.tolist())
        identity += ":stills"  # a saved index of these rows only, never one of every image row
    if not store.meta.get("normalized", True):
        rows = np.asarray(rows, np.float32)
        rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    video_names, video_rows = [], []
    if len(stills) < count:
        partial = {entry["path"].rpartition("#t=")[0] if "#t=" in entry["path"] else entry["path"]
                   for entry in store.meta.get("skipped", [])}
        for video, frames in store.video_rows().items():
            if video in partial:
                note(f"{video}: was not sampled to its end when embedded; left out of the groups")
                continue
            video_names.append(video)
            video_rows.append(mean_vector(store.rows[frames]))
    return DedupeInputs(names, rows, index, identity, video_names=video_names,
                        video_rows=np.stack(video_rows) if video_rows else None)


# ============================================================================ groups
def current_sizes(names: list[str], note: Callable[[str], None]) -> tuple[list[int], set[int]]:
    """Each file's size now (-1 for a URL); the positions of files that are gone."""
    sizes, gone = [], set()
    for i, name in enumerate(names):
        if "://" in name:
            sizes.append(-1)
            continue
        try:
            sizes.append(os.stat(name).st_size)
        except OSError as exc:
            sizes.append(-1)
            gone.add(i)
            note(f"{name}: {exc.strerror or exc} since it was embedded; left out of the groups")
    return sizes, gone


@dataclass
class _Grouped:
    groups: list[DuplicateGroup]
    nearest: np.ndarray
    method: str
    stamps: dict[str, tuple[int, int]]


def group_items(names: list[str], rows, thresholds: Thresholds, keep: str, method: str, index_path: Path | None,
                identity: str | None, facts_of: Callable, note: Callable[[str], None]) -> _Grouped:
    """One kind of item (stills, or videos) grouped among itself."""
    if len(names) < 2:
        return _Grouped([], np.zeros(0, np.float32), "exact", {})
    neighbours = self_neighbours(rows, NEIGHBOURS_PER_IMAGE, thresholds.floor, method, index_path, identity, note)
    sizes, gone = current_sizes(names, note)
    classes = exact_classes(names, [(-1 if i in gone else s) for i, s in enumerate(sizes)], note)
    links = candidate_links(len(names), neighbours, classes, thresholds)
    for i in gone:
        links.pop(i, None)
    links = {a: {b for b in others if b not in gone} for a, others in links.items()}
    facts = {}
    for i in links:
        try:
            facts[i] = facts_of(names[i])
        except OSError as exc:
            note(f"{names[i]}: {exc.strerror or exc}; left out of the groups")
    links = {a: {b for b in others if b in facts} for a, others in links.items() if a in facts}
    order = keep_order(keep, list(links), facts)
    groups = form_groups(order, links, rows, classes, thresholds, names, {i: facts[i].size for i in facts})
    return _Grouped(groups, neighbours.nearest, neighbours.method, {names[i]: facts[i].stamp for i in facts})


def find_duplicates(inputs: DedupeInputs, thresholds: Thresholds, keep: str, method: str, histogram: bool,
                    note: Callable[[str], None]) -> DedupeReport:
    """Stills grouped among stills, then videos among videos (their groups follow, numbered on)."""
    from ..store import sidecar

    index_path = sidecar(inputs.store, INDEX_SUFFIX) if inputs.store is not None else None
    stills = group_items(inputs.names, inputs.rows, thresholds, keep, method, index_path, inputs.identity, file_facts, note)
    videos = group_items(inputs.video_names, inputs.video_rows, thresholds, keep, method, None, None, video_facts, note)
    for number, group in enumerate(videos.groups, len(stills.groups) + 1):
        group.group = number
    shown = None
    if histogram and len(inputs.names) + len(inputs.video_names) >= 2:
        shown = nearest_histogram(np.concatenate([stills.nearest, videos.nearest]), thresholds)
    return DedupeReport(stills.groups + videos.groups, shown, stills.method if len(inputs.names) >= 2 else videos.method,
                        inputs.skipped, {**stills.stamps, **videos.stamps})


def check_thresholds(level: str, threshold: float | None) -> Thresholds:
    from ..duplicates import NEAR_THRESHOLD, SIMILAR_THRESHOLD

    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold {threshold}: a cosine lies between -1 and 1")
    if level == "exact":
        if threshold is not None:
            raise UsageError("--threshold applies to --level near or similar; exact copies need no threshold")
        return Thresholds(near=float("inf"))
    if level == "near":
        return Thresholds(near=NEAR_THRESHOLD if threshold is None else threshold)
    similar = SIMILAR_THRESHOLD if threshold is None else threshold
    return Thresholds(near=max(NEAR_THRESHOLD, similar), similar=similar)


def no_inputs(listing) -> None:
    if not listing.sources:
        raise InputError("nothing to compare: no readable images or videos among the inputs")


# ============================================================================ moves
def common_root(paths: list[str]) -> Path:
    folders = [os.path.dirname(os.path.realpath(p)) for p in paths]
    return Path(os.path.commonpath(folders)) if folders else Path.cwd()


def check_move_folder(folder: Path, arguments: list[str], names: list[str]) -> Path:
    """The resolved DIR, refused when it lies inside the inputs (moved files would be listed
    again next run) or cannot be made."""
    target = Path(os.path.realpath(folder))
    if target.exists() and not target.is_dir():
        raise UsageError(f"--move-to {folder}: is a file, not a folder")
    roots = [Path(os.path.realpath(a)) for a in arguments if a != "-" and "://" not in a and os.path.isdir(a)]
    local = [n for n in names if "://" not in n]
    if local:
        roots.append(common_root(local))
    check_destination("--move-to", folder, target, roots)
    return target


def move_duplicates(groups: list[DuplicateGroup], folder: Path, dry_run: bool, stamps: dict[str, tuple[int, int]],
                    note: Callable[[str], None]) -> tuple[int, int]:
    """Every duplicate (never a kept image) into `folder`, at its path relative to the common
    root of the grouped files, one at a time through the journal (actions.py): each move is
    recorded in DIR/siglip-dedupe.jsonl before it happens, nothing is overwritten (a numbered
    name instead), a file changed or gone since the scan is skipped with a note. Returns
    (moved, skipped); with `dry_run` nothing changes and each planned move is set on its record."""
    from pathlib import PurePosixPath

    from ..actions import DEDUPE_MANIFEST, Journal, numbered

    everything = [g.keep for g in groups] + [d.path for g in groups for d in g.duplicates]
    root = common_root(everything)
    moved = skipped = 0
    claimed: set[str] = set()
    journal = None if dry_run else Journal(folder, DEDUPE_MANIFEST, command="siglip dedupe --move-to")
    if journal is not None:
        journal.open()
        journal.start_run(root=str(root))
    try:
        for group in groups:
            for duplicate in group.duplicates:
                wanted = PurePosixPath(*Path(os.path.relpath(os.path.realpath(duplicate.path), root)).parts)
                if dry_run:
                    number = 1
                    while True:
                        candidate = wanted.with_name(numbered(wanted.name, number))
                        if str(candidate) not in claimed and not os.path.lexists(folder / candidate):
                            break
                        number += 1
                    claimed.add(str(candidate))
                    duplicate.destination, duplicate.planned = str(folder / candidate), True
                    continue
                outcome = journal.move(Path(os.path.realpath(duplicate.path)), wanted, expected=stamps.get(duplicate.path))
                if outcome.done:
                    duplicate.destination = str(outcome.destination)
                    moved += 1
                else:
                    note(f"{duplicate.path}: {outcome.skipped}")
                    skipped += 1
    finally:
        if journal is not None:
            journal.close()
    return moved, skipped


def undo_moves(folder: Path, note: Callable[[str], None]) -> int:
    """`dedupe --undo DIR`: every move DIR's manifest records, put back. Returns how many
    files could not be (each named)."""
    from ..actions import DEDUPE_MANIFEST, undo, undo_summary

    outcomes = undo(folder, DEDUPE_MANIFEST)
    kept = 0
    for outcome in outcomes:
        if outcome.result == "kept":
            kept += 1
            note(f"kept {outcome.destination}: {outcome.note}")
        elif outcome.note and outcome.result == "restored":
            note(f"{outcome.source}: {outcome.note}")
    note(undo_summary(outcomes))
    return kept


# ============================================================================ the command's flow
@dataclass
class DedupeRequest:
    """Every dedupe option, parsed by app.py."""

    inputs: list[str]
    index: Path | None
    level: str
    threshold: float | None
    keep: str
    histogram: bool
    neighbours: str
    move_to: Path | None
    dry_run: bool
    undo: Path | None
    recursive: bool
    fmt: object  # options.Format
    json_flag: bool
    options: object  # options.ModelOptions


def run(request: DedupeRequest) -> bool:
    """The whole command: checks (before any model loads), inputs, groups, moves, output.
    Returns whether anything failed (an input skipped, a move skipped, a file left by undo)."""
    from . import render
    from .app import _summarize_failures, list_inputs, load_engine, output_format
    from .terminal import error_line, note, progress_bar

    if request.undo is not None:
        if request.inputs or request.index is not None or request.move_to is not None or request.dry_run:
            raise UsageError("--undo DIR works alone: siglip dedupe --undo duplicates/")
        return bool(undo_moves(request.undo, note))
    if request.dry_run and request.move_to is None:
        raise UsageError("--dry-run goes with --move-to DIR (a plain dedupe changes nothing anyway)")
    thresholds = check_thresholds(request.level, request.threshold)
    fmt_name = output_format(request.fmt, request.json_flag)
    if not request.inputs and request.index is None:
        raise UsageError("nothing to compare: give image paths or folders, or --index FILE (see 'siglip dedupe --help')")
    if request.move_to is not None:
        check_move_folder(request.move_to, request.inputs, [])
    found = inputs_of(request, list_inputs, load_engine, progress_bar, note)
    for error in found.skipped:
        error_line(error)
    report = find_duplicates(found, thresholds, request.keep, request.neighbours, request.histogram, note)
    moved = moves_skipped = 0
    if request.move_to is not None and report.groups:
        grouped = [g.keep for g in report.groups] + [d.path for g in report.groups for d in g.duplicates]
        folder = check_move_folder(request.move_to, request.inputs, grouped)
        moved, moves_skipped = move_duplicates(report.groups, folder, request.dry_run, report.stamps, note)
    render.emit(report.groups, fmt_name, render.DEDUPE_VIEW)
    if report.histogram is not None:
        show_histogram(report.histogram, fmt_name)
    note(render.dedupe_summary(report.groups))
    if request.move_to is not None and report.groups:
        if request.dry_run:
            note(f"dry run: nothing was moved; without --dry-run the duplicates go into {request.move_to}")
        else:
            skipped_moves = f"; {moves_skipped} skipped" if moves_skipped else ""
            note(f"moved {moved} duplicate{'s' if moved != 1 else ''} into {request.move_to}{skipped_moves}; "
                 f"undo with: siglip dedupe --undo {request.move_to}")
    _summarize_failures(len(found.skipped), len(found.names) + len(found.video_names) + len(found.skipped))
    return bool(found.skipped or moves_skipped)


def inputs_of(request: DedupeRequest, list_inputs, load_engine, progress_bar, note) -> DedupeInputs:
    """PATHS embedded in memory; PATHS with --index: the store brought up to date, then read;
    --index alone: the store read as it is."""
    skipped: list[str] = []
    if request.inputs:
        listing = list_inputs(request.inputs, request.recursive, request.options.video)
        no_inputs(listing)
        if request.index is None:
            return embed_in_memory(load_engine(request.options), listing, progress_bar, note)
        skipped = update_store(request.options, listing, request.index, load_engine, progress_bar, note)
    found = read_store(request.index, note)
    found.skipped = skipped
    return found


def show_histogram(histogram: NeighbourHistogram, fmt_name: str) -> None:
    """Under the table on stdout; on stderr when stdout carries JSON or CSV (which it would break)."""
    from . import render
    from .terminal import stderr_console

    text = render.histogram_text(histogram)
    console = render.stdout_console() if fmt_name == "table" else stderr_console()
    console.print(text)
