"""Command-line inputs -> a flat, ordered list of image sources.

Files as given; folders expanded to the images inside, sorted (recursively with --recursive);
glob patterns (`*.jpg`, `photos/**/*.png`) expanded and sorted; `-` reads one path per line from
stdin; http(s) URLs pass through. A folder that cannot be listed or a pattern that matches
nothing becomes an input that failed, reported like a bad file, so the rest still runs.
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, TextIO

from .errors import InputError, UsageError
from .images import IMAGE_SUFFIXES, is_url

_GLOB_CHARS = set("*?[")


@dataclass
class Source:
    name: str
    value: object  # a path string, a URL, or an InputError when the input could not be listed


def _folder_images(folder: Path, recursive: bool) -> list[Source]:
    found: list[Source] = []
    errors: list[Source] = []

    def on_error(exc: OSError) -> None:
        errors.append(Source(str(exc.filename), InputError(f"{exc.filename}: cannot list folder ({exc.strerror})")))

    if recursive:
        walker = os.walk(folder, onerror=on_error, followlinks=False)
    else:
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            on_error(exc)
            entries = []
        walker = [(str(folder), [], [e.name for e in entries if e.is_file()])]
    for root, dirs, files in walker:
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                path = os.path.join(root, name)
                found.append(Source(path, path))
    return sorted(found, key=lambda s: s.name) + errors


def expand(arguments: Iterable[str], recursive: bool = False, stdin: TextIO | None = None) -> list[Source]:
    sources: list[Source] = []
    for argument in arguments:
        if argument == "-":
            # Only line ends are removed: a file name may begin or end with a space.
            lines = (stdin or sys.stdin).read().split("\n")
            for line in lines:
                line = line.removesuffix("\r")
                if line.strip():
                    sources.extend(_expand_many(line, recursive))
            continue
        if not argument.strip():
            raise UsageError("an empty path was given (an unset shell variable?); give a file, folder, pattern or URL")
        sources.extend(_expand_many(argument, recursive))
    return sources


def _expand_many(argument: str, recursive: bool) -> list[Source]:
    if is_url(argument):
        return [Source(argument, argument)]
    path = Path(argument).expanduser()
    if path.is_dir():
        listed = _folder_images(path, recursive)
        if not listed:
            return [Source(argument, InputError(f"{argument}: folder holds no image files{'' if recursive else ' (add --recursive for sub-folders)'}"))]
        return listed
    if not path.exists() and _GLOB_CHARS & set(argument):
        matches = sorted(m for m in glob.glob(str(path), recursive=True) if os.path.isfile(m))
        if not matches:
            return [Source(argument, InputError(f"{argument}: no such file, and no files match it as a pattern"))]
        return [Source(m, m) for m in matches]
    if argument.startswith("~"):
        return [Source(str(path), str(path))]  # quoted, so the shell did not expand it
    return [Source(argument, argument)]  # a file, or a missing path that fails with its own message
