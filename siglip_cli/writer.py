"""Embedding rows -> files on disk, streamed, resumable and atomic.

While a run goes on, rows are appended to `<out>.partial/`: `rows.bin` (raw little-endian
rows), `names.txt` (line i names row i), `skipped.jsonl` (inputs that failed, with the reason)
and `state.json` (the settings the rows were made with). Each batch is flushed before the next
one starts, so an interrupted run keeps all finished batches; `--resume` checks the settings,
trims a half-written row, skips every input already done and carries on.

When the run completes, all final files are built from the partial state under temporary names
and flushed to disk; only then are they renamed into place -- sidecars first, the main file last,
the partial state removed after that -- so `vecs.npy` is either the previous complete set or the
new complete set, and always matches its sidecars:
- `.npy`: rows; beside it `.paths.txt` (line i = source of row i) and `.meta.json`
- `.npz`: `embeddings` and `paths` arrays in one file (plus the `.meta.json`)
- `.jsonl`: one {"path" | "text", "embedding"} object per line (plus the `.meta.json`)
Memory stays flat: rows are copied in chunks, never held all at once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import SiglipError, UsageError

OUTPUT_SUFFIXES = (".npy", ".npz", ".jsonl")
TEXT_PREFIX = "text:"
_CHUNK_ROWS = 8192


def sidecar(out: Path, suffix: str) -> Path:
    """vecs.npy -> vecs.paths.txt / vecs.meta.json."""
    return out.with_name(out.stem + suffix)


class OutputError(SiglipError):
    """The output folder cannot be written (permissions, full disk)."""

    exit_code = 1


def has_line_break(name: str) -> bool:
    return name.splitlines() != [name]


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


def text_temporary(path: Path, text: str) -> str:
    """`text` written and flushed to disk in a new temporary file beside `path`; returns its name."""
    tmp = temporary_beside(path)
    try:
        # surrogateescape: file names that are not valid UTF-8 round-trip byte for byte
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as fh:
            fh.write(text)
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


def _remove(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class EmbeddingWriter:
    def __init__(self, out: Path, dim: int, dtype: str, settings: dict, resume: bool):
        self.out = out
        if out.suffix not in OUTPUT_SUFFIXES:
            raise UsageError(f"--out {out}: use a .npy, .npz or .jsonl file name")
        if not out.parent.is_dir():
            raise UsageError(f"--out {out}: folder {out.parent} does not exist")
        for path in (out, sidecar(out, ".paths.txt"), sidecar(out, ".meta.json")):
            if path.is_dir():
                raise UsageError(f"--out {out}: {path} is a folder")
        self.dim = dim
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.row_bytes = dim * self.dtype.itemsize
        self.partial = out.with_name(out.name + ".partial")
        self.settings = {**settings, "dim": dim, "dtype": dtype}
        self.names: list[str] = []
        self.skipped: list[dict] = []
        try:
            if self.partial.exists():
                if not resume:
                    raise UsageError(
                        f"{self.partial} holds an interrupted run; add --resume to continue it, or delete it to start over"
                    )
                self._load_partial()
            else:
                self.partial.mkdir()
                atomic_write_text(self.partial / "state.json", json.dumps(self.settings, indent=2))
            self.rows = open(self.partial / "rows.bin", "ab")
            self.names_file = self._text_file("names.txt")
            self.skipped_file = self._text_file("skipped.jsonl")
        except OSError as exc:
            raise OutputError(f"{exc.filename or self.partial}: cannot write ({exc.strerror or exc})") from None
        self._resumed_images = sum(1 for n in self.names if not n.startswith(TEXT_PREFIX))

    def _text_file(self, name: str):
        return open(self.partial / name, "a", encoding="utf-8", errors="surrogateescape", newline="\n")

    def _read_lines(self, name: str) -> list[str]:
        """Complete lines only: the text after the last newline is a half-written line."""
        path = self.partial / name
        if not path.exists():
            return []
        with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as fh:
            return fh.read().split("\n")[:-1]

    def _load_partial(self) -> None:
        try:
            state = json.loads((self.partial / "state.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            raise UsageError(f"{self.partial}: unreadable state.json; delete the folder to start over") from None
        changed = sorted(k for k in set(state) | set(self.settings) if state.get(k) != self.settings.get(k))
        if "model" in changed and state.get("revision") == self.settings.get("revision"):
            changed.remove("model")  # the same checkpoint, named by another path
        if changed == ["inputs"]:
            raise UsageError(
                f"{self.partial} was made from other inputs (files added, removed or renamed since); "
                "rerun with the same inputs, or delete it to start over"
            )
        if changed:
            raise UsageError(
                f"{self.partial} was made with different settings ({', '.join(changed)}); "
                "rerun with the same options, or delete it to start over"
            )
        rows_path = self.partial / "rows.bin"
        names_path = self.partial / "names.txt"
        complete_names = self._read_lines("names.txt")
        rows = rows_path.stat().st_size // self.row_bytes if rows_path.exists() else 0
        count = min(rows, len(complete_names))
        self.names = complete_names[:count]
        with open(rows_path, "ab") as fh:
            fh.truncate(count * self.row_bytes)
        atomic_write_text(names_path, "".join(n + "\n" for n in self.names))
        for line in self._read_lines("skipped.jsonl"):
            try:
                self.skipped.append(json.loads(line))
            except json.JSONDecodeError:
                break
        atomic_write_text(self.partial / "skipped.jsonl", "".join(json.dumps(s) + "\n" for s in self.skipped))

    def resumed_images(self) -> int:
        """Image rows that came from the interrupted run this one resumed."""
        return self._resumed_images

    def done(self) -> set[str]:
        """Inputs a resumed run must not redo: embedded or skipped before."""
        return set(self.names) | {s["path"] for s in self.skipped}

    def add(self, name: str, vector: np.ndarray) -> None:
        if has_line_break(name):
            raise ValueError(f"{name!r} holds a line break and cannot be a line of names.txt")
        row = np.asarray(vector).astype(self.dtype, copy=False)
        if row.shape != (self.dim,):
            raise ValueError(f"row for {name} has shape {row.shape}, expected ({self.dim},)")
        try:
            self.rows.write(row.tobytes())
            self.names_file.write(name + "\n")
        except OSError as exc:
            raise OutputError(f"{self.partial}: cannot write ({exc.strerror or exc})") from None
        self.names.append(name)

    def skip(self, name: str, reason: str) -> None:
        record = {"path": name, "error": reason}
        try:
            self.skipped_file.write(json.dumps(record) + "\n")  # ASCII: any file name round-trips
        except OSError as exc:
            raise OutputError(f"{self.partial}: cannot write ({exc.strerror or exc})") from None
        self.skipped.append(record)

    def commit(self) -> None:
        """Make everything added so far durable (rows before names, so names never run ahead)."""
        try:
            for fh in (self.rows, self.skipped_file, self.names_file):
                if not fh.closed:
                    fh.flush()
                    os.fsync(fh.fileno())
        except OSError as exc:
            raise OutputError(f"{self.partial}: cannot write ({exc.strerror or exc})") from None

    def close(self) -> None:
        for fh in (self.rows, self.names_file, self.skipped_file):
            if not fh.closed:
                fh.close()

    # ------------------------------------------------------------------ finishing
    def _chunks(self) -> Iterator[np.ndarray]:
        with open(self.partial / "rows.bin", "rb") as fh:
            while True:
                data = fh.read(_CHUNK_ROWS * self.row_bytes)
                if not data:
                    return
                yield np.frombuffer(data, dtype=self.dtype).reshape(-1, self.dim)

    def finish(self, meta: dict) -> dict:
        """Write the final files atomically and remove the partial state. Returns the meta."""
        self.commit()
        self.close()
        meta = {
            **meta,
            "dim": self.dim,
            "dtype": self.dtype.name,
            "count": len(self.names),
            "skipped_count": len(self.skipped),
            "skipped": self.skipped,
        }
        writers = {".npy": self._write_npy, ".npz": self._write_npz, ".jsonl": self._write_jsonl}
        # Every file is written in full under a temporary name first; only when all of them are on
        # disk are they renamed, sidecars first and the main file last. A full disk or a crash while
        # writing leaves the previous vecs.npy and its sidecars as they were, never a mix.
        ready: list[tuple[str, Path]] = []
        try:
            if self.out.suffix == ".npy":
                paths = sidecar(self.out, ".paths.txt")
                ready.append((text_temporary(paths, "".join(n + "\n" for n in self.names)), paths))
            meta_path = sidecar(self.out, ".meta.json")
            ready.append((text_temporary(meta_path, json.dumps(meta, indent=2) + "\n"), meta_path))
            tmp = temporary_beside(self.out)
            ready.append((tmp, self.out))
            writers[self.out.suffix](tmp)
            _fsync_file(tmp)
            while ready:
                os.replace(*ready[0])
                ready.pop(0)
            _fsync_dir(self.out.parent)
        except OSError as exc:
            raise OutputError(f"{self.out}: cannot write ({exc.strerror or exc})") from None
        finally:
            for tmp, _ in ready:
                _remove(tmp)
        shutil.rmtree(self.partial, ignore_errors=True)
        return meta

    def _write_npy(self, tmp: str) -> None:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype, shape=(len(self.names), self.dim))
        start = 0
        for chunk in self._chunks():
            array[start : start + len(chunk)] = chunk
            start += len(chunk)
        array.flush()
        del array

    def _write_npz(self, tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            shape = (len(self.names), self.dim)
            with archive.open("embeddings.npy", "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_2_0(member, header)
                for chunk in self._chunks():
                    member.write(chunk.tobytes())
            width = max([1] + [len(n) for n in self.names])
            with archive.open("paths.npy", "w", force_zip64=True) as member:
                dtype = np.dtype(f"<U{width}")
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (len(self.names),)}
                np.lib.format.write_array_header_2_0(member, header)
                for start in range(0, len(self.names), _CHUNK_ROWS):
                    member.write(np.array(self.names[start : start + _CHUNK_ROWS], dtype=dtype).tobytes())

    def _write_jsonl(self, tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            names = iter(self.names)
            for chunk in self._chunks():
                for row in chunk:
                    fh.write(json.dumps(embedding_record(next(names), row)) + "\n")


def _fsync_file(path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def embedding_record(name: str, row: np.ndarray) -> dict:
    values = [float(f"{v:.7g}") for v in row.astype(np.float32).tolist()]
    if name.startswith(TEXT_PREFIX):
        return {"text": name[len(TEXT_PREFIX) :], "embedding": values}
    return {"path": name, "embedding": values}
