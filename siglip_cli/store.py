"""The embedding files: one format description, a writer and a reader.

Every store is a table of rows in a fixed order. Each row has a **kind** (`image` or `text`), a
**name** (the image's path or URL, or the text itself), a **stamp** (the file's size and
modification time in ns, plus its SHA-256 when `--update=hash` asked for one; -1/empty for texts
and URLs) and an **embedding** (float32 or float16). Image rows come first, in input order, then
text rows. The meta (model, revision, dtype, settings, counts, skipped inputs) travels with it.

Formats, by the output's suffix:
- `.npy`: the (N, D) rows; beside it `<out>.paths.txt` (line i names row i; rows
  `meta.image_rows` and later are texts), `<out>.stamps.npy` (structured: size, mtime_ns,
  sha256) and `<out>.meta.json`.
- `.npz`: one file with `embeddings`, `paths`, `kinds`, `stamps` and `meta` (JSON text), stored
  uncompressed so the rows can be memory-mapped.
- `.jsonl`: one object per row: `{"kind", "path" | "text", "embedding", "size", "mtime_ns"}`.
- `.parquet`: columns `kind`, `path` (the text for text rows), `embedding` (fixed-size list),
  `size`, `mtime_ns`, `sha256`; the meta is in the file's key-value metadata under `siglip`.
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
import hashlib
import io
import json
import os
import shutil
import struct
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
    read_regular,
    remove_file,
    reserve_space,
    signals_deferred,
    temporary_beside,
    text_temporary,
)

FORMAT_NAME = "siglip-embeddings"
FORMAT_VERSION = 1
OUTPUT_SUFFIXES = (".npy", ".npz", ".jsonl", ".parquet")
KINDS = ("image", "text")
STAMP_DTYPE = np.dtype([("size", "<i8"), ("mtime_ns", "<i8"), ("sha256", "S32")])
NO_STAMP = (-1, -1, b"")
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
        return [self.names[i] for i in indices]

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
        for i in indices:
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
        return self.column.take(list(indices)).to_pylist()

    def all(self) -> list[str]:
        return self.column.to_pylist()


@dataclass(frozen=True)
class RowFile:
    """Where a store's rows lie raw on disk (C order, little-endian, the meta's dtype), so that a
    search can map them a window at a time."""

    path: Path
    offset: int


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
            try:
                table = self.handle.read_row_group(number, columns=["embedding"], use_threads=False)
                values = table.column(0).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            except (OSError, ValueError) as exc:
                raise _damaged(self.path, f"unreadable rows ({exc})") from None
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


class Store:
    """A store read back, its parts checked against each other.

    Rows are memory-mapped for .npy and .npz (nothing is read until used); `chunks()` reads any
    format in pieces, so memory stays flat. Names and file stamps are read only when asked for."""

    def __init__(self, path: Path, meta: dict, kinds: np.ndarray, names: Names, stamps, rows=None, chunks=None,
                 row_source=None, row_file: RowFile | None = None):
        self.path = path
        self.meta = meta
        self.kinds = kinds  # (N,) bool: True for text rows
        self.row_file = row_file
        self._names = names
        self._stamps = stamps  # (N,) STAMP_DTYPE, or a function that reads them
        self._rows = rows
        self._chunks = chunks  # callable(size) -> iterator of (N_i, D) arrays, for formats without a map
        self._row_source = row_source

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
    def names(self) -> list[str]:
        return self._names.all()

    def names_at(self, indices: Sequence[int]) -> list[str]:
        return self._names.at(indices)

    @property
    def stamps(self) -> np.ndarray:
        if callable(self._stamps):
            self._stamps = self._stamps()
        return self._stamps

    @property
    def rows(self) -> np.ndarray:
        """All rows (N, D). Memory-mapped where the format allows; otherwise read whole."""
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
        """Something that answers `rows[indices]` without reading the whole store."""
        return self._row_source if self._row_source is not None else self.rows

    def chunks(self, size: int = _CHUNK_ROWS, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """Rows `start:stop` in pieces of at most `size` rows."""
        stop = self.count if stop is None else stop
        if self._rows is not None:
            for first in range(start, stop, size):
                yield self._rows[first : min(first + size, stop)]
            return
        position = 0
        for chunk in self._chunks(size):
            low, high = max(start - position, 0), min(stop - position, len(chunk))
            if low < high:
                yield chunk[low:high]
            position += len(chunk)
            if position >= stop:
                return

    def kind(self, index: int) -> str:
        return "text" if self.kinds[index] else "image"

    def image_rows(self) -> dict[str, int]:
        """name -> row of every image row."""
        names = self.names
        return {names[i]: i for i in range(self.image_count)}


def _damaged(path: Path, why: str) -> OutputError:
    return OutputError(f"{path}: {why}; it is damaged or not a siglip embedding file (re-create it with siglip embed)")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_meta(path: Path, meta: Any) -> dict:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise _damaged(path, "no siglip meta")
    for key in ("dim", "dtype", "count", "image_rows", "text_rows"):
        if key not in meta:
            raise _damaged(path, f"its meta lacks {key!r}")
    if not all(_is_count(meta[key]) for key in ("dim", "count", "image_rows", "text_rows")) or meta["dtype"] not in ("float32", "float16"):
        raise _damaged(path, "its meta holds values of the wrong type")
    if meta["count"] != meta["image_rows"] + meta["text_rows"]:
        raise _damaged(path, "its meta's row counts disagree")
    return meta


def _read_meta_file(path: Path) -> dict:
    meta_path = sidecar(path, ".meta.json")
    try:
        return json.loads(read_regular(meta_path).decode("utf-8"))
    except FileNotFoundError:
        raise OutputError(f"{path}: no {meta_path.name} beside it; is it a siglip embedding file?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(meta_path, f"unreadable meta ({exc})") from None


def _kinds_from_meta(meta: dict) -> np.ndarray:
    kinds = np.zeros(meta["count"], dtype=bool)
    kinds[meta["image_rows"] :] = True
    return kinds


def _check_kinds(path: Path, meta: dict, kinds: np.ndarray) -> None:
    """Rows are images first, then texts: searches and updates rely on it."""
    if len(kinds) != meta["count"] or kinds[: meta["image_rows"]].any() or not kinds[meta["image_rows"] :].all():
        raise _damaged(path, "its row kinds disagree with its meta")


def _agree(path: Path, meta: dict, rows_shape: tuple, names: Sized) -> None:
    count, dim = meta["count"], meta["dim"]
    if tuple(rows_shape) != (count, dim):
        raise _damaged(path, f"its rows are {tuple(rows_shape)}, its meta says ({count}, {dim})")
    if len(names) != count:
        raise _damaged(path, f"it names {len(names)} rows, holds {count}")


def _check_stamps(path: Path, meta: dict, stamps: np.ndarray) -> np.ndarray:
    if stamps.dtype != STAMP_DTYPE or stamps.shape != (meta["count"],):
        raise _damaged(path, f"it has {stamps.shape[0] if stamps.ndim else 0} file stamps of layout {stamps.dtype} for {meta['count']} rows")
    return stamps


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sample_positions(count: int) -> list[int]:
    """The rows whose bytes the meta of a .npy store fingerprints (first, last and evenly
    between): reading them costs nothing, and rows from another run disagree."""
    return sorted({int(i) for i in np.linspace(0, count - 1, 16)}) if count else []


def _check_digest(path: Path, meta: dict, key: str, data: bytes, why: str) -> None:
    """Refuse a part that is not the one the meta was written with (stores from before digests
    were recorded are taken as they are)."""
    expected = (meta.get("digests") or {}).get(key)
    if expected is not None and expected != digest(data):
        raise _damaged(path, why)


def _array_header(fh) -> tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(fh)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read_header(fh)


def _read_npy_rows(path: Path, meta: dict) -> tuple[np.ndarray, RowFile]:
    """The rows memory-mapped, after checking the header and that the file holds exactly them."""
    try:
        with open(path, "rb") as fh:
            shape, fortran, dtype = _array_header(fh)
            offset = fh.tell()
            size = os.fstat(fh.fileno()).st_size
    except (OSError, ValueError, EOFError) as exc:
        raise _damaged(path, f"unreadable rows ({exc})") from None
    if len(shape) != 2 or fortran or dtype != np.dtype(meta["dtype"]).newbyteorder("<"):
        raise _damaged(path, f"rows are {dtype} {shape}, the meta says {meta['dtype']} ({meta['count']}, {meta['dim']})")
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if size != expected:
        raise _damaged(path, f"it is {size} bytes, its header says {expected} (truncated or cut short?)")
    rows = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape) if shape[0] and shape[1] else np.zeros(shape, dtype)
    return rows, RowFile(path, offset)


def _read_npy(path: Path) -> Store:
    meta = _check_meta(path, _read_meta_file(path))
    rows, row_file = _read_npy_rows(path, meta)
    paths_file, stamps_file = sidecar(path, ".paths.txt"), sidecar(path, ".stamps.npy")
    try:
        data = read_regular(paths_file)
    except OSError as exc:
        raise _damaged(paths_file, f"unreadable ({exc.strerror or exc})") from None
    names = LineNames(data)
    _agree(path, meta, rows.shape, names)
    other_run = f"(from another run than {path.name}, or changed since)"
    _check_digest(paths_file, meta, "paths", data, f"its names are not those of the rows {other_run}")
    sample = np.ascontiguousarray(rows[sample_positions(meta["count"])])
    _check_digest(path, meta, "rows_sample", sample.tobytes(), f"its rows are not those its {sidecar(path, '.meta.json').name} describes {other_run}")

    def stamps() -> np.ndarray:
        try:
            raw = read_regular(stamps_file)
            array = np.load(io.BytesIO(raw), allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise _damaged(stamps_file, f"unreadable ({exc})") from None
        _check_digest(stamps_file, meta, "stamps", raw, f"its file stamps are not those of the rows {other_run}")
        return _check_stamps(stamps_file, meta, array)

    return Store(path, meta, _kinds_from_meta(meta), names, stamps, rows=rows, row_file=row_file)


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
    try:
        with open(path, "rb") as fh, zipfile.ZipFile(fh) as archive:
            def small(name: str) -> np.ndarray:
                with archive.open(name) as member:
                    return np.lib.format.read_array(member, allow_pickle=False)

            meta = _check_meta(path, json.loads(str(small("meta.npy"))))
            names = small("paths.npy").tolist()
            kinds = small("kinds.npy")
            stamps = small("stamps.npy")
            fh.seek(_npz_member_offset(archive, fh, "embeddings.npy"))
            shape, fortran, dtype = _array_header(fh)
            offset = fh.tell()
            if offset + int(np.prod(shape)) * dtype.itemsize > os.fstat(fh.fileno()).st_size:
                raise ValueError("its rows are cut short")
        if fortran or len(shape) != 2 or dtype != np.dtype(meta["dtype"]).newbyteorder("<"):
            raise ValueError(f"rows are {dtype} {shape}, the meta says {meta['dtype']}")
        rows = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape) if shape[0] and shape[1] else np.zeros(shape, dtype)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        if isinstance(exc, OutputError):
            raise
        raise _damaged(path, f"unreadable ({type(exc).__name__}: {exc})") from None
    names = ListNames([str(n) for n in names])
    _agree(path, meta, shape, names)
    kinds = kinds == "text"
    _check_kinds(path, meta, kinds)
    return Store(path, meta, kinds, names, _check_stamps(path, meta, stamps), rows=rows, row_file=RowFile(path, offset))


def _read_jsonl(path: Path) -> Store:
    meta = _check_meta(path, _read_meta_file(path))
    names, kinds, stamps, rows = [], [], [], []
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            for number, line in enumerate(fh, 1):
                record = json.loads(line)
                kind = record.get("kind")
                if kind not in KINDS:
                    raise ValueError(f"line {number}: no kind")
                names.append(record["path"] if kind == "image" else record["text"])
                kinds.append(kind == "text")
                stamps.append((record.get("size", -1), record.get("mtime_ns", -1), bytes.fromhex(record.get("sha256", ""))))
                rows.append(record["embedding"])
        array = np.asarray(rows, dtype=meta["dtype"]).reshape(len(rows), -1) if rows else np.zeros((0, meta["dim"]), meta["dtype"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _damaged(path, f"unreadable ({exc})") from None
    _agree(path, meta, array.shape, names)
    kinds = np.array(kinds, dtype=bool)
    _check_kinds(path, meta, kinds)
    stamp_array = np.array(stamps, dtype=STAMP_DTYPE) if stamps else np.zeros(0, STAMP_DTYPE)
    return Store(path, meta, kinds, ListNames(names), stamp_array, rows=array)


def _read_parquet(path: Path) -> Store:
    pq = _pyarrow_parquet()
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        # pre_buffer (pyarrow's default) reads every row group ahead: the whole file in memory.
        handle = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        meta = json.loads((handle.schema_arrow.metadata or {}).get(b"siglip", b"null"))
        meta = _check_meta(path, meta)
        embedding = handle.schema_arrow.field("embedding").type
        columns = handle.read(columns=["kind", "path"])
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        if isinstance(exc, OutputError):
            raise
        raise _damaged(path, f"unreadable ({type(exc).__name__}: {exc})") from None
    dim, dtype = meta["dim"], np.dtype(meta["dtype"])
    if not pa.types.is_fixed_size_list(embedding) or embedding.list_size != dim or embedding.value_type.to_pandas_dtype() != dtype:
        raise _damaged(path, f"its embedding column is {embedding}, the meta says {dim} x {dtype}")
    if handle.metadata.num_rows != meta["count"]:
        raise _damaged(path, f"it holds {handle.metadata.num_rows} rows, its meta says {meta['count']}")
    names = ArrowNames(columns.column("path").combine_chunks())
    kinds = pc.equal(columns.column("kind"), "text").to_numpy(zero_copy_only=False).astype(bool)
    _agree(path, meta, (len(names), dim), names)
    _check_kinds(path, meta, kinds)

    def chunks(size: int) -> Iterator[np.ndarray]:
        try:
            for batch in handle.iter_batches(batch_size=size, columns=["embedding"], use_threads=False):
                values = batch.column(0).flatten().to_numpy(zero_copy_only=False)
                yield np.asarray(values, dtype=dtype).reshape(-1, dim)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise _damaged(path, f"unreadable rows ({exc})") from None

    def stamps() -> np.ndarray:
        try:
            table = handle.read(columns=["size", "mtime_ns", "sha256"])
        except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
            raise _damaged(path, f"unreadable stamps ({exc})") from None
        out = np.zeros(meta["count"], STAMP_DTYPE)
        out["size"] = table.column("size").to_numpy(zero_copy_only=False)
        out["mtime_ns"] = table.column("mtime_ns").to_numpy(zero_copy_only=False)
        out["sha256"] = [h or b"" for h in table.column("sha256").to_pylist()]
        return out

    return Store(path, meta, kinds, names, stamps, chunks=chunks, row_source=ParquetRows(handle, dim, dtype, path))


_READERS = {".npy": _read_npy, ".npz": _read_npz, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def open_store(path: str | os.PathLike) -> Store:
    """Read a store back, checking that its parts agree. Damage is an OutputError in one line."""
    path = Path(path)
    if path.suffix not in _READERS:
        raise UsageError(f"{path}: not an embedding file (use the .npy, .npz, .jsonl or .parquet that siglip embed wrote)")
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    return _READERS[path.suffix](path)


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
            raise UsageError(
                f"{self.folder} was made from other inputs (files added, removed or renamed since); "
                "rerun with the same inputs, or delete it to start over"
            )
        if changed:
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

    def add(self, kind: str, name: str, stamp: tuple | None, vector: np.ndarray) -> None:
        row = np.asarray(vector).astype(self.dtype, copy=False)
        if row.shape != (self.dim,):
            raise ValueError(f"row for {name} has shape {row.shape}, expected ({self.dim},)")
        size, mtime, digest = stamp or NO_STAMP
        record = {"kind": kind, "name": name, "size": size, "mtime_ns": mtime}
        if digest:
            record["sha256"] = digest.hex()
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


def _stamps(entries: Sequence[Entry]) -> np.ndarray:
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


def row_record(kind: str, name: str, row: np.ndarray, stamp: tuple | None = None) -> dict:
    """One row as a JSON object: the `.jsonl` format, and `embed --format jsonl` on stdout."""
    record: dict[str, Any] = {"kind": kind, "path" if kind == "image" else "text": name, "embedding": embedding_values(row)}
    if stamp is not None and stamp[0] >= 0:
        record["size"], record["mtime_ns"] = int(stamp[0]), int(stamp[1])
        if stamp[2]:
            record["sha256"] = bytes(stamp[2]).hex()
    return record


def _write_jsonl(tmp: str, entries: Sequence[Entry], dim: int, dtype: np.dtype) -> None:
    with open(tmp, "wb") as fh:
        position = 0
        for chunk in _chunked(entries, dim, dtype):
            for row in chunk:
                entry = entries[position]
                fh.write(_json_line(row_record(entry.kind, entry.name, row, entry.stamp)).encode("utf-8", "surrogateescape"))
                position += 1
        fh.flush()
        os.fsync(fh.fileno())


def _write_parquet(tmp: str, entries: Sequence[Entry], dim: int, dtype: np.dtype, meta: dict) -> None:
    import pyarrow as pa

    pq = _pyarrow_parquet()
    value_type = pa.float16() if dtype == np.float16 else pa.float32()
    schema = pa.schema(
        [
            ("kind", pa.string()),
            ("path", pa.string()),
            ("embedding", pa.list_(value_type, dim)),
            ("size", pa.int64()),
            ("mtime_ns", pa.int64()),
            ("sha256", pa.binary()),
        ],
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
        ready.append((text_temporary(meta_path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n"), meta_path))
        tmp = temporary_beside(out)
        ready.append((tmp, out))
        if out.suffix == ".npy":
            _write_npy_rows(tmp, entries, dim, dtype_)
        elif out.suffix == ".npz":
            _write_npz(tmp, entries, dim, dtype_, meta)
        elif out.suffix == ".jsonl":
            _write_jsonl(tmp, entries, dim, dtype_)
        else:
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
