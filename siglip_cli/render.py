"""Results -> stdout as a Rich table, JSON, JSON lines or CSV; logs -> stderr. No torch here."""

from __future__ import annotations

import csv
import json
import sys
from typing import IO, Iterable, Sequence

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .results import ImageScores

MATRIX_MAX_LABELS = 6  # more labels than this: the many-image table shows the top 3 instead


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def stdout_console(file: IO[str] | None = None) -> Console:
    return Console(file=file, highlight=False, soft_wrap=False)


def resolve_format(name: str, stream: IO[str] | None = None) -> str:
    if name != "auto":
        return name
    stream = stream or sys.stdout
    return "table" if getattr(stream, "isatty", lambda: False)() else "jsonl"


def clean_float(value: float) -> float:
    """float32 carries ~7 significant digits; print no more than that."""
    return float(f"{float(value):.7g}")


def format_score(score: float) -> str:
    """Always a percentage, so a column never mixes units: 18.8%, 0.0070%, 1.2e-07%."""
    percent = score * 100
    if percent >= 0.1 or percent == 0:
        return f"{percent:.1f}%"
    if percent >= 1e-4:
        return f"{percent:.2g}%"
    return f"{percent:.1e}%"


# --------------------------------------------------------------------------- classify
def classify_records(results: Iterable[ImageScores]) -> list[dict]:
    records = []
    for result in results:
        record = result.to_dict()
        for label in record.get("labels", []):
            label["score"] = clean_float(label["score"])
            label["logit"] = clean_float(label["logit"])
        records.append(record)
    return records


def write_json(records: list[dict], out: IO[str]) -> None:
    json.dump(records, out, ensure_ascii=False, indent=2)
    out.write("\n")


def write_jsonl(records: Iterable[dict], out: IO[str]) -> None:
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_classify_csv(records: list[dict], out: IO[str]) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "rank", "label", "score", "logit", "error"])
    for record in records:
        if "error" in record:
            writer.writerow([record["path"], "", "", "", "", record["error"]])
            continue
        if not record["labels"]:  # every label cut by --threshold: the image is still listed
            writer.writerow([record["path"], "", "", "", "", ""])
        for rank, label in enumerate(record["labels"], 1):
            writer.writerow([record["path"], rank, label["label"], label["score"], label["logit"], ""])


def classify_table(results: Sequence[ImageScores], labels: Sequence[str], mode: str) -> Group:
    """One image: its labels with scores and bars. Many: images x labels, best marked.
    A line under the table says how to read the scores."""
    good = [r for r in results if r.error is None]
    note = (
        "softmax over the given labels: scores sum to 100%"
        if mode == "softmax"
        else "sigmoid: each label is scored on its own; scores do not sum to 100%"
    )
    if len(results) == 1 and good:
        table = _single_table(good[0])
        if not good[0].labels:
            note = "no label reached the --threshold; " + note
    elif len(labels) <= MATRIX_MAX_LABELS:
        table = _matrix_table(results, labels)
        note += "; ★ marks each image's best label"
    else:
        table = _top_table(results)
    return Group(table, Text(note, style="dim"))


def _cause(result: ImageScores) -> str:
    """The error without the path the row already shows."""
    prefix = f"{result.path}: "
    return "error: " + (result.error[len(prefix):] if result.error.startswith(prefix) else result.error)


def _bar(score: float, width: int = 20) -> str:
    filled = round(max(0.0, min(1.0, score)) * width)
    return "█" * filled + "·" * (width - filled)


def _single_table(result: ImageScores) -> Table:
    table = Table(title=Text(result.path), title_justify="left")
    table.add_column("label")
    table.add_column("score", justify="right")
    table.add_column("", no_wrap=True)
    table.add_column("logit", justify="right", style="dim")
    for i, item in enumerate(result.labels):
        style = "bold" if i == 0 else ""
        table.add_row(Text(item.label, style=style), format_score(item.score), _bar(item.score), f"{item.logit:.2f}")
    return table


def _matrix_table(results: Sequence[ImageScores], labels: Sequence[str]) -> Table:
    table = Table()
    table.add_column("image", overflow="fold")
    for label in labels:
        table.add_column(Text(label), justify="right")
    for result in results:
        if result.error is not None:
            table.add_row(Text(result.path), Text(_cause(result), style="red"), *[""] * (len(labels) - 1))
            continue
        by_label = {item.label: item.score for item in result.labels}
        best = result.labels[0].label if result.labels else None
        cells = []
        for label in labels:
            if label not in by_label:
                cells.append(Text("–", style="dim"))
            elif label == best:
                cells.append(Text(f"★ {format_score(by_label[label])}", style="bold"))
            else:
                cells.append(Text(format_score(by_label[label])))
        table.add_row(Text(result.path), *cells)
    return table


def _top_table(results: Sequence[ImageScores], top: int = 3) -> Table:
    table = Table()
    table.add_column("image", overflow="fold")
    for rank in ("best", "2nd", "3rd")[:top]:
        table.add_column(rank)
    for result in results:
        if result.error is not None:
            table.add_row(Text(result.path), Text(_cause(result), style="red"), *[""] * (top - 1))
            continue
        cells = [f"{item.label} ({format_score(item.score)})" for item in result.labels[:top]]
        cells += [""] * (top - len(cells))
        table.add_row(Text(result.path), Text(cells[0], style="bold"), *[Text(c) for c in cells[1:]])
    return table


# --------------------------------------------------------------------------- similarity
def matrix_table(title: str, row_names: Sequence[str], col_names: Sequence[str], values, fmt=lambda v: f"{v:.3f}") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("", overflow="fold")
    for name in col_names:
        table.add_column(Text(name), justify="right", overflow="fold")
    for i, name in enumerate(row_names):
        table.add_row(Text(name), *[fmt(values[i][j]) for j in range(len(col_names))])
    return table
