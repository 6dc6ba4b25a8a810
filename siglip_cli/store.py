"""The embedding files: one format description, a writer and a reader.

Every store is a table of rows in a fixed order. Each row has a **kind** (`image` or `text`), a
**name** (the image's path or URL, or the text itself), a **stamp** (the file's size and
modification time in ns, plus its SHA-256 when `--update=hash` asked for one; -1/empty for texts
and URLs), a **time** (a video frame's time in seconds, its name then ending in `#t=SECONDS`;
-1 for stills and texts) and an **embedding** (float32 or float16). The time is written only by
stores that hold video frames (the `time` field of the stamps, a `time` key or column); a store
without it, older ones included, reads back with -1 everywhere. Image rows come first, in input order, then
text rows. The meta (model, revision, dtype, settings, counts, skipped inputs) travels with it.

Formats, by the output's suffix:
- `.npy`: the (N, D) rows; beside it `<out>.paths.txt` (line i names row i; rows
  `meta.image_rows` and later are texts), `<out>.stamps.npy` (structured: size, mtime_ns,
  sha256[, time]) and `<out>.meta.json`.
- `.npz`: one file with `embeddings`, `paths`, `kinds`, `stamps` and `meta` (JSON text), stored
  uncompressed so the rows can be memory-mapped.
- `.jsonl`: one object per row: `{"kind", "path" | "text", "embedding", "size", "mtime_ns"[, "time"]}`.
- `.parquet`: columns `kind`, `path` (the text for text rows), `embedding` (fixed-size list),
  `size`, `mtime_ns`, `sha256`[, `time`]; the meta is in the file's key-value metadata under `siglip`.
Every format also gets `<out>.meta.json`, for people and `jq` (for `.npz` and `.parquet` the copy
inside the file is what is read back).

Writing. A run appends rows to `<out>.partial/` (`rows.bin` raw rows, `rows.jsonl` one
{kind, name, stamp} line per row, `skipped.jsonl`, `state.json` with the settings), flushing
each batch, so an interrupted run keeps its finished batches and `--resume` carries on. When the
run completes, the final files are assembled in plan order (from the partial rows, and for an
update from the previous store's rows) under temporary names, their space reserved up front,
flushed, and only then renamed into place: the main file last. A full disk or a crash leaves the
previous store whole. `<out>` is locked (`fcntl`) for the whole run, so two runs never write it
at once.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import shutil
import struct
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, Sized

import numpy as np

from .core.errors import OutputError, UsageError
from .safefiles import (  # noqa: F401  (OutputLock, atomic_write_text, temporary_beside: importable from here too)
    OutputLock,
    atomic_write_text,
    cannot_write,
    fsync_directory,
    make_directory,
    open_append,
    open_regular,
    read_regular,
    remove_file,
    reserve_space,
    signals_deferred,
    temporary_beside,
    text_temporary,
)
from .core.config import json_too_deep
from .store_meta import FORMAT_NAME, FORMAT_VERSION, NORM_TOLERANCE, damaged, parse_meta_json, validate_meta

OUTPUT_SUFFIXES = (".npy", ".npz", ".jsonl", ".parquet")
KINDS = ("image", "text")
STAMP_DTYPE = np.dtype([("size", "<i8"), ("mtime_ns", "<i8"), ("sha256", "S32")])
TIMED_STAMP_DTYPE = np.dtype([("size", "<i8"), ("mtime_ns", "<i8"), ("sha256", "S32"), ("time", "<f8")])
NO_STAMP = (-1, -1, b"")
NO_TIME = -1.0  # a still image's (or a text's) time
_CHUNK_ROWS = 8192


# ============================================================================ names and helpers
def sidecar(out: Path, suffix: str) -> Path:
    """vecs.npy -> vecs.npy.meta.json: named after the whole output name, so vecs.npy and
    vecs.npz never share one."""
    return out.with_name(out.name + suffix)


def output_files(out: Path) -> list[Path]:
    """Every file a store at `out` consists of."""
    files = [out, sidecar(out, ".meta.json")]
    if out.suffix == ".npy":
        files += [sidecar(out, ".paths.txt"), sidecar(out, ".stamps.npy")]
    return files


def check_output_path(out: Path) -> None:
    """Refuse an output name that cannot work, before any work is done."""
    if out.suffix not in OUTPUT_SUFFIXES:
        raise UsageError(f"--out {out}: use a .npy, .npz, .jsonl or .parquet file name")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")
    for path in output_files(out):
        if path.is_dir():
            raise UsageError(f"--out {out}: {path} is a folder")


_cannot_write = cannot_write
_remove = remove_file
_fsync_dir = fsync_directory
_reserve = reserve_space


def has_line_break(name: str) -> bool:
    """Only "\\n" separates lines in paths.txt; other line-break characters (U+2028, U+0085,
    "\\r") are kept as they are."""
    return "\n" in name


# ============================================================================ reading
def row_numbers(indices: Sequence[int], count: int) -> list[int]:
    """Row numbers as Python reads list indexes: -1 is the last row; a number outside the rows
    is an IndexError (never another row's name)."""
    out = []
    for index in indices:
        number = int(index)
        if number < 0:
            number += count
        if not 0 <= number < count:
            raise IndexError(f"row {int(index)} is outside the store's {count} rows")
        out.append(number)
    return out


class Names:
    """The names of a store's rows, decoded only when asked for: a search over a million rows
    needs ten of them, and decoding all of them costs more than the search."""

    def __len__(self) -> int:
        raise NotImplementedError

    def at(self, indices: Sequence[int]) -> list[str]:
        raise NotImplementedError

    def all(self) -> list[str]:
        return self.at(range(len(self)))


class ListNames(Names):
    def __init__(self, names: list[str]):
        self.names = names

    def __len__(self) -> int:
        return len(self.names)

    def at(self, indices: Sequence[int]) -> list[str]:
        return [self.names[i] for i in row_numbers(indices, len(self))]

    def all(self) -> list[str]:
        return self.names


class LineNames(Names):
    """The lines of `<out>.paths.txt`, kept as bytes. numpy finds the line ends of a million
    names in ~40 ms; decoding and splitting them all takes three times that."""

    def __init__(self, data: bytes):
        self.data = data
        ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
        if data and not data.endswith(b"\n"):  # a last line without its newline still counts
            ends = np.append(ends, len(data))
        self.ends = ends

    def __len__(self) -> int:
        return len(self.ends)

    def at(self, indices: Sequence[int]) -> list[str]:
        out = []
        for i in row_numbers(indices, len(self)):
            start = int(self.ends[i - 1]) + 1 if i > 0 else 0
            out.append(self.data[start : int(self.ends[i])].decode("utf-8", "surrogateescape"))
        return out

    def all(self) -> list[str]:
        names = self.data.decode("utf-8", "surrogateescape").split("\n")
        return names[: len(self)]


class ArrowNames(Names):
    def __init__(self, column):
        self.column = column

    def __len__(self) -> int:
        return len(self.column)

    def at(self, indices: Sequence[int]) -> list[str]:
        import pyarrow as pa

        # An explicit int64 array: pyarrow cannot take with an empty list (its type is null).
        return self.column.take(pa.array(row_numbers(indices, len(self)), pa.int64())).to_pylist()

    def all(self) -> list[str]:
        return self.column.to_pylist()


@dataclass(frozen=True)
class RowFile:
    """Where a store's rows lie raw on disk (C order, little-endian, the meta's dtype), so that a
    search can map them a window at a time. `file` is the file that `open_store` opened and
    checked: a search maps it, never the path again, so a store replaced meanwhile (by
    `embed --update`) cannot mix its rows with the names and meta read before."""

    path: Path
    offset: int
    file: Any = None  # the open binary file object


def check_rows(path: Path, meta: dict, first: int, rows: np.ndarray, squares: np.ndarray | None = None) -> np.ndarray:
    """Rows as they are read: numbers, and in a normalized store of length 1 within the dtype's
    error (a flipped byte gives a cosine of 105 otherwise). One dot product per row, on rows
    already in the cache. Returns each row's squared length (float32), for callers that divide
    by it."""
    if squares is None:
        wide = rows if rows.dtype == np.float32 else rows.astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            squares = np.vecdot(wide, wide)
    if meta.get("normalized", True):
        tolerance = NORM_TOLERANCE[meta["dtype"]]
        bad = ~(np.abs(squares - 1) <= 2 * tolerance)  # NaN is bad too
    else:
        bad = ~np.isfinite(squares)
    if bad.any():
        position = int(np.flatnonzero(bad)[0])
        row = np.asarray(rows[position], dtype=np.float64)
        if not np.isfinite(row).all():
            what = "values that are not numbers"
        elif meta.get("normalized", True):
            what = f"a vector of length {float(np.sqrt(np.sum(row * row))):.6g}, where a normalized store's rows have length 1"
        else:
            what = "values too large to compare"
        raise damaged(path, f"row {first + position} holds {what}")
    return squares


class CheckedRows:
    """`rows[indices]` of a store, each gathered row checked (check_rows) before it is used."""

    def __init__(self, store: "Store", source):
        self.store = store
        self.source = source

    def __getitem__(self, indices) -> np.ndarray:
        count = self.store.count
        numbers = np.asarray(indices, dtype=np.int64).reshape(-1)
        numbers = np.where(numbers < 0, numbers + count, numbers)
        if len(numbers) and not (0 <= numbers.min() and numbers.max() < count):
            row_numbers(np.asarray(indices).reshape(-1).tolist(), count)  # raises, naming the row
        rows = np.asarray(self.source[numbers])
        try:
            check_rows(self.store.path, self.store.meta, 0, rows)
        except OutputError:
            for number, row in zip(numbers.tolist(), rows):  # name the row by its number in the store
                check_rows(self.store.path, self.store.meta, number, row[None])
        return rows


class ParquetRows:
    """`rows[indices]` for a Parquet store, reading only the row groups that hold them (the
    last two are kept): an update copies old rows into the new file without loading all."""

    def __init__(self, handle, dim: int, dtype: np.dtype, path: Path):
        self.handle = handle
        self.dim = dim
        self.dtype = dtype
        self.path = path
        sizes = [handle.metadata.row_group(g).num_rows for g in range(handle.metadata.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._groups: dict[int, np.ndarray] = {}

    def group(self, number: int) -> np.ndarray:
        if number not in self._groups:
            import pyarrow as pa

            try:
                table = self.handle.read_row_group(number, columns=["embedding"], use_threads=False)
                values = _embedding_values(self.path, table.column(0).combine_chunks(), int(self.starts[number]))
            except (OSError, ValueError, pa.ArrowException) as exc:
                raise damaged(self.path, f"unreadable rows ({exc})") from None
            if len(self._groups) >= 2:
                self._groups.pop(next(iter(self._groups)))
            self._groups[number] = np.asarray(values, dtype=self.dtype).reshape(-1, self.dim)
        return self._groups[number]

    def __getitem__(self, indices) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((len(indices), self.dim), self.dtype)
        groups = np.searchsorted(self.starts, indices, side="right") - 1
        for number in dict.fromkeys(groups.tolist()):
            mask = groups == number
            out[mask] = self.group(number)[indices[mask] - self.starts[number]]
        return out


def _embedding_values(path: Path, column, first: int) -> np.ndarray:
    """A fixed-size-list column's values, flat. A null list or a null value is damage: Arrow's
    flatten() drops null lists, which would move every later row onto another row's name."""
    if column.null_count:
        raise damaged(path, f"row {first + _first_null(column)} has no embedding (null)")
    values = column.flatten()
    if values.null_count:
        raise damaged(path, f"row {first + _first_null(values) // column.type.list_size} has a null in its embedding")
    return values.to_numpy(zero_copy_only=False)


def _first_null(array) -> int:
    return int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])


class Store:
    """A store read back, its parts checked against each other.

    Rows are memory-mapped for .npy and .npz (nothing is read until used); `chunks()` reads any
    format in pieces, so memory stays flat. Names and file stamps are read only when asked for,
    from the files opened when the store was: one snapshot, whatever replaces the files meanwhile.
    Rows read through `chunks()` and `row_source` are checked (check_rows) as they are read."""

    def __init__(self, path: Path, meta: dict, kinds: np.ndarray, names: Names, stamps, rows=None, chunks=None,
                 row_source=None, row_file: RowFile | None = None, files: Sequence = ()):
        """`stamps`: STAMP_DTYPE or TIMED_STAMP_DTYPE rows (or a function that reads them); the
        times of a timed array are split off into `times`."""
        self.path = path
        self.meta = meta
        self.kinds = kinds  # (N,) bool: True for text rows
        self.row_file = row_file
        self._names = names
        self._stamps = stamps  # (N,) STAMP_DTYPE, or a function that reads them
        self._rows = rows
        self._chunks = chunks  # callable(size) -> iterator of (N_i, D) arrays, for formats without a map
        self._row_source = row_source
        self._files = list(files)  # open files this snapshot reads from, closed by close()
        self._times: np.ndarray | None = None

    def close(self) -> None:
        for fh in self._files:
            with contextlib.suppress(OSError):
                fh.close()
        self._files = []

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def count(self) -> int:
        return int(self.meta["count"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def image_count(self) -> int:
        return int(self.meta["image_rows"])

    @property
    def normalized(self) -> bool:
        return bool(self.meta.get("normalized", True))

    @property
    def names(self) -> list[str]:
        return self._names.all()

    def names_at(self, indices: Sequence[int]) -> list[str]:
        """The names of rows `indices` (negative ones count from the end, as in Python)."""
        return self._names.at(indices)

    @property
    def stamps(self) -> np.ndarray:
        if callable(self._stamps):
            self._stamps = self._stamps()
        if self._stamps.dtype.names and "time" in self._stamps.dtype.names:
            self._times = np.asarray(self._stamps["time"], dtype=np.float64)
            self._stamps = _untimed(self._stamps)
        return self._stamps

    @property
    def times(self) -> np.ndarray:
        """(N,) float64: each row's video time in seconds, -1 for stills and texts."""
        if self._times is None:
            self.stamps
        if self._times is None:
            self._times = np.full(self.count, NO_TIME)
        return self._times

    def video_rows(self) -> dict[str, list[int]]:
        """video name -> its frame rows, in store order (frames are the rows with a time)."""
        times = self.times
        frames = np.flatnonzero(times[: self.image_count] >= 0).tolist()
        videos: dict[str, list[int]] = {}
        if not frames:
            return videos
        for row, name in zip(frames, self.names_at(frames)):
            videos.setdefault(name.rpartition("#t=")[0], []).append(row)
        return videos

    @property
    def rows(self) -> np.ndarray:
        """All rows (N, D). Memory-mapped where the format allows (and then not checked until
        read through chunks() or row_source); otherwise read whole, checked."""
        if self._rows is None:
            parts = list(self.chunks())
            self._rows = np.concatenate(parts) if parts else np.zeros((0, self.dim), self.meta["dtype"])
        return self._rows

    @property
    def mapped(self) -> bool:
        """Whether any part of the rows can be read without reading the rest (a memory map, or
        rows already in memory), from several threads at once."""
        return self._rows is not None

    @property
    def row_source(self):
        """Something that answers `rows[indices]` without reading the whole store; each row
        checked as it is read."""
        return CheckedRows(self, self._row_source if self._row_source is not None else self.rows)

    def chunks(self, size: int = _CHUNK_ROWS, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """Rows `start:stop` in pieces of at most `size` rows, each checked (check_rows)."""
        stop = self.count if stop is None else stop
        for first, chunk in self.unchecked_chunks(size, start, stop):
            check_rows(self.path, self.meta, first, chunk)
            yield chunk

    def unchecked_chunks(self, size: int, start: int, stop: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows) pieces, not checked: for a reader that checks them itself (topk
        computes each row's length anyway)."""
        if self._rows is not None:
            for first in range(start, stop, size):
                yield first, self._rows[first : min(first + size, stop)]
            return
        position = 0
        for chunk in self._chunks(size):
            low, high = max(start - position, 0), min(stop - position, len(chunk))
            if low < high:
                yield position + low, chunk[low:high]
            position += len(chunk)
            if position >= stop:
                return

    def kind(self, index: int) -> str:
        return "text" if self.kinds[index] else "image"

    def with_names(self, names: list[str]) -> "Store":
        """The same store with its rows named otherwise (an update reads an older store's
        relative paths as absolute ones)."""
        if len(names) != self.count:
            raise ValueError(f"{len(names)} names for {self.count} rows")
        renamed = copy.copy(self)
        renamed._names = ListNames(list(names))
        return renamed

    def image_rows(self) -> dict[str, int]:
        """name -> row of every image row."""
        names = self.names
        return {names[i]: i for i in range(self.image_count)}


class _Mixed(OutputError):
    """The parts of a .npy store disagree: another run may be replacing them right now (its
    renames take microseconds), so open_store looks again before calling it damage."""


def _read_meta_file(path: Path) -> dict:
    meta_path = sidecar(path, ".meta.json")
    try:
        data = read_regular(meta_path)
    except FileNotFoundError:
        raise OutputError(f"{path}: no {meta_path.name} beside it; is it a siglip embedding file?") from None
    except OSError as exc:
        raise damaged(meta_path, f"unreadable meta ({exc.strerror or exc})") from None
    return parse_meta_json(meta_path, data)


def _kinds_from_meta(meta: dict) -> np.ndarray:
    kinds = np.zeros(meta["count"], dtype=bool)
    kinds[meta["image_rows"] :] = True
    return kinds


def _check_kinds(path: Path, meta: dict, kinds: np.ndarray) -> None:
    """Rows are images first, then texts: searches and updates rely on it."""
    if kinds.shape != (meta["count"],) or kinds[: meta["image_rows"]].any() or not kinds[meta["image_rows"] :].all():
        raise damaged(path, "its row kinds disagree with its meta")


def _agree(path: Path, meta: dict, rows_shape: tuple, names: Sized) -> None:
    count, dim = meta["count"], meta["dim"]
    if tuple(rows_shape) != (count, dim):
        raise damaged(path, f"its rows are {tuple(rows_shape)}, its meta says ({count}, {dim})")
    if len(names) != count:
        raise damaged(path, f"it names {len(names)} rows, holds {count}")


def _untimed(stamps: np.ndarray) -> np.ndarray:
    out = np.zeros(len(stamps), STAMP_DTYPE)
    for name in STAMP_DTYPE.names:
        out[name] = stamps[name]
    return out


def _check_stamps(path: Path, meta: dict, stamps: np.ndarray) -> np.ndarray:
    if stamps.dtype not in (STAMP_DTYPE, TIMED_STAMP_DTYPE) or stamps.shape != (meta["count"],):
        raise damaged(path, f"it has {stamps.shape[0] if stamps.ndim else 0} file stamps of layout {stamps.dtype} for {meta['count']} rows")
    return stamps


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sample_positions(count: int) -> list[int]:
    """The rows whose bytes the meta of a .npy store fingerprints (first, last and evenly
    between): reading them costs nothing, and rows from another run disagree."""
    return sorted({int(i) for i in np.linspace(0, count - 1, 16)}) if count else []


def _check_digest(path: Path, meta: dict, key: str, data: bytes | str, why: str) -> None:
    """Refuse a part that is not the one the meta was written with (stores from before digests
    were recorded are taken as they are)."""
    expected = (meta.get("digests") or {}).get(key)
    found = data if isinstance(data, str) else digest(data)
    if expected is not None and expected != found:
        raise _Mixed(str(damaged(path, why)))


def _array_header(fh) -> tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(fh)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read_header(fh)


def _map_rows(fh, dtype: np.dtype, offset: int, shape: tuple) -> np.ndarray:
    """The rows of the open file `fh` memory-mapped (a map of the file object, not of its name)."""
    if not (shape[0] and shape[1]):
        return np.zeros(shape, dtype)
    return np.memmap(fh, dtype=dtype, mode="r", offset=offset, shape=shape)


def _read_npy_rows(path: Path, fh, meta: dict) -> tuple[np.ndarray, RowFile]:
    """The rows memory-mapped, after checking the header and that the file holds exactly them."""
    try:
        shape, fortran, dtype = _array_header(fh)
        offset = fh.tell()
        size = os.fstat(fh.fileno()).st_size
    except (OSError, ValueError, EOFError) as exc:
        raise damaged(path, f"unreadable rows ({exc})") from None
    if len(shape) != 2 or fortran or dtype != np.dtype(meta["dtype"]).newbyteorder("<"):
        raise _Mixed(str(damaged(path, f"rows are {dtype} {shape}, the meta says {meta['dtype']} ({meta['count']}, {meta['dim']})")))
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if size != expected:
        raise damaged(path, f"it is {size} bytes, its header says {expected} (truncated or cut short?)")
    return _map_rows(fh, dtype, offset, shape), RowFile(path, offset, fh)


def _open_for_reading(path: Path):
    try:
        return open_regular(path)
    except OSError as exc:
        raise damaged(path, f"unreadable ({exc.strerror or exc})") from None


def _read_npy(path: Path) -> Store:
    # The rows first: the writer replaces the sidecars first and the rows last, so rows opened
    # before the sidecars are read are never newer than them; a mix shows in the digests.
    fh = _open_for_reading(path)
    files = [fh]
    try:
        meta = validate_meta(path, _read_meta_file(path))
        rows, row_file = _read_npy_rows(path, fh, meta)
        paths_file, stamps_file = sidecar(path, ".paths.txt"), sidecar(path, ".stamps.npy")
        try:
            data = read_regular(paths_file)
        except OSError as exc:
            raise damaged(paths_file, f"unreadable ({exc.strerror or exc})") from None
        names = LineNames(data)
        other_run = f"(from another run than {path.name}, or changed since)"
        try:
            _agree(path, meta, rows.shape, names)
        except OutputError as exc:
            raise _Mixed(str(exc)) from None
        _check_digest(paths_file, meta, "paths", data, f"its names are not those of the rows {other_run}")
        sample = np.ascontiguousarray(rows[sample_positions(meta["count"])])
        _check_digest(path, meta, "rows_sample", sample.tobytes(), f"its rows are not those its {sidecar(path, '.meta.json').name} describes {other_run}")
        try:
            stamps_fh = open_regular(stamps_file)
            files.append(stamps_fh)
        except OSError as exc:
            stamps_fh, stamps_error = None, exc
    except BaseException:
        for each in files:
            each.close()
        raise

    def stamps() -> np.ndarray:
        try:
            if stamps_fh is None:
                raise stamps_error
            stamps_fh.seek(0)
            raw = stamps_fh.read()
            array = np.load(io.BytesIO(raw), allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise damaged(stamps_file, f"unreadable ({exc})") from None
        _check_digest(stamps_file, meta, "stamps", raw, f"its file stamps are not those of the rows {other_run}")
        return _check_stamps(stamps_file, meta, array)

    return Store(path, meta, _kinds_from_meta(meta), names, stamps, rows=rows, row_file=row_file, files=files)


def _npz_member_offset(archive: zipfile.ZipFile, fh, name: str) -> int:
    """Where an uncompressed member's bytes start in the file, so they can be memory-mapped."""
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{name} is compressed")
    fh.seek(info.header_offset)
    local = fh.read(30)
    if local[:4] != b"PK\x03\x04":
        raise ValueError("bad local header")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _read_npz(path: Path) -> Store:
    fh = _open_for_reading(path)  # one file holds everything: kept open, it is one snapshot
    try:
        return _read_npz_from(path, fh)
    except BaseException:
        fh.close()
        raise


def _read_npz_from(path: Path, fh) -> Store:
    try:
        with zipfile.ZipFile(fh) as archive:
            def small(name: str) -> np.ndarray:
                with archive.open(name) as member:
                    return np.lib.format.read_array(member, allow_pickle=False)

            meta_text = small("meta.npy")
            if meta_text.shape != () or meta_text.dtype.kind != "U":
                raise ValueError("meta.npy is not one text")
            meta = validate_meta(path, parse_meta_json(path, str(meta_text)))
            names, kinds, stamps = small("paths.npy"), small("kinds.npy"), small("stamps.npy")
            for name, array in (("paths", names), ("kinds", kinds)):
                if array.shape != (meta["count"],) or array.dtype.kind != "U":
                    raise ValueError(f"{name}.npy holds {array.dtype} {array.shape}, not {meta['count']} texts")
            fh.seek(_npz_member_offset(archive, fh, "embeddings.npy"))
            shape, fortran, dtype = _array_header(fh)
            offset = fh.tell()
            if offset + int(np.prod(shape)) * dtype.itemsize > os.fstat(fh.fileno()).st_size:
                raise ValueError("its rows are cut short")
        if fortran or len(shape) != 2 or dtype != np.dtype(meta["dtype"]).newbyteorder("<"):
            raise ValueError(f"rows are {dtype} {shape}, the meta says {meta['dtype']}")
        rows = _map_rows(fh, dtype, offset, shape)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        if isinstance(exc, OutputError):
            raise
        raise damaged(path, f"unreadable ({type(exc).__name__}: {exc})") from None
    names = ListNames([str(n) for n in names])
    _agree(path, meta, shape, names)
    kinds = kinds == "text"
    _check_kinds(path, meta, kinds)
    return Store(path, meta, kinds, names, _check_stamps(path, meta, stamps), rows=rows,
                 row_file=RowFile(path, offset, fh), files=[fh])


_INT64 = (-(1 << 63), (1 << 63) - 1)


def _jsonl_stamp(record: dict) -> tuple:
    size, mtime, sha = record.get("size", -1), record.get("mtime_ns", -1), record.get("sha256", "")
    for key, value in (("size", size), ("mtime_ns", mtime)):
        if not isinstance(value, int) or isinstance(value, bool) or not _INT64[0] <= value <= _INT64[1]:
            raise ValueError(f"its {key} is {json.dumps(value)[:40]}, not a whole number")
    if not isinstance(sha, str) or len(sha) not in (0, 64):
        raise ValueError("its sha256 is not 64 hex digits")
    time = record.get("time", NO_TIME)
    if not isinstance(time, (int, float)) or isinstance(time, bool) or not (time == NO_TIME or 0 <= time < 1e9):
        raise ValueError(f"its time is {json.dumps(time)[:40]}, not a video time in seconds")
    return size, mtime, bytes.fromhex(sha), float(time)


def _read_jsonl(path: Path) -> Store:
    """Read whole (the format is for exchange; .npy, .npz and Parquet are indexes), each row
    turned into an array as its line is read, so memory holds the rows, not Python floats."""
    meta = validate_meta(path, _read_meta_file(path))
    dtype, dim = np.dtype(meta["dtype"]), meta["dim"]
    names, kinds, stamps, rows = [], [], [], []
    hasher = hashlib.sha256()
    number = 0
    try:
        with open(path, "rb") as fh:
            for number, raw in enumerate(fh, 1):
                hasher.update(raw)
                if number > meta["count"]:
                    continue  # counted below
                if json_too_deep(raw):
                    raise ValueError("nested too deep")
                record = json.loads(raw.decode("utf-8", "surrogateescape"))
                if not isinstance(record, dict):
                    raise ValueError("not an object")
                kind = record.get("kind")
                if kind not in KINDS:
                    raise ValueError("no kind")
                name = record["path"] if kind == "image" else record["text"]
                if not isinstance(name, str):
                    raise ValueError(f"its {'path' if kind == 'image' else 'text'} is not text")
                stamps.append(_jsonl_stamp(record))
                with np.errstate(over="ignore"):  # a value beyond the dtype is inf: check_rows names it
                    row = np.array(record["embedding"], dtype=dtype)
                if row.shape != (dim,):
                    raise ValueError(f"its embedding has {row.size} values, the meta says {dim}")
                rows.append(row)
                names.append(name)
                kinds.append(kind == "text")
    except OSError as exc:
        raise damaged(path, f"unreadable ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        what = f"unreadable ({exc})" if isinstance(exc, (ValueError, TypeError)) else f"unreadable (no {exc})"
        raise damaged(path, f"line {number}: {what}") from None
    if number != meta["count"]:
        raise _Mixed(str(damaged(path, f"it holds {number} rows, its meta says {meta['count']}")))
    _check_digest(path, meta, "file", "sha256:" + hasher.hexdigest(), "its rows are not those its meta describes (from another run, or changed since)")
    array = np.stack(rows) if rows else np.zeros((0, dim), dtype)
    check_rows(path, meta, 0, array)
    kinds = np.array(kinds, dtype=bool)
    _check_kinds(path, meta, kinds)
    stamp_array = np.array(stamps, dtype=TIMED_STAMP_DTYPE) if stamps else np.zeros(0, TIMED_STAMP_DTYPE)
    return Store(path, meta, kinds, ListNames(names), stamp_array, rows=array)


def _read_parquet(path: Path) -> Store:
    pq = _pyarrow_parquet()
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        # pre_buffer (pyarrow's default) reads every row group ahead: the whole file in memory.
        # The handle keeps the file open: every later read is of this snapshot.
        handle = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        meta = validate_meta(path, parse_meta_json(path, (handle.schema_arrow.metadata or {}).get(b"siglip", b"null")))
        schema = handle.schema_arrow
        missing = [c for c in ("kind", "path", "embedding", "size", "mtime_ns", "sha256") if schema.get_field_index(c) < 0]
        if missing:
            raise damaged(path, f"it has no {missing[0]!r} column")
        embedding = schema.field("embedding").type
        columns = handle.read(columns=["kind", "path"])
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        if isinstance(exc, OutputError):
            raise
        raise damaged(path, f"unreadable ({type(exc).__name__}: {exc})") from None
    dim, dtype = meta["dim"], np.dtype(meta["dtype"])
    if not pa.types.is_fixed_size_list(embedding) or embedding.list_size != dim or embedding.value_type.to_pandas_dtype() != dtype:
        raise damaged(path, f"its embedding column is {embedding}, the meta says {dim} x {dtype}")
    if handle.metadata.num_rows != meta["count"]:
        raise damaged(path, f"it holds {handle.metadata.num_rows} rows, its meta says {meta['count']}")
    _refuse_counted_nulls(path, handle)
    for name in ("kind", "path"):
        column = columns.column(name).combine_chunks()
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            raise damaged(path, f"its {name} column is {column.type}, not text")
        if column.null_count:
            raise damaged(path, f"row {_first_null(column)} has no {name} (null)")
    names = ArrowNames(columns.column("path").combine_chunks())
    kinds = pc.equal(columns.column("kind"), "text").to_numpy(zero_copy_only=False).astype(bool)
    _agree(path, meta, (len(names), dim), names)
    _check_kinds(path, meta, kinds)

    def chunks(size: int) -> Iterator[np.ndarray]:
        first = 0
        try:
            for batch in handle.iter_batches(batch_size=size, columns=["embedding"], use_threads=False):
                values = _embedding_values(path, batch.column(0), first)
                first += batch.num_rows
                yield np.asarray(values, dtype=dtype).reshape(-1, dim)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise damaged(path, f"unreadable rows ({exc})") from None

    def stamps() -> np.ndarray:
        timed = "time" in handle.schema_arrow.names
        try:
            table = handle.read(columns=["size", "mtime_ns", "sha256"] + (["time"] if timed else []))
            out = np.zeros(meta["count"], TIMED_STAMP_DTYPE if timed else STAMP_DTYPE)
            for name in ("size", "mtime_ns") + (("time",) if timed else ()):
                column = table.column(name).combine_chunks()
                if column.null_count:  # (sha256 is null where no hash was asked for)
                    raise damaged(path, f"row {_first_null(column)} has no {name} (null)")
                out[name] = column.to_numpy(zero_copy_only=False)
            out["sha256"] = [h or b"" for h in table.column("sha256").to_pylist()]
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
            if isinstance(exc, OutputError):
                raise
            raise damaged(path, f"unreadable stamps ({exc})") from None
        return out

    return Store(path, meta, kinds, names, stamps, chunks=chunks, row_source=ParquetRows(handle, dim, dtype, path))


def _refuse_counted_nulls(path: Path, handle) -> None:
    """Parquet writers count each column chunk's nulls: a null anywhere (but in sha256, null
    where no hash was asked for) is found when the store is opened, before an update has
    computed anything (it copies the old rows only at its end). The row is named from the
    column itself; a file without counts is still checked as its rows are read."""
    import pyarrow as pa

    first = 0
    try:
        for number in range(handle.metadata.num_row_groups):
            group = handle.metadata.row_group(number)
            for index in range(group.num_columns):
                chunk = group.column(index)
                name = chunk.path_in_schema.split(".")[0]
                stats = chunk.statistics
                if name == "sha256" or stats is None or not stats.has_null_count or not stats.null_count:
                    continue
                column = handle.read_row_group(number, columns=[name], use_threads=False).column(0).combine_chunks()
                if name == "embedding":
                    _embedding_values(path, column, first)
                elif column.null_count:
                    raise damaged(path, f"row {first + _first_null(column)} has no {name} (null)")
            first += group.num_rows
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise damaged(path, f"unreadable ({type(exc).__name__}: {exc})") from None


_READERS = {".npy": _read_npy, ".npz": _read_npz, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
_SNAPSHOT_TRIES = 8


def open_store(path: str | os.PathLike) -> Store:
    """Read a store back, checking that its parts agree. Damage is an OutputError in one line.

    The Store reads from the files opened here (never by name again), so it is one snapshot
    even while `embed --update` replaces the store: a .npy store's parts are read one after
    another, and if they disagree because they were replaced meanwhile, they are read again."""
    path = Path(path)
    if path.suffix not in _READERS:
        raise UsageError(f"{path}: not an embedding file (use the .npy, .npz, .jsonl or .parquet that siglip embed wrote)")
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    for attempt in range(_SNAPSHOT_TRIES):
        try:
            return _READERS[path.suffix](path)
        except _Mixed as exc:
            if attempt == _SNAPSHOT_TRIES - 1:
                raise OutputError(str(exc)) from None
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("parquet files need pyarrow: pip install pyarrow") from None
    return pq


# ============================================================================ writing: the partial state
@dataclass(frozen=True)
class Entry:
    """One row of the final store, in plan order: where its embedding is."""

    kind: str
    name: str
    stamp: tuple
    rows: np.ndarray  # the array holding it (a memory map)
    index: int
    time: float = NO_TIME  # a video frame's time in seconds


class PartialRows:
    """The rows a run has finished so far, in `<folder>/`: appended per batch, durable at each
    `commit()`, read back whole-lines-only after a crash."""

    def __init__(self, folder: Path, dim: int, dtype: str, settings: dict, resume: bool):
        self.folder = folder
        self.dim = dim
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.row_bytes = dim * self.dtype.itemsize
        self.settings = {**settings, "dim": dim, "dtype": self.dtype.name}
        self.records: list[dict] = []  # one per row: kind, name, size, mtime_ns[, sha256]
        self.skipped: list[dict] = []
        self.inputs_changed = False  # a resumed folder made from other inputs (see _load)
        try:
            # lexists: a symbolic link planted at the folder's name counts as there, and
            # make_directory refuses it (files written inside would land where it points).
            if os.path.lexists(folder):
                make_directory(folder)
                if not resume:
                    raise UsageError(
                        f"{folder} holds an interrupted run; add --resume to continue it, or delete it to start over"
                    )
                self._load()
            else:
                make_directory(folder)
                try:
                    atomic_write_text(folder / "state.json", json.dumps(self.settings, indent=2))
                except OSError:
                    # A folder without its state cannot be resumed: leave none (it is empty),
                    # so that the "run again with --resume" the error suggests starts afresh.
                    with contextlib.suppress(OSError):
                        os.rmdir(folder)
                    raise
            self._rows = open_append(folder / "rows.bin")
            self._index = open_append(folder / "rows.jsonl")
            self._skipped = open_append(folder / "skipped.jsonl")
        except OSError as exc:
            raise _cannot_write(exc.filename or folder, exc) from None

    def _lines(self, name: str) -> list[str]:
        """Complete lines only: the text after the last newline is a half-written line."""
        path = self.folder / name
        if not os.path.lexists(path):
            return []
        return read_regular(path, follow_symlinks=False).decode("utf-8", "surrogateescape").split("\n")[:-1]

    def _load(self) -> None:
        if not os.path.lexists(self.folder / "state.json") and not self._lines("rows.jsonl"):
            # No state and no finished rows (a full disk struck as the run began): nothing to
            # keep, so this is a fresh start rather than an unreadable folder.
            atomic_write_text(self.folder / "state.json", json.dumps(self.settings, indent=2))
        try:
            state = json.loads(read_regular(self.folder / "state.json", follow_symlinks=False).decode("utf-8"))
        except (OSError, ValueError):
            raise UsageError(f"{self.folder}: unreadable state.json; delete the folder to start over") from None
        changed = sorted(k for k in set(state) | set(self.settings) if state.get(k) != self.settings.get(k))
        if "model" in changed and state.get("revision") == self.settings.get("revision"):
            changed.remove("model")  # the same checkpoint, named by another path
        if changed == ["inputs"]:
            # Files were added, removed or renamed since (one may have vanished mid-run): the
            # rows are kept by name and stamp, so a file still listed and unchanged keeps its
            # row, and anything else is embedded again. The folder is now this run's.
            self.inputs_changed = True
            atomic_write_text(self.folder / "state.json", json.dumps(self.settings, indent=2))
        elif changed:
            raise UsageError(
                f"{self.folder} was made with different settings ({', '.join(changed)}); "
                "rerun with the same options, or delete it to start over"
            )
        records = []
        for line in self._lines("rows.jsonl"):
            try:
                records.append(json.loads(line))
            except ValueError:
                break
        rows_path = self.folder / "rows.bin"
        with open_append(rows_path) as fh:
            rows = os.fstat(fh.fileno()).st_size // self.row_bytes
            count = min(rows, len(records))
            fh.truncate(count * self.row_bytes)
        self.records = records[:count]
        atomic_write_text(self.folder / "rows.jsonl", "".join(_json_line(r) for r in self.records))
        for line in self._lines("skipped.jsonl"):
            try:
                self.skipped.append(json.loads(line))
            except ValueError:
                break
        atomic_write_text(self.folder / "skipped.jsonl", "".join(_json_line(s) for s in self.skipped))

    def add(self, kind: str, name: str, stamp: tuple | None, vector: np.ndarray, frame: dict | None = None) -> None:
        """`frame`: for a video frame, {"time": seconds, "video": the video's name, and "end":
        True on its last frame}: a resumed run redoes a video whose end never arrived."""
        row = np.asarray(vector).astype(self.dtype, copy=False)
        if row.shape != (self.dim,):
            raise ValueError(f"row for {name} has shape {row.shape}, expected ({self.dim},)")
        size, mtime, digest = stamp or NO_STAMP
        record = {"kind": kind, "name": name, "size": size, "mtime_ns": mtime}
        if digest:
            record["sha256"] = digest.hex()
        if frame:
            record.update(frame)
        try:
            self._rows.write(row.tobytes())
            self._index.write(_json_line(record).encode("utf-8", "surrogateescape"))
        except OSError as exc:
            raise _cannot_write(self.folder, exc) from None
        self.records.append(record)

    def skip(self, name: str, reason: str) -> None:
        record = {"path": name, "error": reason}
        try:
            self._skipped.write(_json_line(record).encode("utf-8", "surrogateescape"))
        except OSError as exc:
            raise _cannot_write(self.folder, exc) from None
        self.skipped.append(record)

    def commit(self) -> None:
        """Make everything added so far durable (rows before their index lines)."""
        try:
            for fh in (self._rows, self._skipped, self._index):
                if not fh.closed:
                    fh.flush()
                    os.fsync(fh.fileno())
        except OSError as exc:
            raise _cannot_write(self.folder, exc) from None

    def close(self) -> None:
        """Close the files; what was not committed may be lost (e.g. on a full disk), never what was."""
        for fh in (self._rows, self._index, self._skipped):
            if not fh.closed:
                try:
                    fh.close()
                except OSError:
                    pass

    def rows_map(self) -> np.ndarray:
        if not self.records:
            return np.zeros((0, self.dim), self.dtype)
        return np.memmap(self.folder / "rows.bin", dtype=self.dtype, mode="r", shape=(len(self.records), self.dim))

    def latest(self) -> dict[tuple[str, str], int]:
        """(kind, name) -> the row that holds its latest embedding (a changed file is embedded
        again on resume; the newer row wins)."""
        return {(r["kind"], r["name"]): i for i, r in enumerate(self.records)}


def _json_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def record_stamp(record: dict) -> tuple:
    return (record.get("size", -1), record.get("mtime_ns", -1), bytes.fromhex(record.get("sha256", "")))


# ============================================================================ writing: the final files
def _chunked(entries: Sequence[Entry], dim: int, dtype: np.dtype) -> Iterator[np.ndarray]:
    """The rows of `entries`, in order, gathered from their arrays a chunk at a time."""
    for start in range(0, len(entries), _CHUNK_ROWS):
        part = entries[start : start + _CHUNK_ROWS]
        out = np.empty((len(part), dim), dtype)
        by_source: dict[int, tuple[np.ndarray, list[int], list[int]]] = {}
        for position, entry in enumerate(part):
            key = id(entry.rows)
            if key not in by_source:
                by_source[key] = (entry.rows, [], [])
            by_source[key][1].append(position)
            by_source[key][2].append(entry.index)
        for rows, positions, indices in by_source.values():
            out[positions] = rows[indices]
        yield out


def _write_npy_rows(tmp: str, entries: Sequence[Entry], dim: int, dtype: np.dtype) -> None:
    with open(tmp, "wb") as fh:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (len(entries), dim)}
        np.lib.format.write_array_header_1_0(fh, header)
        _reserve(fh, fh.tell() + len(entries) * dim * dtype.itemsize)
        for chunk in _chunked(entries, dim, dtype):
            fh.write(chunk.tobytes())
        fh.flush()
        os.fsync(fh.fileno())


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _timed(entries: Sequence[Entry]) -> bool:
    return any(e.time >= 0 for e in entries)


def _stamps(entries: Sequence[Entry]) -> np.ndarray:
    """The stamps, with each row's time when any row is a video frame (otherwise the layout
    stays the one older versions read)."""
    if _timed(entries):
        return np.array([(*tuple(e.stamp)[:3], e.time) for e in entries], dtype=TIMED_STAMP_DTYPE)
    return np.array([tuple(e.stamp) for e in entries], dtype=STAMP_DTYPE) if entries else np.zeros(0, STAMP_DTYPE)


def _write_npz(tmp: str, entries: Sequence[Entry], dim: int, dtype: np.dtype, meta: dict) -> None:
    with open(tmp, "wb") as fh:
        _reserve(fh, len(entries) * dim * dtype.itemsize)
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("embeddings.npy", "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (len(entries), dim)}
                np.lib.format.write_array_header_2_0(member, header)
                for chunk in _chunked(entries, dim, dtype):
                    member.write(chunk.tobytes())
            names = [e.name for e in entries]
            width = max([1] + [len(n) for n in names])
            archive.writestr("paths.npy", _npy_bytes(np.array(names, dtype=f"<U{width}")))
            archive.writestr("kinds.npy", _npy_bytes(np.array([e.kind for e in entries], dtype="<U5")))
            archive.writestr("stamps.npy", _npy_bytes(_stamps(entries)))
            archive.writestr("meta.npy", _npy_bytes(np.array(json.dumps(meta, ensure_ascii=False))))
        fh.truncate()  # the reservation may exceed what the archive needed
        fh.flush()
        os.fsync(fh.fileno())


def embedding_values(row: np.ndarray) -> list[float]:
    """A row as JSON numbers: float32 carries ~7 significant digits; print no more than that."""
    return [float(f"{v:.7g}") for v in np.asarray(row, dtype=np.float32).tolist()]


def row_record(kind: str, name: str, row: np.ndarray, stamp: tuple | None = None, time: float = NO_TIME) -> dict:
    """One row as a JSON object: the `.jsonl` format, and `embed --format jsonl` on stdout."""
    record: dict[str, Any] = {"kind": kind, "path" if kind == "image" else "text": name, "embedding": embedding_values(row)}
    if stamp is not None and stamp[0] >= 0:
        record["size"], record["mtime_ns"] = int(stamp[0]), int(stamp[1])
        if stamp[2]:
            record["sha256"] = bytes(stamp[2]).hex()
    if time >= 0:
        record["time"] = time
    return record


def _write_jsonl(tmp: str, entries: Sequence[Entry], dim: int, dtype: np.dtype) -> str:
    """Returns the digest of what was written: the meta beside records it, so that a reader
    can tell a meta from another run (a .jsonl store has no copy of its meta inside)."""
    hasher = hashlib.sha256()
    with open(tmp, "wb") as fh:
        position = 0
        for chunk in _chunked(entries, dim, dtype):
            for row in chunk:
                entry = entries[position]
                line = _json_line(row_record(entry.kind, entry.name, row, entry.stamp, entry.time)).encode("utf-8", "surrogateescape")
                hasher.update(line)
                fh.write(line)
                position += 1
        fh.flush()
        os.fsync(fh.fileno())
    return "sha256:" + hasher.hexdigest()


def _write_parquet(tmp: str, entries: Sequence[Entry], dim: int, dtype: np.dtype, meta: dict) -> None:
    import pyarrow as pa

    pq = _pyarrow_parquet()
    value_type = pa.float16() if dtype == np.float16 else pa.float32()
    timed = _timed(entries)
    schema = pa.schema(
        [
            ("kind", pa.string()),
            ("path", pa.string()),
            ("embedding", pa.list_(value_type, dim)),
            ("size", pa.int64()),
            ("mtime_ns", pa.int64()),
            ("sha256", pa.binary()),
        ] + ([("time", pa.float64())] if timed else []),
        metadata={b"siglip": json.dumps(meta, ensure_ascii=False).encode()},
    )
    with pq.ParquetWriter(tmp, schema) as writer:
        position = 0
        for chunk in _chunked(entries, dim, dtype):
            part = entries[position : position + len(chunk)]
            position += len(chunk)
            values = pa.array(chunk.reshape(-1), type=value_type)
            names = [e.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for e in part]
            table = pa.table(
                {
                    "kind": pa.array([e.kind for e in part], pa.string()),
                    "path": pa.array(names, pa.string()),
                    "embedding": pa.FixedSizeListArray.from_arrays(values, dim),
                    "size": pa.array([int(e.stamp[0]) for e in part], pa.int64()),
                    "mtime_ns": pa.array([int(e.stamp[1]) for e in part], pa.int64()),
                    "sha256": pa.array([bytes(e.stamp[2]) or None for e in part], pa.binary()),
                    **({"time": pa.array([e.time for e in part], pa.float64())} if timed else {}),
                },
                schema=schema,
            )
            writer.write_table(table)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())


def write_store(out: Path, entries: Sequence[Entry], dim: int, dtype: str, meta: dict) -> dict:
    """Write the final files of a store atomically: all of them in full under temporary names,
    then renamed, the main file last. Returns the meta as written."""
    dtype_ = np.dtype(dtype).newbyteorder("<")
    image_rows = sum(1 for e in entries if e.kind == "image")
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        **meta,
        "dim": dim,
        "dtype": np.dtype(dtype).name,
        "count": len(entries),
        "image_rows": image_rows,
        "text_rows": len(entries) - image_rows,
    }
    if any(e.kind == "image" for e in entries[image_rows:]):
        raise ValueError("text rows must follow image rows")
    ready: list[tuple[str, Path]] = []
    try:
        if out.suffix == ".npy":
            # Three files beside the rows: the meta records a digest of each part, so a set
            # mixed from two runs is refused when read instead of giving wrong names.
            names = "".join(e.name + "\n" for e in entries)
            stamps_data = _npy_bytes(_stamps(entries))
            sample = [entries[i] for i in sample_positions(len(entries))]
            meta["digests"] = {
                "paths": digest(names.encode("utf-8", "surrogateescape")),
                "stamps": digest(stamps_data),
                "rows_sample": digest(b"".join(chunk.tobytes() for chunk in _chunked(sample, dim, dtype_))),
            }
            paths = sidecar(out, ".paths.txt")
            ready.append((text_temporary(paths, names), paths))
            stamps = sidecar(out, ".stamps.npy")
            tmp = temporary_beside(stamps)
            ready.append((tmp, stamps))
            with open(tmp, "wb") as fh:
                fh.write(stamps_data)
                fh.flush()
                os.fsync(fh.fileno())
        meta_path = sidecar(out, ".meta.json")
        tmp = temporary_beside(out)
        main = (tmp, out)
        if out.suffix == ".jsonl":  # written first: the meta records its digest
            ready.append(main)
            meta["digests"] = {"file": _write_jsonl(tmp, entries, dim, dtype_)}
        meta_tmp = (text_temporary(meta_path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n"), meta_path)
        if out.suffix == ".jsonl":
            ready.insert(len(ready) - 1, meta_tmp)
        else:
            ready += [meta_tmp, main]
        if out.suffix == ".npy":
            _write_npy_rows(tmp, entries, dim, dtype_)
        elif out.suffix == ".npz":
            _write_npz(tmp, entries, dim, dtype_, meta)
        elif out.suffix == ".parquet":
            _write_parquet(tmp, entries, dim, dtype_, meta)
        with signals_deferred():  # Ctrl-C or SIGTERM never splits the set of renames
            while ready:
                os.replace(*ready[0])
                ready.pop(0)
        _fsync_dir(out.parent)
    except OSError as exc:
        raise _cannot_write(out, exc) from None
    finally:
        for tmp, _ in ready:
            _remove(tmp)
    return meta


def is_store(out: Path) -> bool:
    """Whether `out` was written by siglip embed (so replacing it loses nothing unexpected)."""
    try:
        meta = json.loads(read_regular(sidecar(out, ".meta.json")).decode("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT_NAME


def remove_partial(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def locked(out: Path) -> Iterator[OutputLock]:
    lock = OutputLock(out).acquire()
    try:
        yield lock
    finally:
        lock.release()
