"""Journaled actions on a user's files: move, copy and link into a destination folder, and undo.

Everything that changes a user's files (`classify --sort-into`, `dedupe --move-to`) goes through
a `Journal`, so crash safety, undo and the symlink checks are written once. The discipline is
git's (lock, write beside, rename into place) with a journal in front:

- The destination folder DIR holds the manifest (`siglip-sort.jsonl`, `siglip-dedupe.jsonl`), a
  JSON-lines file. Each step is appended, flushed and fsynced as `begin` (op, source,
  destination, temporary, size, sha256) BEFORE anything on disk changes, and as `done` (or
  `failed`, with the reason) after. A run holds an `fcntl` lock on `DIR/.<manifest>.lock`, so two
  runs never write one manifest.
- Nothing is ever overwritten: a destination name that exists gets a numbered suffix,
  `photo (2).jpg`, the way file managers and browsers name a second copy (it reads as "another
  copy of photo.jpg", which `photo-2.jpg` does not: cameras already use that pattern). Names are
  claimed with O_EXCL / link(), which fail on an existing name instead of replacing it.
- Files we create never follow a planted symbolic link: folders under DIR are walked with
  O_NOFOLLOW|O_DIRECTORY file descriptors, files are created with O_EXCL|O_NOFOLLOW, and the
  final name is claimed with link() (which never follows a symlink at the destination).
- `move` on one file system is link() + unlink() of the source (atomic, no-clobber; a crash
  between the two leaves one file under two names, which undo recognises by inode). Across file
  systems it copies into a temporary beside the destination, fsyncs it, verifies size and
  SHA-256 against the source, links it into place, and only then deletes the source.
- `copy` is the same temporary + verify + link; `link` makes a hard link where the file system
  allows and a symbolic link (to the absolute source path) where not, and says which.
- A source that vanished or changed since it was listed (size or modification time differ from
  the stamp the caller passes) is skipped with a note; nothing else is deleted, ever, except a
  move's source after its verified copy, and (by `undo`) our own copies and links while they
  still hold what we wrote.

Files edited in place elsewhere (XMP sidecars beside the images, `classify --write-xmp`) go
through `SidecarJournal`, the same journal with other records: a verified copy of the bytes a
write replaces and its hashes before, the new hash after; `undo_sidecars` puts them back.

`undo(DIR, manifest)` reads the whole manifest first (a hand-edited one with bad JSON, or with a
destination outside DIR, is refused in one line before anything is touched), then goes back
through the steps, newest first, and decides each by looking at the disk, so it also finishes
the job after a SIGKILL at any point, and running it twice does nothing the second time.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .core.errors import OutputError, UsageError
from .safefiles import _read_owner  # the lock's owner, as the output lock reports it

SORT_MANIFEST = "siglip-sort.jsonl"
DEDUPE_MANIFEST = "siglip-dedupe.jsonl"
OPS = ("move", "copy", "link")
_EVENTS = ("run", "begin", "done", "failed", "undo-begin", "undone")
_CHUNK = 1 << 20
_HARD_LINK_UNSUPPORTED = (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EACCES)
_MAX_NAME_BYTES = 255


@dataclass
class Outcome:
    """What one action did: `destination` is where the file went (after any numbered suffix),
    `method` how (rename, copy, copy+delete, hardlink, symlink); `skipped` says why nothing was
    done instead."""

    op: str
    source: Path
    destination: Path | None = None
    method: str = ""
    skipped: str | None = None

    @property
    def done(self) -> bool:
        return self.skipped is None


@dataclass
class UndoOutcome:
    """What undo did with one step: `result` is restored (a move put back), removed (our copy or
    link deleted), kept (left alone, `note` says why) or nothing (there was nothing to undo)."""

    op: str
    source: Path
    destination: Path
    result: str
    note: str = ""


# ============================================================================ small helpers
def _cannot_write(path, exc: OSError) -> OutputError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"{path}: no space left on the device; nothing was half-written (free some space and run again)")
    if exc.errno in (errno.EROFS,):
        return OutputError(f"{path}: the file system is read-only")
    return OutputError(f"{path}: cannot write ({exc.strerror or exc})")


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _hash_fd(fd: int) -> tuple[int, str]:
    """(size, sha256 hex) of an open file, read from its start."""
    os.lseek(fd, 0, os.SEEK_SET)
    digest = hashlib.sha256()
    size = 0
    while True:
        block = os.read(fd, _CHUNK)
        if not block:
            break
        digest.update(block)
        size += len(block)
    return size, digest.hexdigest()


def file_digest(path, dir_fd: int | None = None, follow: bool = True) -> tuple[int, str]:
    """(size, sha256 hex) of a file; with follow=False a symbolic link raises OSError(ELOOP)."""
    flags = os.O_RDONLY | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        return _hash_fd(fd)
    finally:
        os.close(fd)


def _fsync(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError:
        pass


def _fsync_folder(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    _fsync(fd)
    os.close(fd)


def _exists_at(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def numbered(name: str, number: int) -> str:
    """photo.jpg, 2 -> "photo (2).jpg"; .hidden -> ".hidden (2)"; archive.tar.gz -> "archive (2).tar.gz"
    is not attempted: only the last suffix is kept apart."""
    if number < 2:
        return name
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem:
        return f"{name} ({number})"
    return f"{stem} ({number}).{suffix}"


def _check_relative(text: str, what: str) -> PurePosixPath:
    """A destination inside DIR: relative, no `..`, no empty or `.` parts."""
    path = PurePosixPath(text)
    if path.is_absolute() or not path.parts or any(part in ("..", ".", "") for part in path.parts) or "\x00" in text:
        raise ValueError(f"{what} {text!r} is not a path inside the folder")
    return path


def _copy_into(src_fd: int, dst_fd: int) -> None:
    os.lseek(src_fd, 0, os.SEEK_SET)
    while True:
        block = os.read(src_fd, _CHUNK)
        if not block:
            break
        view = memoryview(block)
        while view:
            written = os.write(dst_fd, view)
            view = view[written:]


# ============================================================================ the lock
class FolderLock:
    """An exclusive `fcntl` lock on `.<manifest>.lock` inside DIR (opened with O_NOFOLLOW), held
    for a whole run or undo; it goes with the process on any exit, even SIGKILL."""

    def __init__(self, root_fd: int, root: Path, manifest: str):
        self.name = f".{manifest}.lock"
        self.root, self.root_fd = root, root_fd
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644, dir_fd=self.root_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OutputError(f"{self.root / self.name}: is a symbolic link; remove it (siglip never writes through one)") from None
            raise _cannot_write(self.root / self.name, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise UsageError(f"{self.root}: another siglip run is working in it ({owner}); wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd

    def release(self) -> None:
        # The lock file stays (empty of meaning once unlocked): removing it while another run
        # waits to open it would let two runs hold locks on two different files.
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
        _close(self.fd)
        self.fd = None


def is_inside(path: Path, folder: Path) -> bool:
    """`path` is `folder` or below it (both resolved by the caller)."""
    return path == folder or folder in path.parents


def check_destination(flag: str, given: Path, target: Path, input_folders: list[Path]) -> None:
    """A destination folder for the user's files (--sort-into, --move-to), refused before any
    work when it lies inside an input folder (the next run would take what we put there as
    inputs) or when the nearest existing folder on its way is not writable."""
    for root in input_folders:
        if is_inside(target, root):
            raise UsageError(f"{flag} {given}: is inside the input folder {root}; choose a folder outside the inputs")
    parent = target
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {given}: {parent} is not writable")


# ============================================================================ reading a manifest
@dataclass
class Step:
    number: int
    op: str
    source: Path
    destination: PurePosixPath
    temporary: PurePosixPath | None
    size: int
    sha256: str
    finished: str | None = None  # done | failed | None (begun, never finished: a crash)
    method: str = ""
    undone: bool = False
    undo_temporary: str | None = None  # beside the source, for a cross-device move back


def read_manifest(path: Path, make_step=None) -> list:
    """The steps a manifest records, checked whole before anything acts on them. A last line
    without its newline is a write a crash cut short (its step never began) and is ignored;
    anything else that does not parse is refused. `make_step(record, number)` builds a step from
    its `begin` record (the sort and dedupe manifests' Step by default; the sidecar journal's
    SidecarStep), raising ValueError, TypeError or KeyError for one that does not check out."""
    make_step = make_step or _step_from
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return []
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(f"{path}: is a symbolic link, not a siglip manifest; nothing was changed") from None
        raise OutputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise OutputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    steps: dict[int, Step] = {}

    def refuse(number: int, why: str) -> OutputError:
        return OutputError(f"{path}: line {number}: {why}; the manifest was edited or damaged, so nothing was changed")

    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise refuse(number, "not JSON") from None
        if not isinstance(record, dict) or record.get("event") not in _EVENTS:
            raise refuse(number, "not a siglip manifest record")
        event = record["event"]
        if event == "run":
            continue
        step_number = record.get("step")
        if not isinstance(step_number, int) or isinstance(step_number, bool):
            raise refuse(number, "no step number")
        if event == "begin":
            try:
                step = make_step(record, step_number)
            except (ValueError, TypeError, KeyError) as exc:
                raise refuse(number, str(exc)) from None
            if step_number in steps:
                raise refuse(number, f"step {step_number} begins twice")
            steps[step_number] = step
            continue
        step = steps.get(step_number)
        if step is None:
            raise refuse(number, f"step {step_number} was never begun")
        if event in ("done", "failed"):
            step.finished = event
            step.method = str(record.get("method", ""))
        elif event == "undo-begin":
            temporary = record.get("temporary")
            if temporary is not None and (not isinstance(temporary, str) or "/" in temporary):
                raise refuse(number, "bad temporary name")
            step.undo_temporary = temporary
        elif event == "undone":
            step.undone = True
    if torn.strip():
        try:
            json.loads(torn.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            pass  # cut short by a crash while being written: its step never started
        else:
            raise refuse(len(lines) + 1, "a complete record without its line end")
    return list(steps.values())


def _step_from(record: dict, number: int) -> Step:
    op = record["op"]
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    source = record["source"]
    if not isinstance(source, str) or not os.path.isabs(source) or "\x00" in source:
        raise ValueError(f"source {source!r} is not an absolute path")
    destination = _check_relative(record["destination"], "destination")
    temporary = record.get("temporary")
    temporary = _check_relative(temporary, "temporary") if temporary is not None else None
    size, sha = _checked_digest(record["size"], record["sha256"])
    return Step(number, op, Path(source), destination, temporary, size, sha)


def _checked_digest(size, sha) -> tuple[int, str]:
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError("bad size")
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ValueError("bad sha256")
    return size, sha


# ============================================================================ the journal
class Journal:
    """A run of actions into `folder`, recorded in `folder/manifest`. Use as a context manager:

        with Journal(Path("sorted")) as journal:
            journal.copy(Path("a.jpg"), PurePosixPath("cat/a.jpg"), expected=(size, mtime_ns))

    Destinations are paths relative to the folder. Per-file problems (a source gone or changed,
    a read-only source folder) come back as a skipped Outcome; problems that would hit every
    later file too (a full disk, an unwritable folder) raise OutputError after the journal says
    so and the half-made temporary is gone."""

    make_step = staticmethod(_step_from)  # a `begin` record -> its step, for read_manifest

    def __init__(self, folder: Path, manifest: str = SORT_MANIFEST, command: str = "siglip"):
        self.root = Path(folder)
        self.manifest_name = manifest
        self.manifest = self.root / manifest
        self.command = command
        self._root_fd: int | None = None
        self._lock: FolderLock | None = None
        self._log_fd: int | None = None
        self._next = 1
        self._folders: dict[tuple[str, ...], int] = {}

    # ---------------------------------------------------------------- opening and recording
    def open(self, create: bool = True) -> "Journal":
        try:
            if create:
                os.makedirs(self.root, exist_ok=True)
            self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise UsageError(f"{self.root}: no such folder") from None
        except NotADirectoryError:
            raise UsageError(f"{self.root}: is a file, not a folder") from None
        except OSError as exc:
            raise _cannot_write(self.root, exc) from None
        self._lock = FolderLock(self._root_fd, self.root, self.manifest_name)
        try:
            self._lock.acquire()
            steps = read_manifest(self.manifest, self.make_step)
            self._next = max((step.number for step in steps), default=0) + 1
            self._log_fd = self._open_log()
        except BaseException:
            self.close()
            raise
        return self

    def _open_log(self) -> int:
        try:
            fd = os.open(self.manifest_name, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644, dir_fd=self._root_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OutputError(f"{self.manifest}: is a symbolic link; remove it (siglip never writes through one)") from None
            raise _cannot_write(self.manifest, exc) from None
        size = os.fstat(fd).st_size
        if size:
            # A last line without its newline is a record a crash cut short; its step never
            # began (records are durable before their step acts), so it is dropped.
            tail = os.pread(fd, min(size, 1 << 16), max(0, size - (1 << 16)))
            if not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                keep = size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= len(tail) else None)
                if keep is None:
                    raise OutputError(f"{self.manifest}: its last line is not a siglip record; the manifest was edited or damaged")
                os.ftruncate(fd, keep)
                os.fsync(fd)
        return fd

    def close(self) -> None:
        for fd in self._folders.values():
            _close(fd)
        self._folders.clear()
        _close(self._log_fd)
        self._log_fd = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        _close(self._root_fd)
        self._root_fd = None

    def __enter__(self) -> "Journal":
        return self.open() if self._root_fd is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    def record(self, **fields) -> None:
        """Append one record and make it durable before returning."""
        fields.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        line = json.dumps(fields, ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n"
        try:
            os.write(self._log_fd, line)
            os.fsync(self._log_fd)
        except OSError as exc:
            raise _cannot_write(self.manifest, exc) from None

    def start_run(self, **about) -> None:
        self.record(event="run", command=self.command, pid=os.getpid(), **about)

    # ---------------------------------------------------------------- folders under the root
    def folder_fd(self, parts: tuple[str, ...], create: bool = True) -> int | None:
        """A descriptor of root/parts, walked one component at a time with O_NOFOLLOW (made where
        missing, when `create`); None when missing and not `create`. A symlink or a file on the
        way is refused."""
        if not parts:
            return self._root_fd
        cached = self._folders.get(parts)
        if cached is not None:
            return cached
        parent = self.folder_fd(parts[:-1], create)
        if parent is None:
            return None
        name = parts[-1]
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
        where = self.root.joinpath(*parts)
        try:
            fd = os.open(name, flags, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                return None
            try:
                os.mkdir(name, 0o777, dir_fd=parent)
            except FileExistsError:
                pass
            except OSError as exc:
                raise _cannot_write(where, exc) from None
            try:
                fd = os.open(name, flags, dir_fd=parent)
            except OSError as exc:
                raise self._not_a_folder(where, exc) from None
        except OSError as exc:
            raise self._not_a_folder(where, exc) from None
        self._folders[parts] = fd
        return fd

    @staticmethod
    def _not_a_folder(where: Path, exc: OSError) -> OutputError:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return OutputError(f"{where}: is a symbolic link or a file, not a folder; siglip never writes through one")
        return _cannot_write(where, exc)

    def _free_name(self, folder: int, name: str) -> str:
        number = 1
        while True:
            candidate = numbered(name, number)
            if len(os.fsencode(candidate)) > _MAX_NAME_BYTES:
                raise UsageError(f"{name}: the name is too long for a file name")
            if not _exists_at(candidate, folder):
                return candidate
            number += 1

    # ---------------------------------------------------------------- the actions
    def move(self, source: Path, destination: PurePosixPath | str, expected: tuple[int, int] | None = None) -> Outcome:
        return self._act("move", source, destination, expected)

    def copy(self, source: Path, destination: PurePosixPath | str, expected: tuple[int, int] | None = None) -> Outcome:
        return self._act("copy", source, destination, expected)

    def link(self, source: Path, destination: PurePosixPath | str, expected: tuple[int, int] | None = None) -> Outcome:
        return self._act("link", source, destination, expected)

    def _act(self, op: str, source: Path, destination, expected) -> Outcome:
        source = Path(os.path.abspath(source))
        wanted = _check_relative(str(destination), "destination")
        checked = self._check_source(op, source, expected)
        if isinstance(checked, str):
            return Outcome(op, source, skipped=checked)
        source_stat, size, sha = checked
        folder_parts = wanted.parts[:-1]
        folder = self.folder_fd(folder_parts, create=False)
        name = self._free_name(folder, wanted.name) if folder is not None else wanted.name
        final = PurePosixPath(*folder_parts, name)
        temporary = PurePosixPath(*folder_parts, f".{name}.{secrets.token_hex(4)}.siglip-tmp")
        if len(os.fsencode(temporary.name)) > _MAX_NAME_BYTES:
            temporary = PurePosixPath(*folder_parts, f".{secrets.token_hex(8)}.siglip-tmp")
        step = self._next
        self._next += 1
        self.record(event="begin", step=step, op=op, source=str(source), destination=str(final),
                    temporary=str(temporary), size=size, sha256=sha)
        try:
            if folder is None:  # made after the record, so that undo knows to remove it
                folder = self.folder_fd(folder_parts)
            method = getattr(self, f"_{op}")(source, source_stat, folder, name, temporary.name, size, sha)
        except _Skip as skip:
            self.record(event="failed", step=step, reason=str(skip))
            return Outcome(op, source, skipped=str(skip))
        except OSError as exc:
            self.record(event="failed", step=step, reason=exc.strerror or str(exc))
            raise _cannot_write(self.root / final, exc) from None
        except OutputError as exc:
            self.record(event="failed", step=step, reason=str(exc))
            raise
        self.record(event="done", step=step, method=method)
        return Outcome(op, source, self.root / final, method)

    def _check_source(self, op: str, source: Path, expected) -> tuple[os.stat_result, int, str] | str:
        """(stat, size, sha256) of a source that is still what the caller listed, else why not."""
        try:
            before = os.stat(source, follow_symlinks=op != "move")
        except FileNotFoundError:
            return f"{source}: vanished since it was listed; skipped"
        except OSError as exc:
            return f"{source}: cannot read ({exc.strerror or exc}); skipped"
        if stat.S_ISLNK(before.st_mode):
            return f"{source}: is a symbolic link; not moved (move the file it points to)"
        if not stat.S_ISREG(before.st_mode):
            return f"{source}: is not a regular file; skipped"
        if expected is not None and (before.st_size, before.st_mtime_ns) != tuple(expected):
            return f"{source}: changed since it was listed; skipped"
        if op == "move" and not os.access(source.parent, os.W_OK):
            return f"{source}: its folder is read-only, so it cannot be moved; skipped"
        try:
            size, sha = file_digest(source, follow=op != "move")
            after = os.stat(source, follow_symlinks=op != "move")
        except OSError as exc:
            return f"{source}: cannot read ({exc.strerror or exc}); skipped"
        if (after.st_size, after.st_mtime_ns, after.st_ino) != (before.st_size, before.st_mtime_ns, before.st_ino) or size != after.st_size:
            return f"{source}: changed while being read; skipped"
        return after, size, sha

    def _copy_verified(self, source: Path, folder: int, name: str, temporary: str, size: int, sha: str) -> None:
        src_fd = os.open(source, os.O_RDONLY)
        try:
            copy_verified(src_fd, folder, name, temporary, size, sha, str(source))
        finally:
            os.close(src_fd)

    def _copy(self, source, source_stat, folder, name, temporary, size, sha) -> str:
        self._copy_verified(source, folder, name, temporary, size, sha)
        return "copy"

    def _move(self, source, source_stat, folder, name, temporary, size, sha) -> str:
        _unchanged(source, source_stat)
        try:
            os.link(source, name, dst_dir_fd=folder, follow_symlinks=False)
        except FileExistsError:
            raise _Skip(f"{source}: its destination name appeared meanwhile; skipped") from None
        except OSError as exc:
            if exc.errno not in _HARD_LINK_UNSUPPORTED:
                raise
            # another file system (or one without hard links): copy, verify, then delete
            self._copy_verified(source, folder, name, temporary, size, sha)
            _fsync(folder)
            _delete_source(source, lambda: os.unlink(name, dir_fd=folder))
            return "copy+delete"
        _fsync(folder)
        _delete_source(source, lambda: os.unlink(name, dir_fd=folder))
        return "rename"

    def _link(self, source, source_stat, folder, name, temporary, size, sha) -> str:
        try:
            os.link(source, name, dst_dir_fd=folder, follow_symlinks=True)
            method = "hardlink"
        except FileExistsError:
            raise _Skip(f"{source}: its destination name appeared meanwhile; skipped") from None
        except OSError as exc:
            if exc.errno not in _HARD_LINK_UNSUPPORTED:
                raise
            try:
                os.symlink(source, name, dir_fd=folder)
            except FileExistsError:
                raise _Skip(f"{source}: its destination name appeared meanwhile; skipped") from None
            method = "symlink"
        _fsync(folder)
        return method


def copy_verified(src_fd: int, folder: int, name: str, temporary: str, size: int, sha: str, what: str) -> None:
    """An open file -> a new temporary `temporary` in `folder` (O_EXCL|O_NOFOLLOW), with its mode
    and modification time, fsynced, verified against (size, sha), then linked in under `name`
    (never replacing anything). The temporary is gone afterwards, whatever happens."""
    tmp_fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=folder)
    try:
        source_stat = os.fstat(src_fd)
        _reserve(tmp_fd, size)
        _copy_into(src_fd, tmp_fd)
        os.fchmod(tmp_fd, stat.S_IMODE(source_stat.st_mode))
        os.utime(tmp_fd, ns=(source_stat.st_atime_ns, source_stat.st_mtime_ns))
        os.fsync(tmp_fd)
        if _hash_fd(tmp_fd) != (size, sha):
            raise _Skip(f"{what}: changed while being copied; skipped")
        _claim(temporary, name, folder)
    finally:
        os.close(tmp_fd)
        _unlink_quietly(temporary, folder)  # ours (made with O_EXCL); gone already after a rename
    _fsync(folder)


class _Skip(Exception):
    """One file cannot be handled (it changed, a name appeared); the journal says why and the run goes on."""


def _reserve(fd: int, size: int) -> None:
    """Claim the space first, so a full disk fails before the copy, not half-way."""
    if size > 0 and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise


def _claim(temporary: str, name: str, folder: int) -> None:
    """Give the finished temporary its final name without ever replacing an existing one."""
    try:
        os.link(temporary, name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
    except FileExistsError:
        raise _Skip(f"{name}: the name appeared while copying; skipped") from None
    except OSError as exc:
        if exc.errno not in _HARD_LINK_UNSUPPORTED:
            raise
        # A file system without hard links (FAT, some network shares): rename, after checking
        # the name is free (a small window that link() would have closed).
        if _exists_at(name, folder):
            raise _Skip(f"{name}: the name appeared while copying; skipped") from None
        os.rename(temporary, name, src_dir_fd=folder, dst_dir_fd=folder)


def _unlink_quietly(name: str, folder: int | None = None) -> None:
    try:
        os.unlink(name, dir_fd=folder)
    except FileNotFoundError:
        pass


def _unchanged(source: Path, planned: os.stat_result) -> None:
    now = os.stat(source, follow_symlinks=False)
    if (now.st_size, now.st_mtime_ns, now.st_ino) != (planned.st_size, planned.st_mtime_ns, planned.st_ino):
        raise _Skip(f"{source}: changed since it was read; skipped")


def _delete_source(source: Path, take_back) -> None:
    """The last step of a move: remove the source. If that fails, take the new name back so the
    file is in exactly one place, as before."""
    try:
        os.unlink(source)
    except OSError as exc:
        take_back()
        raise _Skip(f"{source}: cannot be removed from its folder ({exc.strerror or exc}); left where it was") from None
    _fsync_folder(source.parent)


# ============================================================================ undo
def undo(folder: Path, manifest: str = SORT_MANIFEST) -> list[UndoOutcome]:
    """Put back what the manifest in `folder` records, newest step first: moves go back to their
    sources, copies and links that still hold what was written are removed, anything changed
    since is left with a note. Each step is decided by what is on disk now, so this also
    finishes after a crash (of the run or of an earlier undo), and a second undo does nothing.
    Emptied folders under `folder` are removed; the manifest stays, recording the undo."""
    folder = Path(folder)
    if not (folder / manifest).exists() and not os.path.islink(folder / manifest):
        if not folder.is_dir():
            raise UsageError(f"{folder}: no such folder")
        raise UsageError(f"{folder}: holds no {manifest}, so there is nothing to undo")
    journal = Journal(folder, manifest, command="undo")
    journal.open(create=False)
    outcomes: list[UndoOutcome] = []
    try:
        steps = read_manifest(journal.manifest)
        pending = [step for step in reversed(steps) if not step.undone]
        if pending:
            journal.start_run(undo=True)
        for step in pending:
            outcome = _undo_step(journal, step)
            journal.record(event="undone", step=step.number, result=outcome.result, note=outcome.note)
            outcomes.append(outcome)
        _remove_empty_folders(journal, steps)
    finally:
        journal.close()
    return outcomes


def _undo_step(journal: Journal, step: Step) -> UndoOutcome:
    where = journal.root / step.destination

    def result(kind: str, note: str = "") -> UndoOutcome:
        return UndoOutcome(step.op, step.source, where, kind, note)

    if step.finished == "failed":
        return result("nothing", "the step had failed; nothing was changed then")
    try:
        folder = journal.folder_fd(step.destination.parts[:-1], create=False)
    except OutputError as exc:
        return result("kept", str(exc))
    if folder is None:
        return result("nothing", "not there (already undone or removed)")
    if step.finished is None and step.temporary is not None:
        _unlink_quietly(step.temporary.name, folder)  # a crash mid-copy left our temporary
    name = step.destination.name
    try:
        here = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        here = None
    if step.op == "move":
        return _undo_move(journal, step, folder, name, here, result)
    if here is None:
        return result("nothing", "not there (already undone or removed)")
    if step.op == "link" and stat.S_ISLNK(here.st_mode):
        if os.readlink(name, dir_fd=folder) == str(step.source):
            os.unlink(name, dir_fd=folder)
            return result("removed")
        return result("kept", "a symbolic link that points elsewhere now")
    if not stat.S_ISREG(here.st_mode):
        return result("kept", "no longer the file siglip wrote")
    if step.op == "link" and _same_file(here, step.source):
        os.unlink(name, dir_fd=folder)
        return result("removed")
    if file_digest(name, folder, follow=False) == (step.size, step.sha256):
        os.unlink(name, dir_fd=folder)
        return result("removed")
    return result("kept", "changed since siglip wrote it")


def _same_file(here: os.stat_result, path: Path) -> bool:
    try:
        there = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino)


def _undo_move(journal: Journal, step: Step, folder: int, name: str, here, result) -> UndoOutcome:
    source = step.source
    if step.undo_temporary:
        _unlink_quietly(str(source.parent / step.undo_temporary))  # a crash mid-way back left it
    source_there = os.path.lexists(source)
    if here is None:
        return result("nothing", "" if source_there else "neither the file nor its copy is there")
    if not stat.S_ISREG(here.st_mode):
        return result("kept", "no longer the file siglip moved")
    if source_there:
        # Both names exist: a crash between placing the file and removing the source (forward,
        # or on an earlier way back). Ours goes only if it is the very same file or the same bytes.
        if _same_file(here, source):
            os.unlink(name, dir_fd=folder)
            return result("restored")
        digest = file_digest(name, folder, follow=False)
        try:
            original = file_digest(source, follow=False)
        except OSError:
            original = None
        if digest == original:
            os.unlink(name, dir_fd=folder)
            return result("restored")
        return result("kept", f"{source} exists again with other content; both left as they are")
    note = "" if file_digest(name, folder, follow=False) == (step.size, step.sha256) else "changed since it was moved; put back as it is now"
    try:
        os.makedirs(source.parent, exist_ok=True)
    except OSError as exc:
        return result("kept", f"cannot recreate {source.parent} ({exc.strerror or exc})")
    try:
        os.link(name, source, src_dir_fd=folder, follow_symlinks=False)
    except FileExistsError:
        return result("kept", f"{source} appeared meanwhile; both left as they are")
    except OSError as exc:
        if exc.errno not in _HARD_LINK_UNSUPPORTED:
            return result("kept", f"cannot put it back ({exc.strerror or exc})")
        moved = _copy_back(journal, step, folder, name, result)
        if moved is not None:
            return moved
    _fsync_folder(source.parent)
    os.unlink(name, dir_fd=folder)
    _fsync(folder)
    return result("restored", note)


def _copy_back(journal: Journal, step: Step, folder: int, name: str, result) -> UndoOutcome | None:
    """Across file systems: a verified copy beside the source, linked in; None when done."""
    temporary = f".{step.source.name}.{secrets.token_hex(4)}.siglip-tmp"
    if len(os.fsencode(temporary)) > _MAX_NAME_BYTES:
        temporary = f".{secrets.token_hex(8)}.siglip-tmp"
    journal.record(event="undo-begin", step=step.number, temporary=temporary)
    src_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=folder)
    try:
        size, sha = _hash_fd(src_fd)
        back_fd = os.open(step.source.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            copy_verified(src_fd, back_fd, step.source.name, temporary, size, sha, str(journal.root / step.destination))
        finally:
            os.close(back_fd)
    except _Skip as skip:
        return result("kept", str(skip))
    except OSError as exc:
        raise _cannot_write(step.source, exc) from None
    finally:
        os.close(src_fd)
    return None


def _remove_empty_folders(journal: Journal, steps: list[Step]) -> None:
    """Folders under the root that the steps wrote into, deepest first, if empty now (rmdir
    refuses a folder that holds anything, so nothing of anyone's can go)."""
    folders = {step.destination.parts[:-1] for step in steps}
    every = {parts[:depth] for parts in folders for depth in range(1, len(parts) + 1)}
    for parts in sorted(every, key=len, reverse=True):
        fd = journal._folders.pop(parts, None)
        _close(fd)
        parent = journal.folder_fd(parts[:-1], create=False) if len(parts) > 1 else journal._root_fd
        if parent is None:
            continue
        try:
            os.rmdir(parts[-1], dir_fd=parent)
        except OSError:
            pass


def undo_summary(outcomes: list[UndoOutcome]) -> str:
    counts = {kind: sum(1 for o in outcomes if o.result == kind) for kind in ("restored", "removed", "kept")}
    if not outcomes:
        return "nothing to undo (everything recorded was undone already)"
    return f"undo: {counts['restored']} moved back, {counts['removed']} copies or links removed, {counts['kept']} left in place"


# ============================================================================ files edited in place: XMP sidecars
XMP_MANIFEST = "siglip-xmp.jsonl"
SAVED_FOLDER = ".siglip-xmp-previous"  # each replaced sidecar's bytes, named by their sha256; a dot, so never a label folder


@dataclass
class SidecarStep:
    """One sidecar write as its `begin` record states it: the file, what it held before (nothing,
    or `previous_size` bytes with `previous_sha256`, kept in the journal under that digest, and
    its permission bits) and what we were about to write (`size`, `sha256`)."""

    number: int
    path: Path
    existed: bool
    previous_size: int | None
    previous_sha256: str | None
    mode: int | None
    size: int
    sha256: str
    finished: str | None = None
    method: str = ""
    undone: bool = False
    undo_temporary: str | None = None


def _sidecar_step_from(record: dict, number: int) -> SidecarStep:
    if record["op"] != "xmp":
        raise ValueError(f"unknown op {record['op']!r}")
    path = record["path"]
    # undo writes and removes only files named *.xmp, wherever a hand-edited journal points
    if not isinstance(path, str) or not os.path.isabs(path) or "\x00" in path or not path.lower().endswith(".xmp"):
        raise ValueError(f"path {path!r} is not an absolute path to an .xmp file")
    existed = record["existed"]
    if not isinstance(existed, bool):
        raise ValueError("bad existed")
    size, sha = _checked_digest(record["size"], record["sha256"])
    previous_size = previous_sha = mode = None
    if existed:
        previous_size, previous_sha = _checked_digest(record["previous_size"], record["previous_sha256"])
        mode = record["mode"]
        if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
            raise ValueError("bad mode")
    return SidecarStep(number, Path(path), existed, previous_size, previous_sha, mode, size, sha)


def default_state_dir() -> Path:
    """Where siglip keeps what it must find again (the XMP journals): $SIGLIP_STATE_DIR, else
    $XDG_STATE_HOME/siglip-cli, else ~/.local/state/siglip-cli (named like the cache dir)."""
    if os.environ.get("SIGLIP_STATE_DIR"):
        return Path(os.environ["SIGLIP_STATE_DIR"]).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "siglip-cli"


def new_sidecar_journal_folder() -> Path:
    """A new, empty folder for one --write-xmp run's journal: <state dir>/xmp/<UTC time>-<pid>/
    (private: it keeps copies of the sidecars it replaces)."""
    parent = default_state_dir() / "xmp"
    stamp = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"
    try:
        os.makedirs(parent, 0o700, exist_ok=True)
        for number in range(1, 100):
            folder = parent / (stamp if number == 1 else f"{stamp}-{number}")
            try:
                os.mkdir(folder, 0o700)
                return folder
            except FileExistsError:
                continue
    except OSError as exc:
        raise _cannot_write(parent, exc) from None
    raise OutputError(f"{parent}: no free name for a new journal folder")


class SidecarJournal(Journal):
    """Rewrites of files that live beside the user's images, in many folders (XMP sidecars),
    recorded in `folder/siglip-xmp.jsonl`, a folder of their own. Before each write the journal
    holds a verified copy of the bytes it replaces (`folder/.siglip-xmp-previous/<sha256>`) and a `begin`
    record (path, whether it existed, the previous size, sha256 and permissions, the new size and
    sha256), fsynced; the write itself is atomic (temporary beside, fsync, rename); `done` follows
    with the new sha256. So `undo_sidecars` can put every sidecar back byte for byte, also after
    a SIGKILL at any point."""

    make_step = staticmethod(_sidecar_step_from)

    def __init__(self, folder: Path, command: str = "siglip classify --write-xmp"):
        super().__init__(folder, XMP_MANIFEST, command)

    def replace(self, path: Path, previous: bytes | None, mode: int | None, new: bytes) -> Outcome:
        """Write `new` at `path`, which held `previous` (None: nothing) with permissions `mode`.
        A per-file problem (the sidecar changed meanwhile, a read-only folder) comes back as a
        skipped Outcome; one with the journal itself raises OutputError before the sidecar is
        touched."""
        from .safefiles import bytes_temporary, replace_into_place

        path = Path(os.path.abspath(path))
        size, sha = len(new), hashlib.sha256(new).hexdigest()
        about = {"existed": previous is not None}
        if previous is not None:
            about.update(previous_size=len(previous), previous_sha256=self._save(previous), mode=mode)
        step = self._next
        self._next += 1
        self.record(event="begin", step=step, op="xmp", path=str(path), size=size, sha256=sha, **about)
        if _digest_now(path) != ((len(previous), about["previous_sha256"]) if previous is not None else None):
            why = f"{path}: changed while being tagged; left as it is"
            self.record(event="failed", step=step, reason=why)
            return Outcome("xmp", path, skipped=why)
        try:
            tmp = bytes_temporary(path, new)
            if mode is not None:
                os.chmod(tmp, mode)
            replace_into_place(tmp, path)
        except OSError as exc:
            self.record(event="failed", step=step, reason=exc.strerror or str(exc))
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                why = f"{path}: cannot write the sidecar ({exc.strerror}); the folder is read-only"
                return Outcome("xmp", path, skipped=why)
            raise _cannot_write(path, exc) from None
        method = "merged" if previous is not None else "new"
        self.record(event="done", step=step, sha256=sha, method=method)
        return Outcome("xmp", path, path, method)

    def _save(self, data: bytes) -> str:
        """Keep `data` as SAVED_FOLDER/<its sha256> in the journal, verified by reading it back; an
        identical copy already there is reused. Returns the sha256."""
        sha = hashlib.sha256(data).hexdigest()
        folder = self.folder_fd((SAVED_FOLDER,))
        where = self.root / SAVED_FOLDER / sha
        try:
            if _exists_at(sha, folder):
                if file_digest(sha, folder, follow=False) == (len(data), sha):
                    return sha
                os.unlink(sha, dir_fd=folder)  # a damaged copy of ours: made again below
            temporary = f".{sha}.{secrets.token_hex(4)}.siglip-tmp"
            fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=folder)
            try:
                _reserve(fd, len(data))
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
                if _hash_fd(fd) != (len(data), sha):
                    raise OutputError(f"{where}: the copy of a sidecar read back differently; the journal's disk is failing")
                _claim(temporary, sha, folder)
            finally:
                os.close(fd)
                _unlink_quietly(temporary, folder)
        except _Skip:  # another copy of the same bytes took the name meanwhile
            pass
        except OSError as exc:
            raise _cannot_write(where, exc) from None
        _fsync(folder)
        return sha

    def saved(self, sha: str) -> bytes | None:
        """The journal's copy of the bytes with this sha256, or None when missing or damaged."""
        folder = self.folder_fd((SAVED_FOLDER,), create=False)
        if folder is None:
            return None
        try:
            fd = os.open(sha, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=folder)
        except OSError:
            return None
        try:
            with os.fdopen(fd, "rb") as fh:
                data = fh.read()
        except OSError:
            return None
        return data if hashlib.sha256(data).hexdigest() == sha else None


def _digest_now(path: Path) -> tuple[int, str] | None | str:
    """(size, sha256) of the regular file at `path`, None when there is none, or a word for what
    is there instead (a symbolic link, a folder...)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if not stat.S_ISREG(info.st_mode):
        return "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
    try:
        return file_digest(path, follow=False)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"


def is_sidecar_journal(folder: Path) -> bool:
    return os.path.lexists(Path(folder) / XMP_MANIFEST)


def undo_sidecars(folder: Path) -> list[UndoOutcome]:
    """Put back what the sidecar journal in `folder` records, newest step first: a sidecar that
    still holds what we wrote gets its previous bytes back (atomically, with its permissions), or
    is removed when we created it; one changed since by anyone else is left with a note. Decided
    by what is on disk, so it also finishes after a SIGKILL, and a second undo does nothing. The
    journal and its copies stay, recording the undo."""
    from .safefiles import remove_stale_temporaries

    folder = Path(folder)
    if not is_sidecar_journal(folder):
        if not folder.is_dir():
            raise UsageError(f"{folder}: no such folder")
        raise UsageError(f"{folder}: holds no {XMP_MANIFEST}, so there is nothing to undo")
    journal = SidecarJournal(folder, command="undo")
    journal.open(create=False)
    outcomes: list[UndoOutcome] = []
    try:
        steps = read_manifest(journal.manifest, _sidecar_step_from)
        pending = [step for step in reversed(steps) if not step.undone]
        if pending:
            journal.start_run(undo=True)
        # a run killed between making a temporary and renaming it left that temporary beside the sidecar
        remove_stale_temporaries(step.path for step in pending if step.finished is None)
        for step in pending:
            outcome = _undo_sidecar(journal, step)
            journal.record(event="undone", step=step.number, result=outcome.result, note=outcome.note)
            outcomes.append(outcome)
    finally:
        journal.close()
    return outcomes


def _undo_sidecar(journal: SidecarJournal, step: SidecarStep) -> UndoOutcome:
    from .safefiles import bytes_temporary, fsync_directory, replace_into_place

    def result(kind: str, note: str = "") -> UndoOutcome:
        return UndoOutcome("xmp", step.path, step.path, kind, note)

    if step.finished == "failed":
        return result("nothing", "the step had failed; nothing was changed then")
    now = _digest_now(step.path)
    if isinstance(now, str):
        return result("kept", f"now {now}, not the file siglip wrote")
    if now is None:
        if step.existed:
            return result("kept", "removed since siglip wrote it; not recreated")
        return result("nothing", "not there (never written, or already undone)")
    if now != (step.size, step.sha256):
        if step.existed and now == (step.previous_size, step.previous_sha256):
            return result("nothing", "holds what it held before (never written, or already undone)")
        return result("kept", "changed since siglip wrote it")
    if not step.existed:
        os.unlink(step.path)
        fsync_directory(step.path.parent)
        return result("removed")
    previous = journal.saved(step.previous_sha256)
    if previous is None:
        return result("kept", f"the journal's copy of what it held before ({SAVED_FOLDER}/{step.previous_sha256}) is missing or damaged")
    try:
        tmp = bytes_temporary(step.path, previous)
        os.chmod(tmp, step.mode)
        replace_into_place(tmp, step.path)
    except OSError as exc:
        return result("kept", f"cannot write it back ({exc.strerror or exc})")
    return result("restored")


def undo_sidecars_summary(outcomes: list[UndoOutcome]) -> str:
    if not outcomes:
        return "nothing to undo (everything recorded was undone already)"
    counts = {kind: sum(1 for o in outcomes if o.result == kind) for kind in ("restored", "removed", "kept")}
    return (f"undo: {counts['restored']} sidecars given back what they held before, {counts['removed']} that siglip "
            f"created removed, {counts['kept']} changed since and left in place")
