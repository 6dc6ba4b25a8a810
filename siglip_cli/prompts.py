"""Labels and prompt templates.

A label becomes a prompt through a template ("This is a photo of {}." by default, the one
transformers' zero-shot pipeline and the SigLIP docs use). Several templates make a prompt
ensemble: each label's text embedding is the mean of its normalised per-template embeddings,
normalised again (as open_clip and CLIP_benchmark build zero-shot classifiers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .core.errors import UsageError, cannot_read

DEFAULT_TEMPLATE = "This is a photo of {}."
PLACEHOLDER = "{}"


@dataclass
class Labels:
    labels: list[str]
    duplicates: list[str] = field(default_factory=list)  # each repeated label, once


def split_labels(text: str) -> list[str]:
    """Comma-separated labels, with CSV quoting: '"red, white and blue",a dog' is two labels."""
    import csv

    try:
        rows = list(csv.reader([text], skipinitialspace=True, strict=True))
    except csv.Error:
        raise UsageError(f"--labels {text!r}: unbalanced quotes; put a label with commas in double quotes, or use --label") from None
    return [part.strip() for part in (rows[0] if rows else [])]


def read_lines(path: str | Path, what: str = "file") -> list[str]:
    """Lines of a UTF-8 text file named by an option ('-' is stdin), without line ends. A file
    that cannot be read is a usage error: the option is wrong, not an input."""
    import sys

    try:
        if str(path) == "-":
            content = sys.stdin.read()
        else:
            content = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except FileNotFoundError:
        raise UsageError(f"{path}: no such {what}") from None
    except OSError as exc:
        raise UsageError(cannot_read(str(path), exc, f"a {what}")) from None
    return content.splitlines()


def collect_labels(
    comma_separated: Sequence[str] = (),
    single: Sequence[str] = (),
    files: Sequence[str | Path] = (),
) -> Labels:
    """--labels "a,b" (comma-separated), --label "x, y" (one label, commas kept), --labels-file.
    Blank labels are dropped; repeats are kept once and reported; none left is a usage error."""
    raw: list[str] = []
    for text in comma_separated:
        raw.extend(split_labels(text))
    raw.extend(label.strip() for label in single)
    for path in files:
        raw.extend(line.strip() for line in read_lines(path, "labels file"))
    return dedupe([label for label in raw if label])


def dedupe(labels: Iterable[str]) -> Labels:
    seen: dict[str, int] = {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
    if not seen:
        raise UsageError("no labels given: use --labels \"a cat,a dog\", --label or --labels-file")
    return Labels(list(seen), [label for label, count in seen.items() if count > 1])


def check_template(template: str) -> str:
    if PLACEHOLDER not in template:
        raise UsageError(f"--template {template!r} has no {{}} where the label goes, e.g. \"a photo of {{}}.\"")
    return template


def resolve_templates(templates: Sequence[str] | str | None, use_template: bool = True) -> list[str]:
    """The templates to apply: the default, the user's (checked), or the identity."""
    if not use_template:
        if templates:
            raise UsageError("--template and --no-template contradict each other; give one of them")
        return [PLACEHOLDER]
    if templates is None or (not isinstance(templates, str) and len(templates) == 0):
        return [DEFAULT_TEMPLATE]
    if isinstance(templates, str):
        templates = [templates]
    return [check_template(t) for t in dict.fromkeys(templates)]


def fill(template: str, label: str) -> str:
    # str.replace, not str.format: a label or template holding other braces must not break.
    return template.replace(PLACEHOLDER, label)
