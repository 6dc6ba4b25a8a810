"""`siglip classify`: images x labels -> SigLIP's per-label scores, image by image; and acting
on them: `--sort-into DIR` (copy, link or move each image into a folder per label, journaled,
`--undo` puts everything back) and `--write-xmp` (keywords in sidecars photo managers read).

The command's checks and flow live here; `app.py` only declares the options. Every file change
goes through `siglip_cli.actions` (the journal) or `siglip_cli.xmp` (sidecars).

A video gives one record per sampled frame (its name ends in `#t=SECONDS`), then one summary
record: each label's best frame and its time, and with --threshold the time ranges where the
label stays at or above it (runs of consecutive samples).
"""

from __future__ import annotations

import contextlib
import os
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from ..core.errors import InputError, UsageError
from ..core.scoring import rank
from ..results import FileAction, ImageScores, LabelOverTime, LabelScore, VideoSummary
from ..sources import Listing, Source
from ..actions import check_destination, is_inside
from .terminal import printable

UNSORTED = "_unsorted"
_FOLDER_NAME_BYTES = 100  # well under every file system's 255, leaving room for " (2)" and more
_UNPORTABLE = '/\\:*?"<>|'  # not allowed in folder names on Windows / exFAT / SMB shares


def classify(
    engine,
    listing: Listing,
    labels: Sequence[str],
    templates: Sequence[str],
    use_softmax: bool = False,
    top_k: int | None = None,
    threshold: float | None = None,
    on_progress: Callable[[int], None] | None = None,
    scorer: Callable | None = None,
) -> Iterator[ImageScores | VideoSummary]:
    """One ImageScores per input, in input order: labels best first (cut by top-k and
    threshold), or the error that kept the input out; a video gives one per
    sampled frame, then its VideoSummary. `scorer` (image embeddings -> logits)
    replaces the zero-shot logits, e.g. with a TipAdapter's (--examples)."""
    text = engine.label_embeddings(labels, templates) if listing.sources and scorer is None else None
    images = engine.iter_image_features(listing.sources, on_progress=on_progress) if listing.sources else []
    video = _VideoScores(labels, top_k, threshold)
    for failure, item in listing.in_order(images):
        if item is None or item.index != video.index:
            yield from video.summary()
        if failure is not None:
            yield ImageScores(path=failure.name, error=failure.error)
            continue
        if item.error is not None:
            yield ImageScores(path=item.name, error=item.error, time=item.time)
            continue
        logit_row = scorer(item.vector[None, :]) if scorer is not None else engine.logits(item.vector[None, :], text)
        probs = engine.probabilities(logit_row, use_softmax)[0]
        if item.time >= 0:
            video.add(item.index, item.name, item.time, probs)
        yield ImageScores(
            path=item.name,
            labels=[LabelScore(labels[i], float(probs[i]), float(logit_row[0, i])) for i in rank(probs, top_k, threshold)],
            time=item.time,
        )
    yield from video.summary()


class _VideoScores:
    """The scores of the current video's frames, summarised when its frames end."""

    def __init__(self, labels: Sequence[str], top_k: int | None, threshold: float | None):
        self.labels, self.top_k, self.threshold = list(labels), top_k, threshold
        self.index: int | None = None
        self.path = ""
        self.times: list[float] = []
        self.scores: list[np.ndarray] = []

    def add(self, index: int, frame_name: str, seconds: float, probs: np.ndarray) -> None:
        if index != self.index:
            self.index, self.times, self.scores = index, [], []
            self.path = frame_name.rpartition("#t=")[0]
        self.times.append(seconds)
        self.scores.append(np.asarray(probs, dtype=np.float64))

    def summary(self) -> Iterator[VideoSummary]:
        if self.scores:
            yield summarize(self.path, self.times, np.stack(self.scores), self.labels, self.top_k, self.threshold)
        self.index, self.times, self.scores = None, [], []


def summarize(path: str, times: Sequence[float], scores: np.ndarray, labels: Sequence[str], top_k: int | None,
              threshold: float | None) -> VideoSummary:
    """(frames, labels) scores -> each label's best frame and its runs at or above `threshold`."""
    best_rows = scores.argmax(axis=0)
    best = scores.max(axis=0)
    items = []
    for column in rank(best, top_k, threshold):
        ranges = None
        if threshold is not None:
            ranges, start, previous = [], None, None
            for seconds, above in zip(times, scores[:, column] >= threshold):
                if above and start is None:
                    start = seconds
                if not above and start is not None:
                    ranges.append((start, previous))
                    start = None
                previous = seconds
            if start is not None:
                ranges.append((start, previous))
        items.append(LabelOverTime(labels[column], float(best[column]), float(times[best_rows[column]]), ranges))
    return VideoSummary(path, len(times), items)



# ============================================================================ folder names
def folder_name(label: str) -> str:
    """A label as a folder name that works on every common file system: NFC, control and
    format characters dropped, `/ \\ : * ? " < > |` turned into `-`, surrounding spaces and dots
    stripped (so `.` and `..` become nothing), cut to 100 bytes of UTF-8. Empty means the label
    cannot be a folder name."""
    text = unicodedata.normalize("NFC", label)
    text = "".join("-" if ch in _UNPORTABLE else ch for ch in text if unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp"))
    text = text.strip(" .\t")
    encoded = text.encode("utf-8")
    if len(encoded) > _FOLDER_NAME_BYTES:
        text = encoded[:_FOLDER_NAME_BYTES].decode("utf-8", "ignore").rstrip(" .")
    return text


def label_folders(labels: Sequence[str]) -> dict[str, str]:
    """label -> folder name, refusing a label that cannot be one and two labels that would share
    one (compared case-insensitively: macOS and Windows folders ignore case)."""
    folders: dict[str, str] = {}
    taken: dict[str, str] = {UNSORTED.casefold(): f"the {UNSORTED} folder"}
    for label in labels:
        name = folder_name(label)
        if not name:
            raise UsageError(f"label {label!r} cannot be a folder name (nothing is left of it once made safe); rename it")
        key = name.casefold()
        if key in taken:
            raise UsageError(f"labels {taken[key]} and {label!r} would share the folder {name!r}; rename one of them")
        taken[key] = repr(label)
        folders[label] = name
    return folders


# ============================================================================ checks before any work
def check_sort_folder(folder: Path, arguments: Sequence[str], listing: Listing) -> Path:
    """The resolved DIR, refused when it and the inputs nest (sorting a folder into itself would
    feed the sorted files back into the next run) or when it cannot be a folder."""
    target = Path(os.path.realpath(folder))
    if target.exists() and not target.is_dir():
        raise UsageError(f"--sort-into {folder}: is a file, not a folder")
    folders = [Path(os.path.realpath(a)) for a in arguments if a != "-" and "://" not in a and os.path.isdir(a)]
    check_destination("--sort-into", folder, target, folders)
    for source in listing.sources:
        if isinstance(source.value, str) and "://" not in source.value:
            if is_inside(Path(os.path.realpath(source.value)), target):
                raise UsageError(f"--sort-into {folder}: input {source.name} is already inside it; choose another folder")
    return target


# ============================================================================ sorting
@dataclass
class SortPlan:
    folder: Path
    action: str  # copy | link | move
    multi: bool
    dry_run: bool
    folders: dict[str, str]  # label -> folder name
    counts: dict[str, int] = field(default_factory=dict)
    methods: dict[str, int] = field(default_factory=dict)
    skipped: int = 0

    def targets(self, result: ImageScores) -> list[str]:
        """The folder names an image goes into: its best passing label, every passing label with
        --multi, or _unsorted when none passed."""
        passing = [self.folders[item.label] for item in result.labels if item.label in self.folders]
        if not passing:
            return [UNSORTED]
        return passing if self.multi else passing[:1]


class Sorter:
    """Carries out (or, for --dry-run, predicts) a SortPlan image by image, through the journal."""

    def __init__(self, plan: SortPlan, command: str = "siglip classify --sort-into"):
        from ..actions import Journal

        self.plan = plan
        self.journal = None if plan.dry_run else Journal(plan.folder, command=command)
        self._claimed: set[str] = set()

    def __enter__(self) -> "Sorter":
        if self.journal is not None:
            self.journal.open()
            self.journal.start_run(action=self.plan.action, multi=self.plan.multi, labels=self.plan.folders)
        return self

    def __exit__(self, *exc) -> None:
        if self.journal is not None:
            self.journal.close()

    def place(self, result: ImageScores, source: Source) -> list[FileAction]:
        plan = self.plan
        if not isinstance(source.value, str) or "://" in source.value:
            plan.skipped += 1
            return [FileAction(plan.action, skipped="not a local file; only files can be sorted")]
        actions = []
        label_of = {folder: label for label, folder in plan.folders.items()}  # one folder per label (checked)
        for target in plan.targets(result):
            wanted = PurePosixPath(target, os.path.basename(source.value))
            label = label_of.get(target) if target != UNSORTED else None
            if plan.dry_run:
                actions.append(FileAction(plan.action, str(plan.folder / self._predict(wanted)), planned=True, label=label))
                plan.counts[target] = plan.counts.get(target, 0) + 1
                continue
            outcome = getattr(self.journal, plan.action)(Path(source.value), wanted, expected=source.stamp)
            if outcome.done:
                plan.counts[target] = plan.counts.get(target, 0) + 1
                plan.methods[outcome.method] = plan.methods.get(outcome.method, 0) + 1
                actions.append(FileAction(plan.action, str(outcome.destination), outcome.method, label=label))
            else:
                plan.skipped += 1
                actions.append(FileAction(plan.action, skipped=outcome.skipped, label=label))
        return actions

    def _predict(self, wanted: PurePosixPath) -> PurePosixPath:
        """The name a real run would give: the first numbered name free on disk and in this plan."""
        from ..actions import numbered

        number = 1
        while True:
            candidate = wanted.with_name(numbered(wanted.name, number))
            if str(candidate) not in self._claimed and not os.path.lexists(self.plan.folder / candidate):
                self._claimed.add(str(candidate))
                return candidate
            number += 1

    def summary(self) -> str:
        plan = self.plan
        verb = {"copy": "copied", "link": "linked", "move": "moved"}[plan.action]
        placed = ", ".join(f"{name} {count}" for name, count in sorted(plan.counts.items())) or "nothing"
        if plan.dry_run:
            return f"dry run: would have {verb} into {plan.folder}: {placed}; nothing was changed"
        line = f"{verb} into {plan.folder}: {placed}"
        if plan.skipped:
            line += f"; {plan.skipped} skipped"
        if plan.methods.get("symlink"):
            line += f"; {plan.methods['symlink']} as symbolic links (hard links are impossible across file systems), which break if the originals move"
        return line + f"; undo with: siglip classify --undo {plan.folder}"


class Tagger:
    """--write-xmp: each image's passing labels as keywords in its XMP sidecar, every write
    through a sidecar journal (opened, and so checked writable, before the model loads)."""

    def __init__(self, prefix: str, stem: bool, journal_folder: Path, command: str = "siglip classify --write-xmp"):
        from ..actions import SidecarJournal

        self.prefix, self.stem = prefix, stem
        self.model = ""
        self.counts: dict[str, int] = {}
        self.failed = 0
        self.journal = SidecarJournal(journal_folder, command=command)

    def __enter__(self) -> "Tagger":
        self.journal.open()
        self.journal.start_run(prefix=self.prefix, stem=self.stem)
        return self

    def __exit__(self, *exc) -> None:
        self.journal.close()

    def tag(self, result: ImageScores, source: Source) -> list[FileAction]:
        from ..xmp import Keywords, write_keywords

        if not isinstance(source.value, str) or "://" in source.value:
            self.failed += 1
            return [FileAction("xmp", skipped="not a local file; sidecars go beside files")]
        keywords = Keywords([item.label for item in result.labels], self.prefix, self.model,
                            {item.label: item.score for item in result.labels})
        try:
            path, how = write_keywords(source.value, keywords, self.journal, self.stem)
        except InputError as exc:
            self.failed += 1
            return [FileAction("xmp", skipped=str(exc))]
        self.counts[how] = self.counts.get(how, 0) + 1
        return [FileAction("xmp", str(path), how)]

    def summary(self) -> str:
        done = ", ".join(f"{count} {how}" for how, count in sorted(self.counts.items())) or "none written"
        failed = f"; {self.failed} could not be written" if self.failed else ""
        folder = self.journal.root
        return f"XMP sidecars: {done}{failed}; journal in {folder}; undo with: siglip classify --undo {folder}"


def act_on(results: Iterable[ImageScores], listing: Listing, sorter: Sorter | None, tagger, report) -> Iterator[ImageScores]:
    """Each result, after its file actions ran (sorting, sidecars); skipped actions go to `report`."""
    by_name = {source.name: source for source in listing.sources}
    for result in results:
        source = by_name.get(result.path)  # a video's frames are not sources: its summary is acted on
        if result.error is None and source is not None:
            if tagger is not None:
                result.actions += tagger.tag(result, source)
            if sorter is not None:
                result.actions += sorter.place(result, source)
            for action in result.actions:
                if action.skipped:
                    report(printable(action.skipped if action.skipped.startswith(result.path) else f"{result.path}: {action.skipped}"))
        yield result


def undo_actions(folder: Path, note) -> None:
    """`classify --undo DIR`: put back what DIR's journals record (a --sort-into folder's
    manifest, a --write-xmp journal, or both when they share DIR); what stays is named."""
    from ..actions import SORT_MANIFEST, is_sidecar_journal, undo, undo_sidecars, undo_sidecars_summary, undo_summary

    sidecars = is_sidecar_journal(folder)
    if not sidecars and not os.path.lexists(folder / SORT_MANIFEST) and folder.is_dir():
        raise UsageError(f"{folder}: holds no {SORT_MANIFEST} (--sort-into) or siglip-xmp.jsonl (--write-xmp journal), so there is nothing to undo")
    if sidecars:
        outcomes = undo_sidecars(folder)
        for outcome in outcomes:
            if outcome.result == "kept":
                note(printable(f"kept {outcome.destination}: {outcome.note}"))
        note(undo_sidecars_summary(outcomes))
    if sidecars and not os.path.lexists(folder / SORT_MANIFEST):
        return
    outcomes = undo(folder, SORT_MANIFEST)
    for outcome in outcomes:
        if outcome.result == "kept":
            note(printable(f"kept {outcome.destination}: {outcome.note}"))
        elif outcome.note and outcome.result == "restored":
            note(printable(f"{outcome.source}: {outcome.note}"))
    note(undo_summary(outcomes))


# ============================================================================ the command's flow
@dataclass
class ClassifyRequest:
    """Every classify option, parsed by app.py."""

    images: list[str]
    labels: list[str]
    label: list[str]
    labels_file: list[Path]
    template: list[str] | None
    no_template: bool
    softmax: bool
    top_k: int | None
    threshold: float | None
    recursive: bool
    fmt: object
    json_flag: bool
    options: object
    frames: bool = False  # videos: every frame in the table
    null: bool = False  # --format paths ended by NUL bytes
    sort_into: Path | None = None
    multi: bool = False
    action: str = "copy"
    dry_run: bool = False
    undo: Path | None = None
    write_xmp: bool = False
    xmp_prefix: str = "siglip"
    xmp_stem: bool = False
    journal: Path | None = None
    examples: Path | None = None


def check_action_options(request: ClassifyRequest) -> None:
    """Option combinations that cannot work, refused before the model loads."""
    sorting = request.sort_into is not None
    if request.journal is not None and not request.write_xmp:
        raise UsageError("--journal DIR goes with --write-xmp (a --sort-into folder keeps its own journal)")
    if request.undo is not None:
        if request.images or sorting or request.dry_run or request.write_xmp:
            raise UsageError("--undo DIR works alone: siglip classify --undo sorted/")
        return
    if request.write_xmp:
        if request.threshold is None and request.top_k is None:
            raise UsageError("--write-xmp needs --threshold SCORE (or --top-k K): the labels that pass become keywords")
        if sorting and request.action == "move":
            raise UsageError("--write-xmp writes sidecars beside the originals, so it cannot go with --action move; tag first, then sort")
        if sorting and request.dry_run:
            raise UsageError("--dry-run plans --sort-into only; leave out --write-xmp for the dry run")
        if "|" in request.xmp_prefix or _XML_UNSAFE(request.xmp_prefix):
            raise UsageError(f"--xmp-prefix {request.xmp_prefix!r}: no '|' (it separates levels) or control characters")
    elif request.xmp_prefix != "siglip" or request.xmp_stem:
        raise UsageError("--xmp-prefix and --xmp-stem go with --write-xmp")
    if not sorting:
        for flag, given in (("--multi", request.multi), ("--dry-run", request.dry_run), ("--action", request.action != "copy")):
            if given:
                raise UsageError(f"{flag} goes with --sort-into DIR")
        return
    if request.multi and request.threshold is None:
        raise UsageError("--multi needs --threshold SCORE: without one every label would pass")
    if request.multi and request.action == "move":
        raise UsageError("--multi cannot --action move: a file moved into one folder is not in the others; use copy or link")


def _XML_UNSAFE(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def run(request: ClassifyRequest) -> int:
    """The whole command; returns the number of inputs that failed."""
    from ..prompts import collect_labels, resolve_templates
    from . import render
    from .app import list_inputs, load_engine, output_format, _summarize_failures
    from .terminal import error_line, note, progress_bar

    check_action_options(request)
    if request.undo is not None:
        undo_actions(request.undo, note)
        return 0
    if not request.images:
        raise UsageError("no images given: name files, folders, patterns or URLs (see 'siglip classify --help')")
    example_set = None
    if request.examples is not None and not (request.labels or request.label or request.labels_file):
        from ..examples import read_examples
        from ..prompts import dedupe

        example_set = read_examples(request.examples)  # the labels are its folder names
        label_set = dedupe(example_set.labels)
    else:
        label_set = collect_labels(request.labels, request.label, request.labels_file)
        if request.examples is not None:
            from ..examples import read_examples

            example_set = read_examples(request.examples, label_set.labels)
    for duplicate in label_set.duplicates:
        note(f"label {duplicate!r} given more than once; scored once")
    if example_set is not None and example_set.ignored:
        note(f"--examples {request.examples}: {len(example_set.ignored)} file(s) outside the label folders ignored")
    templates = resolve_templates(request.template, use_template=not request.no_template)
    fmt_name = output_format(request.fmt, request.json_flag, request.null)
    if fmt_name in ("paths", "paths0") and request.threshold is None:
        note("--format paths lists the images that keep a label; without --threshold every image does")
    folders = label_folders(label_set.labels) if request.sort_into is not None else None
    listing = list_inputs(request.images, request.recursive, request.options.video)
    if not listing.sources and not listing.failures:
        raise UsageError("no images given (stdin was empty)")
    sorter = None
    if request.sort_into is not None:
        target = check_sort_folder(request.sort_into, request.images, listing)
        sorter = Sorter(SortPlan(target, request.action, request.multi, request.dry_run, folders))
    tagger = None
    if request.write_xmp:
        from ..actions import new_sidecar_journal_folder

        # with --sort-into DIR and no --journal, DIR keeps both journals: one --undo DIR undoes the run
        journal_folder = request.journal or (sorter.plan.folder if sorter is not None else None)
        tagger = Tagger(request.xmp_prefix, request.xmp_stem, journal_folder or new_sidecar_journal_folder())
    total = len(listing.sources) + len(listing.failures)
    failed = 0

    def reported(results):
        nonlocal failed
        for result in results:
            if result.error is not None:
                failed += 1
                error_line(result.error)
            yield result

    with contextlib.ExitStack() as journals:  # locked (and so known writable) before the model loads
        for journal in (sorter, tagger):
            if journal is not None:
                journals.enter_context(journal)
        engine = load_engine(request.options) if listing.sources else None
        scorer = None
        if example_set is not None and engine is not None:
            scorer = _adapter(engine, example_set, label_set.labels, templates, note, error_line)
        if tagger is not None and engine is not None:
            tagger.model = f"{engine.resolved.name}@{engine.resolved.revision}" if engine.resolved.revision else engine.resolved.name
        streaming = fmt_name in ("jsonl", "paths", "paths0")
        streaming_to_terminal = streaming and sys.stdout.isatty()
        with progress_bar(len(listing.sources), "images", enabled=not streaming_to_terminal) as advance:
            results = reported(classify(engine, listing, label_set.labels, templates, request.softmax, request.top_k,
                                        request.threshold, advance, scorer))
            if sorter is not None or tagger is not None:
                results = act_on(results, listing, sorter, tagger, error_line)
            view = render.classify_view(label_set.labels, "softmax" if request.softmax else "sigmoid", request.frames,
                                        actions=sorter is not None or tagger is not None)
            collected = render.emit(results, fmt_name, view, note=note) if streaming else list(results)
    if not streaming:  # printed once the progress bar is gone
        render.emit(collected, fmt_name, view)
    if tagger is not None:
        note(tagger.summary())
    if sorter is not None:
        note(printable(sorter.summary()))
    _summarize_failures(failed, total)
    return failed + (tagger.failed if tagger else 0) + (sorter.plan.skipped if sorter else 0)


def _adapter(engine, example_set, labels, templates, note, error_line):
    """The examples' Tip-Adapter: embedded (cached), weights chosen by leave-one-out, reported."""
    from ..examples import TipAdapter, embed_examples

    with _status("embedding the examples"):
        keys, key_labels = embed_examples(engine, example_set, error_line)
    adapter = TipAdapter(engine.label_embeddings(labels, templates), keys, key_labels, engine.logit_scale, engine.logit_bias)
    adapter.choose()
    note(adapter.describe())
    return adapter.logits


def _status(message):
    from .terminal import status

    return status(message)



