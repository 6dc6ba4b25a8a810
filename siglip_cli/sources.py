"""Inputs named on the command line -> an ordered list of image sources, and the inputs that
could not be listed, kept apart.

Files as given (a video too); folders expanded to the images inside, sorted (sub-folders with
`recursive`; videos only with `videos`, since one video costs as much as hundreds of photos);
glob patterns (`*.jpg`, `photos/**/*.png`) matched and sorted; `-` reads one path per line from
a stream; http(s) URLs pass through. The walk is iterative (any depth), never follows a
symbolic link to a folder, and never visits a folder twice. Only regular files are taken: a
FIFO, device or socket would block a reader forever, so it is reported instead. The same file
named twice (`a.jpg`, `./a.jpg`) is listed once.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, TextIO

from .core.errors import UsageError
from .core.images import IMAGE_SUFFIXES
from .core.video import VIDEO_SUFFIXES
from .urls import is_url, redact

_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Source:
    """One image input: `name` is how results and errors call it; `value` is what is read (a path
    or URL string; through the Python API also bytes, a PIL image or a uint8 array)."""

    name: str
    value: Any
    stamp: tuple[int, int] | None = None  # (size, mtime_ns) of a file when it was listed


@dataclass(frozen=True)
class Failure:
    """An input that failed before any decoding: a missing file, an unreadable folder, a FIFO."""

    name: str
    error: str
    before: int = 0  # how many sources come before it in input order (to report it in place)


@dataclass
class Listing:
    sources: list[Source] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    duplicates: int = 0  # inputs named more than once, listed once

    def extend(self, other: "Listing") -> None:
        offset = len(self.sources)
        self.failures += [Failure(f.name, f.error, f.before + offset) for f in other.failures]
        self.sources += other.sources

    def in_order(self, results: Iterable, index=lambda result: result.index) -> Iterator:
        """`results` (one per source, in order) with the failures in their input positions, as
        (failure or None, result or None) pairs."""
        failures = sorted(self.failures, key=lambda f: f.before)
        position = 0
        for result in results:
            while position < len(failures) and failures[position].before <= index(result):
                yield failures[position], None
                position += 1
            yield None, result
        for failure in failures[position:]:
            yield failure, None


def _why_not_regular(mode: int) -> str:
    kind = (
        "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
        else "a socket" if stat.S_ISSOCK(mode)
        else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a folder" if stat.S_ISDIR(mode)
        else "not a regular file"
    )
    return f"is {kind}, not an image file; skipped"


def file_source(path: str, name: str | None = None) -> Source | Failure:
    """A regular file as a Source (with its size and modification time), or why it cannot be one."""
    name = name or path
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return Failure(name, f"{name}: broken symbolic link (its target is missing)")
        return Failure(name, f"{name}: no such file")
    except OSError as exc:
        if exc.errno == 40:  # ELOOP
            return Failure(name, f"{name}: symbolic link loop")
        return Failure(name, f"{name}: cannot read ({exc.strerror or exc})")
    if not stat.S_ISREG(st.st_mode):
        return Failure(name, f"{name}: {_why_not_regular(st.st_mode)}")
    return Source(name, path, (st.st_size, st.st_mtime_ns))


def _add(listing: "Listing", item: Source | Failure) -> None:
    if isinstance(item, Failure):
        listing.failures.append(Failure(item.name, item.error, len(listing.sources)))
    else:
        listing.sources.append(item)


def _is_image_name(name: str, videos: bool = False) -> bool:
    suffix = os.path.splitext(name)[1].lower()
    return not name.startswith(".") and (suffix in IMAGE_SUFFIXES or videos and suffix in VIDEO_SUFFIXES)


def _scan(folder: str, listing: Listing, videos: bool = False) -> tuple[list[str], list[str]]:
    """(image file paths, sub-folder paths) directly inside `folder`, sorted by name; with
    `videos`, video files count as images."""
    try:
        with os.scandir(folder) as entries:
            entries = sorted(entries, key=lambda e: e.name)
    except OSError as exc:
        _add(listing, Failure(folder, f"{folder}: cannot list folder ({exc.strerror or exc})"))
        return [], []
    files, folders = [], []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_folder = entry.is_dir(follow_symlinks=False)
        except OSError:
            is_folder = False
        if is_folder:
            folders.append(entry.path)
        elif _is_image_name(entry.name, videos):
            files.append(entry.path)
    return files, folders


def _walk(root: str, listing: Listing, recursive: bool, visited: set, videos: bool = False) -> Iterator[str]:
    """Image paths under `root` in sorted depth-first order, without recursion."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key in visited:
            continue
        visited.add(key)
        files, folders = _scan(folder, listing, videos)
        for path in files:
            yield path
        if recursive:
            # Files of a folder come before its sub-folders', and sub-folders in name order:
            # the same order as sorting the full paths.
            stack.extend(reversed(folders))


def _folder(argument: str, path: str, recursive: bool, videos: bool = False) -> Listing:
    listing = Listing()
    found = list(_walk(path, listing, recursive, set(), videos))
    for file in found:
        _add(listing, file_source(file))
    if not found and not listing.failures:
        _, sub_folders = _scan(path, Listing())
        hint = " (add --recursive for its sub-folders)" if sub_folders and not recursive else ""
        if not videos and list(_walk(path, Listing(), recursive, set(), videos=True)):
            hint = " (it holds videos: add --video to sample their frames)"
        _add(listing, Failure(argument, f"{argument}: folder holds no image files{hint}"))
    return listing


def glob_regex(pattern: str) -> re.Pattern:
    """A glob pattern (relative, `/`-separated) as a regular expression: `*` and `?` stay inside
    one path component, `**` spans any number of folders, `[...]` is a character class."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            out.append("[" + ("^" if negate else "") + body.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _glob(argument: str, pattern: str) -> Listing:
    """Files matching a glob pattern, sorted; walks only as deep as the pattern reaches."""
    parts = pattern.split(os.sep)
    fixed = 0
    while fixed < len(parts) - 1 and not (_GLOB_CHARS & set(parts[fixed])):
        fixed += 1
    base = os.sep.join(parts[:fixed]) or ("/" if pattern.startswith(os.sep) else ".")
    if pattern.startswith(os.sep) and fixed == 0:
        base = "/"
    rest = "/".join(p for p in parts[fixed:])
    matcher = glob_regex(rest)
    depth = None if "**" in rest else rest.count("/")
    listing = Listing()
    matches = []
    visited: set = set()
    stack = [(base, 0)]
    while stack:
        folder, level = stack.pop()
        try:
            st = os.stat(folder)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in visited:
            continue
        visited.add((st.st_dev, st.st_ino))
        try:
            with os.scandir(folder) as entries:
                entries = list(entries)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            relative = os.path.relpath(entry.path, base).replace(os.sep, "/")
            try:
                is_folder = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_folder = False
            if is_folder:
                if depth is None or level < depth:
                    stack.append((entry.path, level + 1))
            elif matcher.match(relative):
                matches.append(entry.path if base != "." else os.path.relpath(entry.path, "."))
    for path in sorted(matches):
        _add(listing, file_source(path))
    if not matches:
        _add(listing, Failure(argument, f"{argument}: no such file, and no files match it as a pattern"))
    return listing


def _one(argument: str, recursive: bool, videos: bool = False) -> Listing:
    if is_url(argument):
        return Listing([Source(redact(argument), argument)])
    path = os.path.expanduser(argument)
    if os.path.isdir(path):
        return _folder(argument, path, recursive, videos)
    if not os.path.lexists(path) and _GLOB_CHARS & set(argument):
        return _glob(argument, path)
    name = path if argument.startswith("~") else argument  # quoted, so the shell did not expand it
    listing = Listing()
    _add(listing, file_source(path, name))
    return listing


def _identity(source: Source) -> str:
    if isinstance(source.value, str) and not is_url(source.value):
        return os.path.normpath(os.path.abspath(source.value))
    return source.name


def expand(arguments: Iterable[str], recursive: bool = False, stdin: TextIO | None = None, videos: bool = False) -> Listing:
    """Every argument expanded in order; `-` reads paths from `stdin`, one per line (only line
    ends are removed: a file name may begin or end with a space). Folders give their videos
    too with `videos`; a video named as a file (or matched by a pattern) is always taken."""
    listing = Listing()
    for argument in arguments:
        if argument == "-":
            if stdin is None:
                import sys

                stdin = sys.stdin
            for line in stdin.read().split("\n"):
                line = line.removesuffix("\r")
                if line.strip():
                    listing.extend(_one(line, recursive, videos))
            continue
        if not argument.strip():
            raise UsageError("an empty path was given (an unset shell variable?); give a file, folder, pattern or URL")
        listing.extend(_one(argument, recursive, videos))
    seen: set[str] = set()
    unique = []
    new_position = []  # old source position -> how many unique sources precede it
    for source in listing.sources:
        new_position.append(len(unique))
        key = _identity(source)
        if key in seen:
            listing.duplicates += 1
            continue
        seen.add(key)
        unique.append(source)
    new_position.append(len(unique))
    listing.failures = [Failure(f.name, f.error, new_position[f.before]) for f in listing.failures]
    listing.sources = unique
    return listing
