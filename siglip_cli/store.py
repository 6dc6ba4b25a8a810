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
import errno
import fcntl
import json
import os
import shutil
import struct
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .core.errors import OutputError, UsageError

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


def _cannot_write(path, exc: OSError) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return OutputError(f"{path}: no space left on the device; free some space and run again (with --resume to keep finished rows)")
    if exc.errno == errno.EDQUOT:
        return OutputError(f"{path}: disk quota exceeded; free some space and run again (with --resume to keep finished rows)")
    return OutputError(f"{path}: cannot write ({exc.strerror or exc})")


def _remove(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_beside(path: Path) -> str:
    """A new empty file next to `path` (same filesystem, so os.replace is atomic), with the
    permissions a plain open() would give it (mkstemp alone makes it private)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return tmp


def _reserve(fh, size: int) -> None:
    """Claim the disk space a file will need before writing it, so a full disk fails at once
    with ENOSPC instead of half-way (or, through a memory map, with SIGBUS)."""
    if size > 0 and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fh.fileno(), 0, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            # EINVAL/EOPNOTSUPP: the filesystem cannot reserve; plain writes still fail cleanly


def text_temporary(path: Path, text: str) -> str:
    """`text` written and flushed in a new temporary file beside `path`; returns its name."""
    tmp = temporary_beside(path)
    try:
        data = text.encode("utf-8", "surrogateescape")  # non-UTF-8 file names round-trip
        with open(tmp, "wb") as fh:
            _reserve(fh, len(data))
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        _remove(tmp)
        raise
    return tmp


def atomic_write_text(path: Path, text: str) -> None:
    tmp = text_temporary(path, text)
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def has_line_break(name: str) -> bool:
    """Only "\\n" separates lines in paths.txt; other line-break characters (U+2028, U+0085,
    "\\r") are kept as they are."""
    return "\n" in name


# ============================================================================ the lock
class OutputLock:
    """An exclusive lock on an output, held for a whole run: `.<name>.lock` beside it holds an
    `fcntl` lock and the owner's pid. The lock goes with the process on any exit (even SIGKILL);
    the file is removed on a clean release."""

    def __init__(self, out: Path):
        self.path = out.with_name(f".{out.name}.lock")
        self.out = out
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise _cannot_write(self.path, exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise UsageError(
                    f"--out {self.out}: another siglip run is writing it ({owner}); "
                    "wait for it to finish, or stop it first"
                ) from None
            # The file may have been removed (and recreated) by the previous owner between our
            # open and our lock: then we hold a lock on an orphan, so try again.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        _remove(self.path)  # while still holding the lock: a waiting run then retries on a new file
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_owner(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        owner = json.loads(os.read(fd, 4096) or b"{}")
        return f"pid {owner['pid']}, started {owner['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


# ============================================================================ reading
@dataclass
class Store:
    """A store read back. `rows` is memory-mapped for .npy and .npz (nothing is read until used);
    `chunks()` reads any format in pieces, so memory stays flat."""

    path: Path
    meta: dict
    names: list[str]
    kinds: np.ndarray  # (N,) bool: True for text rows
    stamps: np.ndarray  # (N,) STAMP_DTYPE
    _rows: np.ndarray | None = None
    _chunks: Any = None  # callable(size) -> iterator of (N_i, D) arrays, for formats without a map

    @property
    def count(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def rows(self) -> np.ndarray:
        """All rows (N, D). Memory-mapped where the format allows; otherwise read whole."""
        if self._rows is None:
            parts = list(self.chunks())
            self._rows = np.concatenate(parts) if parts else np.zeros((0, self.dim), self.meta["dtype"])
        return self._rows

    def chunks(self, size: int = _CHUNK_ROWS) -> Iterator[np.ndarray]:
        if self._rows is not None:
            for start in range(0, self.count, size):
                yield self._rows[start : start + size]
        else:
            yield from self._chunks(size)

    def kind(self, index: int) -> str:
        return "text" if self.kinds[index] else "image"

    def image_rows(self) -> dict[str, int]:
        """name -> row of every image row."""
        return {name: i for i, (name, is_text) in enumerate(zip(self.names, self.kinds)) if not is_text}


def _damaged(path: Path, why: str) -> OutputError:
    return OutputError(f"{path}: {why}; it is damaged or not a siglip embedding file (re-create it with siglip embed)")


def _check_meta(path: Path, meta: Any) -> dict:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise _damaged(path, "no siglip meta")
    for key in ("dim", "dtype", "count", "image_rows", "text_rows"):
        if key not in meta:
            raise _damaged(path, f"its meta lacks {key!r}")
    if meta["count"] != meta["image_rows"] + meta["text_rows"]:
        raise _damaged(path, "its meta's row counts disagree")
    return meta


def _read_meta_file(path: Path) -> dict:
    meta_path = sidecar(path, ".meta.json")
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OutputError(f"{path}: no {meta_path.name} beside it; is it a siglip embedding file?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(meta_path, f"unreadable meta ({exc})") from None


def _kinds_from_meta(meta: dict) -> np.ndarray:
    kinds = np.zeros(meta["count"], dtype=bool)
    kinds[meta["image_rows"] :] = True
    return kinds


def _agree(path: Path, meta: dict, rows_shape: tuple, names: Sequence, stamps: np.ndarray) -> None:
    count, dim = meta["count"], meta["dim"]
    if tuple(rows_shape) != (count, dim):
        raise _damaged(path, f"its rows are {tuple(rows_shape)}, its meta says ({count}, {dim})")
    if len(names) != count:
        raise _damaged(path, f"it names {len(names)} rows, holds {count}")
    if len(stamps) != count:
        raise _damaged(path, f"it has {len(stamps)} file stamps for {count} rows")


def _read_npy(path: Path) -> Store:
    meta = _check_meta(path, _read_meta_file(path))
    try:
        rows = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise _damaged(path, f"unreadable rows ({exc})") from None
    if rows.ndim != 2 or rows.dtype != np.dtype(meta["dtype"]):
        raise _damaged(path, f"rows are {rows.dtype} {rows.shape}, the meta says {meta['dtype']}")
    try:
        text = sidecar(path, ".paths.txt").read_bytes().decode("utf-8", "surrogateescape")
    except OSError as exc:
        raise _damaged(sidecar(path, ".paths.txt"), f"unreadable ({exc.strerror or exc})") from None
    names = text.split("\n")
    if names and names[-1] == "":
        names.pop()
    try:
        stamps = np.load(sidecar(path, ".stamps.npy"), allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise _damaged(sidecar(path, ".stamps.npy"), f"unreadable ({exc})") from None
    if stamps.dtype != STAMP_DTYPE:
        raise _damaged(sidecar(path, ".stamps.npy"), "unexpected stamp layout")
    _agree(path, meta, rows.shape, names, stamps)
    return Store(path, meta, names, _kinds_from_meta(meta), stamps, _rows=rows)


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
            start = _npz_member_offset(archive, fh, "embeddings.npy")
            fh.seek(start)
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(fh)
            offset = fh.tell()
        if fortran:
            raise ValueError("Fortran order")
        if shape[0] == 0:
            rows = np.zeros(shape, dtype)
        else:
            rows = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        if isinstance(exc, OutputError):
            raise
        raise _damaged(path, f"unreadable ({type(exc).__name__}: {exc})") from None
    _agree(path, meta, shape, names, stamps)
    if len(kinds) != meta["count"]:
        raise _damaged(path, "its kinds disagree with its rows")
    return Store(path, meta, [str(n) for n in names], kinds == "text", stamps, _rows=rows)


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
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _damaged(path, f"unreadable ({exc})") from None
    array = np.asarray(rows, dtype=meta["dtype"]).reshape(len(rows), -1) if rows else np.zeros((0, meta["dim"]), meta["dtype"])
    stamp_array = np.array(stamps, dtype=STAMP_DTYPE)
    _agree(path, meta, array.shape, names, stamp_array)
    return Store(path, meta, names, np.array(kinds, dtype=bool), stamp_array, _rows=array)


def _read_parquet(path: Path) -> Store:
    pq = _pyarrow_parquet()
    try:
        handle = pq.ParquetFile(path)
        meta = json.loads((handle.schema_arrow.metadata or {}).get(b"siglip", b"null"))
        meta = _check_meta(path, meta)
        columns = handle.read(columns=["kind", "path", "size", "mtime_ns", "sha256"])
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, OutputError):
            raise
        raise _damaged(path, f"unreadable ({type(exc).__name__}: {exc})") from None
    names = columns.column("path").to_pylist()
    kinds = np.array([k == "text" for k in columns.column("kind").to_pylist()], dtype=bool)
    stamps = np.array(
        list(zip(columns.column("size").to_pylist(), columns.column("mtime_ns").to_pylist(),
                 [h or b"" for h in columns.column("sha256").to_pylist()])),
        dtype=STAMP_DTYPE,
    ) if names else np.zeros(0, STAMP_DTYPE)
    dim, dtype = meta["dim"], np.dtype(meta["dtype"])

    def chunks(size: int) -> Iterator[np.ndarray]:
        try:
            for batch in handle.iter_batches(batch_size=size, columns=["embedding"]):
                values = batch.column(0).flatten().to_numpy(zero_copy_only=False)
                yield np.asarray(values, dtype=dtype).reshape(-1, dim)
        except (OSError, ValueError) as exc:
            raise _damaged(path, f"unreadable rows ({exc})") from None

    if handle.metadata.num_rows != meta["count"]:
        raise _damaged(path, f"it holds {handle.metadata.num_rows} rows, its meta says {meta['count']}")
    _agree(path, meta, (len(names), dim), names, stamps)
    return Store(path, meta, names, kinds, stamps, _chunks=chunks)


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
            if folder.exists():
                if not resume:
                    raise UsageError(
                        f"{folder} holds an interrupted run; add --resume to continue it, or delete it to start over"
                    )
                self._load()
            else:
                folder.mkdir()
                atomic_write_text(folder / "state.json", json.dumps(self.settings, indent=2))
            self._rows = open(folder / "rows.bin", "ab")
            self._index = open(folder / "rows.jsonl", "ab")
            self._skipped = open(folder / "skipped.jsonl", "ab")
        except OSError as exc:
            raise _cannot_write(exc.filename or folder, exc) from None

    def _lines(self, name: str) -> list[str]:
        """Complete lines only: the text after the last newline is a half-written line."""
        path = self.folder / name
        if not path.exists():
            return []
        return path.read_bytes().decode("utf-8", "surrogateescape").split("\n")[:-1]

    def _load(self) -> None:
        try:
            state = json.loads((self.folder / "state.json").read_text(encoding="utf-8"))
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
        rows = rows_path.stat().st_size // self.row_bytes if rows_path.exists() else 0
        count = min(rows, len(records))
        self.records = records[:count]
        with open(rows_path, "ab") as fh:
            fh.truncate(count * self.row_bytes)
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
    import io

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
            paths = sidecar(out, ".paths.txt")
            ready.append((text_temporary(paths, "".join(e.name + "\n" for e in entries)), paths))
            stamps = sidecar(out, ".stamps.npy")
            tmp = temporary_beside(stamps)
            ready.append((tmp, stamps))
            with open(tmp, "wb") as fh:
                np.save(fh, _stamps(entries), allow_pickle=False)
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
        meta = json.loads(sidecar(out, ".meta.json").read_text(encoding="utf-8"))
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
