"""Every command's results -> stdout, in every format: table, json, jsonl, csv. No torch here.

One place rounds floats (7 significant digits, what float32 carries; non-finite numbers become
null, as JSON has no NaN) and one place fits tables to the terminal: numbers are never cut; long
paths are shortened in the middle, and columns that do not fit are dropped with a note.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterable, Sequence

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ..results import BenchRow, DuplicateGroup, ImageScores, IndexInfo, InputFailure, NeighbourHistogram, SearchHit, SearchResult, SimilarityMatrix, VideoSummary
from .terminal import end_activity, printable

FORMATS = ("table", "json", "jsonl", "csv", "paths", "paths0")
MATRIX_MAX_LABELS = 6  # more labels than this: the many-image table shows the best 3 instead
TOP_LABELS = 3


# ============================================================================ plumbing
def stdout_console(file: IO[str] | None = None, width: int | None = None) -> Console:
    console = Console(file=file, highlight=False, soft_wrap=False, width=width)
    if width is None and not console.is_terminal and not os.environ.get("COLUMNS", "").strip().isdigit():
        console.width = max(console.width, 120)  # a saved report keeps its columns; COLUMNS still rules
    return console


def note_line(text: str, style: str = "dim") -> Text:
    """A footnote or warning as one line, however long: the terminal wraps it where it must, and
    a pipe or a saved report gets the sentence whole (never broken after `--attn`)."""
    return Text(text, style=style, no_wrap=True, overflow="ignore")


def resolve_format(name: str, stream: IO[str] | None = None) -> str:
    if name != "auto":
        return name
    stream = stream or sys.stdout
    return "table" if getattr(stream, "isatty", lambda: False)() else "jsonl"


def clean(value: Any) -> Any:
    """Floats to 7 significant digits, NaN and infinities to None, recursively."""
    if isinstance(value, float):
        return float(f"{value:.7g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def json_text(record: Any, indent: int | None = None) -> str:
    return json.dumps(clean(record), ensure_ascii=False, indent=indent, allow_nan=False)


def format_score(score: float) -> str:
    """Always a percentage, so a column never mixes units: 18.8%, 0.0070%, 1.2e-07%."""
    if score is None or not math.isfinite(score):
        return "n/a"
    percent = score * 100
    if percent >= 0.1 or percent == 0:
        return f"{percent:.1f}%"
    if percent >= 1e-4:
        return f"{percent:.2g}%"
    return f"{percent:.1e}%"


def display_path(path: str) -> str:
    """A path as short as it can be read (relative to the working folder when inside it), and
    safe to show: control characters written out (terminal.printable)."""
    return printable(_shortest_path(path))


def _shortest_path(path: str) -> str:
    if "://" in path or not os.path.isabs(path):
        return path
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return path
    return relative if not relative.startswith("..") else path


def quoted(text: str) -> str:
    """A text (a label, a query, a text row) as a table shows it: in quotes, control
    characters written out."""
    return f'"{printable(text)}"'


def ellipsize(text: str, width: int) -> str:
    """Shorten `text` to `width` cells by cutting its middle (a path's folder and file name
    both stay readable)."""
    if len(text) <= width or width < 5:
        return text
    keep = width - 1
    head = keep // 2
    return text[:head] + "…" + text[len(text) - (keep - head):]


def _min_width(table: Table, console: Console) -> int:
    return table.__rich_measure__(console, console.options).minimum


def _natural_width(table: Table, console: Console) -> int:
    """The width the table takes with no cell wrapped or cut."""
    return table.__rich_measure__(console, console.options).maximum


# ============================================================================ views
@dataclass
class View:
    """How one command's results look in each format."""

    table: Callable[[list, Console], Any]
    csv_header: Sequence[str]
    csv_rows: Callable[[Any], Iterable[Sequence]]
    json_document: Callable[[list], Any] = lambda results: [r.to_record() for r in results]
    jsonl_records: Callable[[Any], Iterable[dict]] = lambda result: [result.to_record()]
    paths: Callable[[Any], Iterable[str]] | None = None  # --format paths: the file names a result lists


def emit(results: Iterable[Any], fmt: str, view: View, out: IO[str] | None = None, console: Console | None = None,
         note: Callable[[str], None] | None = None) -> list:
    """Print `results` in `fmt`. JSON lines and paths stream (each record as soon as its result
    exists); the other formats need every result first. Returns the results. `note` tells
    (on stderr) what the paths format had to leave out."""
    out = out or sys.stdout
    end_activity()  # the spinner (stderr) leaves the screen before any result is printed
    if fmt in ("paths", "paths0"):
        return _emit_paths(results, fmt == "paths0", view, out, note or _stderr_note)
    if fmt == "jsonl":
        kept = []
        for result in results:
            for record in view.jsonl_records(result):
                out.write(json_text(record) + "\n")
            out.flush()
            kept.append(result)
        return kept
    results = list(results)
    if fmt == "json":
        out.write(json_text(view.json_document(results), indent=2) + "\n")
    elif fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(view.csv_header)
        for result in results:
            for row in view.csv_rows(result):
                writer.writerow(["" if v is None else clean(v) for v in row])
    else:
        console = console or stdout_console(out if out is not sys.stdout else None)
        console.print(view.table(results, console), crop=False)  # crop=False: a note_line stays whole
    out.flush()
    return results


# ============================================================================ paths
def _stderr_note(message: str) -> None:
    sys.stderr.write(f"siglip: {message}\n")


def _emit_paths(results: Iterable[Any], null: bool, view: View, out: IO[str], note: Callable[[str], None]) -> list:
    """One path per line, exactly as stored (bytes of non-UTF-8 names included), or ended by NUL
    bytes (`null`). A name holding a line break would read as two lines: it is left out with a
    note (use --null). On a terminal, names are shown with their control characters escaped."""
    end = "\0" if null else "\n"
    terminal = getattr(out, "isatty", lambda: False)()
    binary = None if terminal else getattr(out, "buffer", None)  # exact bytes into a pipe or file
    out.flush()
    kept, broken = [], []
    for result in results:
        for name in view.paths(result) if view.paths else []:
            if not null and "\n" in name:
                broken.append(name)
            elif binary is not None:
                binary.write((name + end).encode("utf-8", "surrogateescape"))
            else:
                out.write((printable(name) if terminal else name) + end)
        (binary or out).flush()  # each result as soon as it exists: `| head` and viewers start early
        kept.append(result)
    if broken:
        more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
        note(f"left out {len(broken)} path(s) holding a line break, which one path per line cannot carry: "
             f"{printable(broken[0])}{more}; use --null (-0) to list them")
    return kept


# ============================================================================ classify
def _cause(path: str, error: str) -> str:
    """An error without the path its row already shows, safe to show."""
    prefix = f"{path}: "
    return printable(error[len(prefix):] if error.startswith(prefix) else error)


def _path_budget(console: Console, other_columns_width: int) -> int:
    return max(16, console.width - other_columns_width)


def time_code(seconds: float) -> str:
    """12.5 -> 00:00:12.5. (core.video.time_code's twin: the renderer imports only results.)"""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    fraction = f"{seconds - whole:.3f}".rstrip("0").rstrip(".")
    tail = fraction[1:] if fraction not in ("0", "") else ""
    return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}{tail}"


def _video_table(summaries: list[VideoSummary], console: Console) -> Table:
    """Each video's labels: the best frame's score and time, and the ranges at or above
    --threshold. Every number stays whole; long paths shrink."""
    ranged = any(item.ranges is not None for s in summaries for item in s.labels)
    table = Table(title=Text("videos: each label's best frame", style="bold"), title_justify="left")
    table.add_column("video", no_wrap=True)
    table.add_column("frames", justify="right", no_wrap=True)
    table.add_column("label", overflow="fold")
    table.add_column("best", justify="right", no_wrap=True)
    table.add_column("at", no_wrap=True)
    if ranged:
        table.add_column("at or above --threshold", overflow="fold")
    budget = _path_budget(console, 50 + (25 if ranged else 0))
    for summary in summaries:
        first = True
        for item in summary.labels or [None]:
            cells = [_image_cell(summary.path, budget) if first else "", str(summary.frames) if first else ""]
            if item is None:
                cells += [Text("no label reached the --threshold", style="dim"), "", ""] + ([""] if ranged else [])
            else:
                cells += [item.label, format_score(item.score), time_code(item.time)]
                if ranged:
                    cells.append(", ".join(f"{time_code(a)}–{time_code(b)}" if b > a else time_code(a) for a, b in item.ranges or []) or "–")
            table.add_row(*cells)
            first = False
    return table


def classify_table(results: list, console: Console, labels: Sequence[str] = (), mode: str = "sigmoid", frames: bool = False) -> Group:
    """One image: its labels with scores and bars. Many: images x labels (best marked), or the
    best three per image when there are many labels. Errors are listed under the table, so their
    text never widens a score column. Videos: a table of their summaries; their frames are rows
    of the images' table only with `frames` (--frames)."""
    summaries = [r for r in results if isinstance(r, VideoSummary)]
    results = [r for r in results if not isinstance(r, VideoSummary) and (frames or r.time < 0)]
    if summaries and not results:
        notes = ["sigmoid: each label is scored on its own" if mode != "softmax" else "softmax over the given labels",
                 "--frames shows every frame"]
        return Group(_video_table(summaries, console), Text("; ".join(notes), style="dim"))
    good = [r for r in results if r.error is None]
    notes = [
        "softmax over the given labels: scores sum to 100%"
        if mode == "softmax"
        else "sigmoid: each label is scored on its own; scores do not sum to 100%"
    ]
    parts: list[Any] = []
    if len(results) == 1 and good:
        if good[0].labels:
            parts.append(_single_table(good[0], console))
        else:  # a header over no rows would only show an empty bar column
            parts.append(Text(ellipsize(display_path(good[0].path), console.width - 2)))
            notes.insert(0, "no label reached the --threshold")
    else:
        errors = [r for r in results if r.error is not None]
        if len(labels) <= MATRIX_MAX_LABELS:
            table = _matrix_table(results, labels, console)
            if table is not None:
                notes.append("★ marks each image's best label")
        else:
            table = None
        if table is None:
            table = _top_table(results, console)
            shown = min(TOP_LABELS, len(labels))
            if len(labels) > shown:
                notes.append(f"showing the best {shown} of {len(labels)} labels per image; --format json or csv lists all")
        parts.append(table)
        for mark, result in enumerate(errors, 1):
            parts.append(Text(f"[{mark}] {display_path(result.path)}: {_cause(result.path, result.error)}", style="red"))
    if any(r.actions for r in results):
        parts.append(_actions_table(results, console))
    if summaries:
        parts.append(_video_table(summaries, console))
        if not frames:
            notes.append("--frames shows every frame")
    parts.append(note_line("; ".join(notes)))
    return Group(*parts)


def _actions_table(results: list[ImageScores], console: Console) -> Table:
    """--sort-into / --write-xmp: what was done (or, in a dry run, would be) with each image."""
    planned = any(a.planned for r in results for a in r.actions)
    table = Table(title="plan (dry run: nothing was changed)" if planned else "files written", title_justify="left")
    table.add_column("image", overflow="fold")
    table.add_column("action", no_wrap=True)
    table.add_column("to", overflow="fold")
    for result in results:
        for action in result.actions:
            what = action.action + (f" ({action.method})" if action.method and action.method != action.action else "")
            where = Text(_printable(display_path(action.destination))) if action.destination else Text(_printable(action.skipped or ""), style="red")
            table.add_row(Text(_printable(display_path(result.path))), what, where)
    return table


def _printable(text: str) -> str:
    """Control characters in a file name written as Python escapes, so it cannot move the cursor."""
    return text if text.isprintable() else "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _bar(score: float, width: int = 20) -> str:
    filled = round(max(0.0, min(1.0, score)) * width) if math.isfinite(score) else 0
    return "█" * filled + "·" * (width - filled)


def _single_table(result: ImageScores, console: Console) -> Table:
    table = Table(title=Text(ellipsize(display_path(result.path), console.width - 2)), title_justify="left")
    table.add_column("label", overflow="fold")
    table.add_column("score", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    table.add_column("logit", justify="right", style="dim", no_wrap=True)
    for i, item in enumerate(result.labels):
        table.add_row(Text(printable(item.label), style="bold" if i == 0 else ""), format_score(item.score), _bar(item.score), f"{item.logit:.2f}")
    if _min_width(table, console) > console.width:
        table.columns[2].visible = False  # the bar goes first; the numbers stay
    return table


def _error_marks(results: list[ImageScores]) -> dict[int, int]:
    marks, mark = {}, 0
    for i, result in enumerate(results):
        if result.error is not None:
            mark += 1
            marks[i] = mark
    return marks


def _image_cell(path: str, budget: int) -> Text:
    return Text(ellipsize(display_path(path), budget), no_wrap=True)


def _matrix_table(results: list[ImageScores], labels: Sequence[str], console: Console) -> Table | None:
    """Images x labels, or None when the label columns cannot fit the terminal."""
    score_width = 9  # "★ 100.0%"
    label_widths = [max(score_width, min(len(label), 14)) + 3 for label in labels]
    budget = _path_budget(console, sum(label_widths) + 4)
    if console.width - sum(label_widths) - 4 < 12:
        return None
    marks = _error_marks(results)
    table = Table()
    table.add_column("image", no_wrap=True)
    for label in labels:
        table.add_column(Text(printable(label)), justify="right", overflow="fold", min_width=score_width)
    for i, result in enumerate(results):
        if result.error is not None:
            table.add_row(_image_cell(result.path, budget), Text(f"error [{marks[i]}]", style="red"), *[""] * (len(labels) - 1))
            continue
        by_label = {item.label: item.score for item in result.labels}
        best = result.labels[0].label if result.labels else None
        cells = []
        for label in labels:
            if label not in by_label:
                cells.append(Text("–", style="dim"))
            elif label == best:
                cells.append(Text(f"★ {format_score(by_label[label])}", style="bold", no_wrap=True))
            else:
                cells.append(Text(format_score(by_label[label]), no_wrap=True))
        table.add_row(_image_cell(result.path, budget), *cells)
    return table


def _top_table(results: list[ImageScores], console: Console) -> Table:
    marks = _error_marks(results)
    budget = _path_budget(console, 3 * 22 + 4)
    table = Table()
    table.add_column("image", no_wrap=True)
    for rank in ("best", "2nd", "3rd")[:TOP_LABELS]:
        table.add_column(rank, overflow="fold")
    for i, result in enumerate(results):
        if result.error is not None:
            table.add_row(_image_cell(result.path, budget), Text(f"error [{marks[i]}]", style="red"), *[""] * (TOP_LABELS - 1))
            continue
        cells = [f"{printable(item.label)} ({format_score(item.score)})" for item in result.labels[:TOP_LABELS]]
        cells += [""] * (TOP_LABELS - len(cells))
        table.add_row(_image_cell(result.path, budget), Text(cells[0], style="bold"), *[Text(c) for c in cells[1:]])
    return table


def _classify_csv(result) -> Iterable[Sequence]:
    if isinstance(result, VideoSummary):  # the video's best score per label (frame rows, #t=..., hold the times)
        return [[result.path, rank, s.label, s.score, "", ""] for rank, s in enumerate(result.labels, 1)]
    if result.error is not None:
        return [[result.path, "", "", "", "", result.error]]
    if not result.labels:  # every label cut by --threshold: the image is still listed
        return [[result.path, "", "", "", "", ""]]
    return [[result.path, rank, s.label, s.score, s.logit, ""] for rank, s in enumerate(result.labels, 1)]


CLASSIFY_ACTION_COLUMNS = ["sorted_to", "planned", "xmp"]


def _classify_csv_with_actions(result) -> Iterable[Sequence]:
    """--sort-into / --write-xmp: each label's row says where the sort put the image for that
    label (the label-less row of an image no label passed: its _unsorted copy), `planned` on a
    --dry-run, and every row of the image names the sidecar its labels were written into. Empty
    where nothing was done (skipped actions are reported on stderr)."""
    actions = getattr(result, "actions", [])
    sidecar = next((a.destination for a in actions if a.action == "xmp" and a.destination), "") or ""
    rows = []
    for row in _classify_csv(result):
        label = row[2] or None
        sort = next((a for a in actions if a.action != "xmp" and a.destination and a.label == label), None)
        rows.append([*row, sort.destination if sort else "", "yes" if sort and sort.planned else "", sidecar])
    return rows


def classify_view(labels: Sequence[str], mode: str, frames: bool = False, actions: bool = False) -> View:
    """`actions`: the run sorts or tags, so the CSV gains sorted_to, planned and xmp columns."""
    return View(
        table=lambda results, console: classify_table(results, console, labels, mode, frames),
        csv_header=["path", "rank", "label", "score", "logit", "error", *(CLASSIFY_ACTION_COLUMNS if actions else [])],
        csv_rows=_classify_csv_with_actions if actions else _classify_csv,
        paths=lambda result: [result.path] if result.error is None and result.labels else [],
    )


# ============================================================================ similarity
def _matrix(title: str, row_names: Sequence[str], col_names: Sequence[str], values, fmt: Callable[[float], str], console: Console) -> Group:
    """A titled matrix; the title is a line of its own, so a narrow table does not fold it. Numbers
    are never cut: columns that do not fit the terminal go on to a next block of the same rows."""
    cells = [[fmt(values[i][j]) for j in range(len(col_names))] for i in range(len(row_names))]
    number_width = max((len(cell) for row in cells for cell in row), default=1)
    col_widths = [max(number_width, min(len(name), 14)) for name in col_names]
    row_width = min(max((len(name) for name in row_names), default=1), max(12, console.width // 3))

    def block(columns: range, row_width: int) -> Table:
        table = Table()
        table.add_column("", no_wrap=True)
        for j in columns:
            table.add_column(Text(ellipsize(col_names[j], col_widths[j])), justify="right", no_wrap=True, min_width=col_widths[j])
        for i, name in enumerate(row_names):
            table.add_row(Text(ellipsize(name, row_width)), *[cells[i][j] for j in columns])
        return table

    parts: list[Any] = []
    start = 0
    while start < len(col_names):
        end = start + 1
        while end < len(col_names) and _natural_width(block(range(start, end + 1), row_width), console) <= console.width:
            end += 1
        width = row_width
        if end == start + 1:  # one column: the row names give way to the numbers
            width = max(5, min(row_width, console.width - col_widths[start] - 7))
        parts.append(block(range(start, end), width))
        start = end
    if len(parts) > 1:
        title += f" (in {len(parts)} blocks of columns, to fit the terminal)"
    return Group(Text(title, style="bold"), *parts)


def _item_label(item) -> str:
    return display_path(item.name) if item.kind == "image" else quoted(item.name)


def similarity_table(results: list, console: Console) -> Group:
    parts: list[Any] = []
    for result in results:
        if isinstance(result, InputFailure):
            parts.append(Text(f"{display_path(result.path)}: {_cause(result.path, result.error)}", style="red"))
            continue
        matrix: SimilarityMatrix = result
        if matrix.rows and matrix.cols:
            parts.append(_matrix("cosine similarity", [_item_label(i) for i in matrix.rows], [_item_label(i) for i in matrix.cols],
                                 matrix.cosine, lambda v: f"{v:.3f}", console))
        if matrix.images and matrix.texts:
            parts.append(_matrix("SigLIP probability: sigmoid(exp(t) * cosine + b), each pair on its own",
                                 [_item_label(i) for i in matrix.images], [_item_label(i) for i in matrix.texts],
                                 matrix.pair_probabilities, format_score, console))
    return Group(*parts)


def _similarity_jsonl(result) -> Iterable[dict]:
    if isinstance(result, InputFailure):
        return [result.to_record()]
    return [cell.to_record() for cell in result.cells()]


def _similarity_csv(result) -> Iterable[Sequence]:
    if isinstance(result, InputFailure):
        return [[result.path, "image", "", "", "", "", "", result.error]]
    return [[c.row.name, c.row.kind, c.col.name, c.col.kind, c.cosine, c.logit, c.probability, ""] for c in result.cells()]


def _similarity_json(results: list) -> dict:
    matrix = next(r for r in results if isinstance(r, SimilarityMatrix))
    record = matrix.to_record()
    record["errors"] = [r.to_record() for r in results if isinstance(r, InputFailure)]
    return record


SIMILARITY_VIEW = View(
    table=similarity_table,
    csv_header=["row", "row_kind", "col", "col_kind", "cosine", "logit", "probability", "error"],
    csv_rows=_similarity_csv,
    json_document=_similarity_json,
    jsonl_records=_similarity_jsonl,
)


# ============================================================================ search
def hit_name(hit: SearchHit) -> str:
    return display_path(hit.path) if hit.kind == "image" else quoted(hit.path)


def search_title(result: SearchResult, width: int) -> Text:
    label = quoted(result.query) if result.kind == "text" else display_path(result.query)
    return Text(ellipsize(label, width - 2), style="bold")


def search_ranking(result: SearchResult, console: Console) -> Table:
    """One query's hits: rank, score and path. SigLIP gives a probability only to image-text
    pairs; hits of the query's own kind (an image query's images) show their cosine instead,
    in a column of its own so that no column mixes the two."""
    scored = any(h.score is not None for h in result.hits)
    unscored = any(h.score is None for h in result.hits)
    timed = any(h.time >= 0 for h in result.hits)  # video frames: the time code in a column of its own
    table = Table(title=search_title(result, console.width), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("rank", justify="right", no_wrap=True)
    if scored or not result.hits:
        table.add_column("score", justify="right", no_wrap=True)
    if unscored:
        table.add_column("cosine", justify="right", no_wrap=True)
    if timed:
        table.add_column("time", no_wrap=True)
    table.add_column("path", no_wrap=True)
    budget = max(16, console.width - 8 - 9 * (scored + unscored) - 14 * timed)
    for hit in result.hits:
        cells = [str(hit.rank)]
        if scored:
            cells.append(format_score(hit.score) if hit.score is not None else "–")
        if unscored:
            cells.append(f"{hit.cosine:.3f}")
        if timed:
            cells.append(time_code(hit.time) if hit.time >= 0 else "")
        name = display_path(hit.path.rpartition("#t=")[0]) if hit.time >= 0 else hit_name(hit)
        table.add_row(*cells, Text(ellipsize(name, budget)))
    if not result.hits:
        why = "nothing reached the --threshold" if result.threshold is not None else "no rows to search in this index"
        table.add_row("", "", Text(why, style="dim"))
    return table


def search_table(results: list[SearchResult], console: Console) -> Group:
    parts: list[Any] = []
    for result in results:
        if result.error is not None:
            parts.append(Text(f"{display_path(result.query)}: {_cause(result.query, result.error)}", style="red"))
        else:
            parts.append(search_ranking(result, console))
    if any(h.score is not None for r in results for h in r.hits):
        parts.append(note_line("score: SigLIP's sigmoid probability that the image matches the text, each judged on its own"))
    return Group(*parts)


def _search_csv(result: SearchResult) -> Iterable[Sequence]:
    if result.error is not None:
        return [[result.query, "", "", "", "", "", result.error]]
    return [[result.query, h.rank, h.path, h.kind, h.score, h.cosine, ""] for h in result.hits]


def _search_paths(result: SearchResult) -> list[str]:
    return [] if result.error is not None else [hit.path for hit in result.hits if hit.kind == "image"]


SEARCH_VIEW = View(table=search_table, csv_header=["query", "rank", "path", "kind", "score", "cosine", "error"], csv_rows=_search_csv,
                   paths=_search_paths)


# ============================================================================ info
def human_bytes(count: int) -> str:
    """1234567 -> 1.2 MB (decimal units, as `ls -h --si` and file managers show them)."""
    size = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{count} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


_PATH_STYLES = {
    "absolute": "absolute",
    "relative": "relative to the folder embed ran in (an older store; --update stores them absolute)",
    "mixed": "some relative to the folder embed ran in (an older store; --update stores them absolute)",
    "none": "no files (URLs or texts only)",
}
INFO_SKIPPED_SHOWN = 10


def info_table(results: list[IndexInfo], console: Console) -> Group:
    info = results[0]
    table = Table(title=Text(printable(display_path(info.path)), style="bold"), title_justify="left",
                  box=box.SIMPLE_HEAD, show_header=False, pad_edge=False)
    table.add_column("field", style="dim", no_wrap=True)
    table.add_column("value", overflow="fold")
    rows = [("model", printable(info.model or "unknown")), ("revision", info.revision or "unknown"),
            ("model dtype", info.model_dtype or "unknown"), ("decode", info.decode or "unknown")]
    if info.max_patches is not None:
        rows.append(("patch budget", f"{info.max_patches} patches per image"))
    rows += [
        ("rows", f"{info.image_rows} image{'s' if info.image_rows != 1 else ''}, {info.text_rows} text{'s' if info.text_rows != 1 else ''}"),
        ("vectors", f"{info.dim}-d {info.dtype}" + ("" if info.normalized is None else ", L2-normalised" if info.normalized else ", not normalised")),
        ("templates", ", ".join(repr(t) for t in info.templates) if info.templates else "none (texts as typed)"),
        ("paths", _PATH_STYLES.get(info.paths, info.paths)),
        ("skipped", f"{len(info.skipped)} input{'s' if len(info.skipped) != 1 else ''}"),
        ("created", info.created or "unknown"),
        ("format", info.format),
        ("size", f"{human_bytes(info.bytes)} ({info.bytes:,} bytes) in {len(info.files)} file{'s' if len(info.files) != 1 else ''}"),
    ]
    for field_name, value in rows:
        table.add_row(field_name, Text(value))
    files = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    files.add_column("file", no_wrap=True)
    files.add_column("bytes", justify="right", no_wrap=True)
    for item in info.files:
        files.add_row(Text(ellipsize(printable(display_path(item.path)), max(16, console.width - 16))), f"{item.bytes:,}")
    parts: list[Any] = [table, files]
    for skipped in info.skipped[:INFO_SKIPPED_SHOWN]:
        path = str(skipped.get("path", ""))
        parts.append(Text(f"skipped {printable(display_path(path))}: {printable(_cause(path, str(skipped.get('error', ''))))}", style="yellow"))
    if len(info.skipped) > INFO_SKIPPED_SHOWN:
        parts.append(Text(f"and {len(info.skipped) - INFO_SKIPPED_SHOWN} more skipped inputs; --json lists all", style="dim"))
    if info.partial:
        parts.append(Text(f"an interrupted run's rows are in {printable(display_path(info.partial))}; "
                          "run the same embed command with --resume to finish it", style="yellow"))
    return Group(*parts)


def _info_csv(info: IndexInfo) -> Iterable[Sequence]:
    record = info.to_record()
    for key, value in record.items():
        if key == "files":
            yield from ([f"file {f['path']}", f["bytes"]] for f in value)
        elif key == "skipped":
            yield from ([f"skipped {s.get('path')}", s.get("error")] for s in value)
        elif key == "rows":
            yield from ([f"{kind} rows", count] for kind, count in value.items())
        elif key == "templates":
            yield [key, json.dumps(value, ensure_ascii=False)]
        else:
            yield [key, value]


INFO_VIEW = View(table=info_table, csv_header=["field", "value"], csv_rows=_info_csv,
                 json_document=lambda results: results[0].to_record())


# ============================================================================ embed (stdout rows)
EMBED_VIEW = View(
    table=lambda results, console: Text("embed prints JSON lines; use --out for files"),
    csv_header=["kind", "path", "embedding"],
    csv_rows=lambda row: [[row.kind, row.name, json.dumps(row.embedding)]],
)


# ============================================================================ bench
_BENCH_UNIT = {"vision": "images/s", "text": "texts/s", "classify": "images/s"}


def _bench_cells(row: BenchRow, marks: dict) -> dict[str, Any]:
    if row.status != "ok":
        mark = marks.setdefault(printable(f"{row.attn} {row.status}: {row.reason}"), len(marks) + 1)
        return {"batch": str(row.batch_size), "attn": row.attn, "rate": Text(f"{row.status} [{mark}]", style="yellow")}
    spread = ""
    if row.ms_min and row.ms_max:
        spread = f"{row.ms_min:,.2f}–{row.ms_max:,.2f} ({row.runs})"
    return {
        "batch": str(row.batch_size),
        "attn": row.attn,
        "rate": f"{row.items_per_s:,.1f}",
        "median": f"{row.ms_per_batch:,.2f}",
        "spread": spread,
        "vs_eager": f"{row.speedup_vs_eager:.2f}x" if row.speedup_vs_eager else "–",
        "diff": f"{row.max_abs_diff_vs_eager:.1e}" if row.max_abs_diff_vs_eager is not None else "–",
        "memory": f"{row.peak_mem_mb:,.0f}" if row.peak_mem_mb else "–",
        "tflops": f"{row.tflops:.3g}" if row.tflops is not None else "–",
        "peak": f"{row.pct_of_peak:.1f}%" if row.pct_of_peak is not None else "",
    }


# Columns in the order they are dropped when the terminal is too narrow: never the numbers that
# answer "how fast", never cut.
_BENCH_COLUMNS = [
    ("batch", "batch", True), ("attn", "attn", True), ("rate", None, True), ("median", "ms median", True),
    ("vs_eager", "vs eager", False), ("diff", "max|Δ| vs eager", False), ("spread", "min–max (runs)", False),
    ("memory", "peak MB", False), ("tflops", "TFLOP/s", False), ("peak", "% peak", False),
]
_BENCH_DROP_ORDER = ["peak", "tflops", "memory", "spread", "diff", "vs_eager"]


def _bench_group_table(tower: str, dtype: str, group: list[BenchRow], marks: dict, console: Console, has_peak: bool) -> tuple[Table, list[str]]:
    cells = [_bench_cells(row, marks) for row in group]
    keys = [key for key, _, _ in _BENCH_COLUMNS if key != "peak" or has_peak]
    dropped: list[str] = []
    while True:
        table = Table(title=f"{tower} tower, {dtype}" if tower != "classify" else f"classify, {dtype}",
                      title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for key, title, _ in _BENCH_COLUMNS:
            if key in keys:
                table.add_column(title or _BENCH_UNIT[tower], justify="left" if key == "attn" else "right", no_wrap=True)
        for row in cells:
            table.add_row(*[row.get(key, "–") for key in keys])
        optional = [k for k in _BENCH_DROP_ORDER if k in keys]
        if _natural_width(table, console) <= console.width or not optional:
            return table, dropped
        keys.remove(optional[0])
        dropped.append(dict((k, t) for k, t, _ in _BENCH_COLUMNS)[optional[0]])


def bench_table(rows: list[BenchRow], console: Console) -> Group:
    if not rows:
        return Group(Text("no rows"))
    first = rows[0]
    budget = f" at {first.max_patches} patches per image" if first.max_patches else ""
    parts: list[Any] = [Text(printable(f"{first.model}{budget} ({first.weights} weights) on {first.device}"), style="bold")]
    if first.cpu_features is not None:
        parts.append(Text(f"CPU flags: {' '.join(first.cpu_features) or 'none of ' + 'avx2, avx512, amx'}", style="dim"))
    auto = next((r for r in rows if r.dtype_auto), None)
    if auto:
        parts.append(Text(f"--dtype auto = {auto.dtype} here ({auto.dtype_auto})", style="dim"))
    marks: dict[str, int] = {}
    groups: dict[tuple[str, str], list[BenchRow]] = {}
    for row in rows:
        groups.setdefault((row.tower, row.dtype), []).append(row)
    dropped: set[str] = set()
    has_peak = any(r.pct_of_peak is not None for r in rows)
    for (tower, dtype), group in groups.items():
        table, gone = _bench_group_table(tower, dtype, group, marks, console, has_peak)
        dropped.update(gone)
        parts.append(table)
    for reason, mark in marks.items():
        parts.append(note_line(f"[{mark}] {reason}", style="yellow"))
    noisy = [r for r in rows if r.status == "ok" and r.ms_min and r.ms_max and r.ms_max > 1.5 * r.ms_min and r.runs >= 3]
    if noisy:
        parts.append(note_line(f"warning: {len(noisy)} row(s) varied by more than 1.5x between runs (min vs max): "
                               "the machine is busy or throttling; compare ratios from one run only", style="yellow"))
    for row in rows:
        if row.ours_sdpa_speedup:
            parts.append(note_line(f"{row.tower} {row.dtype} batch {row.batch_size}: ours (sdpa) is {row.ours_sdpa_speedup:.2f}x "
                                   "the speed of transformers' model (sdpa) on the same weights and inputs", style=""))
    kinds = sorted({r.peak_mem_kind for r in rows if r.peak_mem_kind})
    legend = ["max|Δ| = largest absolute output difference from eager on the same inputs"]
    if any(r.tower == "classify" for r in rows):
        legend.insert(0, "classify = uint8 pixels to the device, normalise, vision tower, sigmoid against 10 cached labels, back to the host")
    if kinds:
        legend.append(f"peak MB: {', '.join(kinds)}")
    if dropped:
        legend.append(f"columns left out to fit the terminal: {', '.join(sorted(dropped))} (--format json has all)")
    parts.append(note_line(". ".join(legend) + "."))
    return Group(*parts)


BENCH_VIEW = View(
    table=bench_table,
    csv_header=list(BenchRow.__dataclass_fields__),
    csv_rows=lambda row: [[" ".join(v) if isinstance(v, list) else v for v in row.to_record().values()]],
)


# ============================================================================ dedupe
def format_bytes(size: int) -> str:
    if size < 0:
        return "?"
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"



def _cosine_cell(cosine: float) -> str:
    """Four decimals, but never "1.0000" for a pair that is not identical: a re-encode at
    0.99996 shows as 0.99996, so it is not read as an exact copy."""
    text = f"{cosine:.4f}"
    if text == "1.0000" and cosine < 1.0:
        text = f"{min(cosine, 0.999999):.6f}"
    return text


def dedupe_table(groups: list[DuplicateGroup], console: Console) -> Any:
    """One table: each group's kept image first, then its duplicates with level and cosine
    (with the kept image); a rule between groups. Paths are shortened in the middle, never
    the numbers."""
    if not groups:
        return Text("no duplicates found", style="dim")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("group", justify="right", no_wrap=True)
    table.add_column("level", no_wrap=True)
    table.add_column("cosine", justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("path", no_wrap=True)
    moves = [d for g in groups for d in g.duplicates if d.destination is not None]
    if moves:
        table.add_column("would move to" if moves[0].planned else "moved to", no_wrap=True)
    budget = max(16, (console.width - 40) // (2 if moves else 1))
    for number, group in enumerate(groups):
        extra = [""] if moves else []
        table.add_row(str(group.group), Text("keep", style="bold green"), "", format_bytes(group.keep_bytes),
                      Text(ellipsize(display_path(group.keep), budget), style="bold"), *extra, end_section=False)
        for i, duplicate in enumerate(group.duplicates):
            if moves:
                extra = [Text(ellipsize(display_path(duplicate.destination), budget)) if duplicate.destination else Text("not moved", style="yellow")]
            table.add_row("", duplicate.level, _cosine_cell(duplicate.cosine), format_bytes(duplicate.size),
                          Text(ellipsize(display_path(duplicate.path), budget)), *extra,
                          end_section=i == len(group.duplicates) - 1 and number < len(groups) - 1)
    return table


def _dedupe_csv(group: DuplicateGroup) -> Iterable[Sequence]:
    return [[group.group, group.keep, d.path, d.level, d.cosine, d.destination, "yes" if d.planned else ""] for d in group.duplicates]


DEDUPE_VIEW = View(table=dedupe_table, csv_header=["group", "keep", "path", "level", "cosine", "move_to", "planned"], csv_rows=_dedupe_csv)


def dedupe_summary(groups: list[DuplicateGroup]) -> str:
    duplicates = [d for g in groups for d in g.duplicates]
    sizes = [d.size for d in duplicates]
    known = sum(s for s in sizes if s >= 0)
    unknown = " (some sizes unknown)" if any(s < 0 for s in sizes) else ""
    return (f"{len(groups)} group{'s' if len(groups) != 1 else ''}, {len(duplicates)} duplicate{'s' if len(duplicates) != 1 else ''}"
            f" taking {format_bytes(known)}{unknown}")


def histogram_text(histogram: NeighbourHistogram, width: int = 80) -> Text:
    """A terminal histogram of nearest-neighbour cosines, one bar per bin, lowest first; each
    threshold drawn as a line where it falls, so the gap between copies and distinct photos
    shows. Counts are printed in full beside every bar."""
    out = Text()
    out.append(f"nearest-neighbour cosine of each of {histogram.images} file{'s' if histogram.images != 1 else ''}\n", style="bold")
    edges, counts = histogram.edges, histogram.counts
    count_width = max(len(str(c)) for c in counts) if counts else 1
    bar_width = max(10, width - 14 - count_width - 3)
    top = max(counts) if counts and max(counts) else 1
    marks = sorted(histogram.thresholds.items(), key=lambda kv: kv[1])
    for low, high, count in zip(edges[:-1], edges[1:], counts):
        for name, value in marks:
            if low <= value < high or (high == edges[-1] and value == high):
                out.append(f"{'':>14}{'─' * 4} {name} threshold {value:.3f} {'─' * 4}\n", style="yellow")
        bar = "█" * (round(count / top * bar_width) if count else 0)
        label = f"{low:.3f}–{high:.3f}"
        out.append(f"{label:>13} {count:>{count_width}} ")
        out.append(bar + "\n", style="cyan")
    return out
