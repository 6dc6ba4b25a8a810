"""Safe file primitives: the one place where siglip creates, replaces, locks and reads its own files.

Outputs often live in shared folders (the Ray docs recommend one), where anyone may plant a
symbolic link, a FIFO or a hard link where siglip is about to write or read. Every file siglip
creates or replaces beside an output (the lock, temporaries, sidecars, `<out>.partial/` and its
contents, the label cache, Ray shards) goes through this module, which guarantees:

- **Never follow a planted link when creating.** New files are opened with
  `O_CREAT | O_EXCL | O_NOFOLLOW` (temporaries) or `O_CREAT | O_NOFOLLOW` (the lock, append
  files), then `fstat`-checked: a regular file, owned by us. A symlink at a destination that
  `atomic_write_*` replaces is itself replaced by `os.replace` (rename never follows it).
- **Never hang on a FIFO, device or socket.** Files are opened non-blocking and `fstat`-checked
  before a byte is read; anything but a regular file is refused with an `OSError` whose message
  says what it is (callers turn it into their usual one-line error).
- **Atomic replacement.** Data goes to a temporary beside the destination (same filesystem),
  is flushed and fsynced, renamed over the destination, and the folder is fsynced: a reader sees
  the old file or the new one, whole; a crash or a full disk leaves the old one.
- **Stale temporaries are ours to clean.** Temporaries are named `.<name>.<8 characters>.tmp`, so
  a later run holding the output's lock can remove exactly the ones a killed run left.
- **Never unlink what is not ours.** The lock is removed on release only while the name still
  refers to the file we locked.

Everything here raises OSError (or an OutputError/UsageError for the lock, whose message is
already user-facing); the callers add the file's role to the message.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import stat
import string
import time
from pathlib import Path
from typing import BinaryIO, Iterable

from .core.errors import OutputError, UsageError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_TEMP_LETTERS = string.ascii_lowercase + string.digits + "_"
_TEMP_LENGTH = 8


class NotRegularFile(OSError):
    """A path that should be a plain file is a FIFO, device, socket, folder or symbolic link, or a
    file owned by someone else. Its `strerror` says which, in words."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"


def _refuse(path, why: str) -> NotRegularFile:
    return NotRegularFile(errno.EINVAL, why, str(path))


def _check_regular(fd: int, path, owned: bool) -> os.stat_result:
    """fstat `fd`: a regular file (and, with `owned`, ours) or it is closed and refused."""
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = f"is {_kind(info.st_mode)}, not a regular file"
    elif owned and hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        problem = f"is owned by another user (uid {info.st_uid}), not by us"
    if problem:
        os.close(fd)
        raise _refuse(path, problem)
    return info


def _open_checked(path, flags: int, mode: int = 0o666, owned: bool = False) -> int:
    """os.open with `flags`, translating ELOOP from O_NOFOLLOW into a plain refusal."""
    try:
        fd = os.open(path, flags | _CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP and flags & _NOFOLLOW:
            raise _refuse(path, "is a symbolic link; refusing to follow it") from None
        if exc.errno == errno.ENXIO:  # O_WRONLY|O_NONBLOCK on a FIFO without a reader
            raise _refuse(path, "is a FIFO, not a regular file") from None
        raise
    _check_regular(fd, path, owned)
    return fd


# ============================================================================ reading
def open_regular(path: str | os.PathLike, follow_symlinks: bool = True) -> BinaryIO:
    """Open one of OUR files (a sidecar, a meta, a label-cache entry, a partial folder's state)
    for reading in binary. Non-blocking open then fstat: a FIFO, device, socket or folder is
    refused at once with NotRegularFile instead of blocking forever; with
    `follow_symlinks=False` a symbolic link is refused too. The returned file blocks as usual."""
    flags = os.O_RDONLY | _NONBLOCK | (0 if follow_symlinks else _NOFOLLOW)
    fd = _open_checked(path, flags)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: str | os.PathLike, follow_symlinks: bool = True) -> bytes:
    """The whole content of `path`, with `open_regular`'s checks."""
    with open_regular(path, follow_symlinks) as fh:
        return fh.read()


# ============================================================================ creating
def make_directory(path: str | os.PathLike) -> Path:
    """Create the folder `path` (mode 0o777 minus the umask), or accept an existing one that is
    really a folder owned by us. A symbolic link (even to a folder), a file or someone else's
    folder in its place is refused with NotRegularFile: files we write inside it would land
    wherever the link points."""
    path = Path(path)
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise _refuse(path, "is a symbolic link; refusing to write through it")
    if not stat.S_ISDIR(info.st_mode):
        raise _refuse(path, f"is {_kind(info.st_mode)}, not a folder")
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        raise _refuse(path, f"is owned by another user (uid {info.st_uid}), not by us")
    return path


def is_real_directory(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder itself, not a symbolic link to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def open_append(path: str | os.PathLike) -> BinaryIO:
    """Open (creating it if needed) one of our files for appending, binary. A symbolic link, a
    FIFO or anything else but our own regular file at `path` is refused with NotRegularFile."""
    fd = _open_checked(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _NONBLOCK, 0o666, owned=True)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "ab")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temporary_name(path: Path) -> Path:
    suffix = "".join(secrets.choice(_TEMP_LETTERS) for _ in range(_TEMP_LENGTH))
    return path.with_name(f".{path.name}.{suffix}.tmp")


def _create_temporary(path: Path) -> tuple[int, str]:
    for _ in range(100):
        tmp = _temporary_name(path)
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
        except FileExistsError:
            continue
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # the permissions a plain open() would give
        except OSError:
            os.close(fd)
            remove_file(tmp)
            raise
        return fd, str(tmp)
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def temporary_beside(path: str | os.PathLike) -> str:
    """A new, empty file `.<name>.<random>.tmp` next to `path` (same filesystem, so os.replace
    is atomic), created with O_EXCL|O_NOFOLLOW (never an existing file or a planted link),
    with the permissions a plain open() would give it. Returns its name; the caller writes it
    (a plain open(tmp, "wb") is then safe: the name is ours) and renames or removes it."""
    fd, tmp = _create_temporary(Path(path))
    os.close(fd)
    return tmp


def reserve_space(fh, size: int) -> None:
    """Claim the disk space a file will need before writing it, so a full disk fails at once
    with ENOSPC instead of half-way (or, through a memory map, with SIGBUS)."""
    if size > 0 and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fh.fileno(), 0, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            # EINVAL/EOPNOTSUPP: the filesystem cannot reserve; plain writes still fail cleanly


def bytes_temporary(path: str | os.PathLike, data: bytes) -> str:
    """`data` written, flushed and fsynced in a new temporary beside `path`; returns its name.
    On any failure the temporary is removed."""
    fd, tmp = _create_temporary(Path(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            reserve_space(fh, len(data))
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        remove_file(tmp)
        raise
    return tmp


def text_temporary(path: str | os.PathLike, text: str) -> str:
    """`text` (UTF-8; undecodable file names round-trip through surrogateescape) written and
    fsynced in a new temporary beside `path`; returns its name."""
    return bytes_temporary(path, text.encode("utf-8", "surrogateescape"))


def replace_into_place(tmp: str, path: str | os.PathLike) -> None:
    """Rename `tmp` over `path` (a symbolic link at `path` is replaced, never followed) and
    fsync the folder; on failure `tmp` is removed."""
    try:
        os.replace(tmp, path)
    except BaseException:
        remove_file(tmp)
        raise
    fsync_directory(Path(path).parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` atomically: temporary beside, fsync, os.replace, fsync the
    folder. Readers see the old content or the new, whole; a crash or a full disk keeps the old;
    a symbolic link planted at `path` is replaced by the file, its target untouched."""
    replace_into_place(bytes_temporary(path, data), path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write_bytes` of `text` in UTF-8 (surrogateescape)."""
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))


def fsync_directory(folder: str | os.PathLike) -> None:
    """Make a rename in `folder` durable (best effort: some filesystems cannot)."""
    try:
        fd = os.open(folder, os.O_RDONLY | _CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_file(path) -> None:
    """Unlink `path` if it is there (never follows a link: unlink removes the link itself)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def _temporary_pattern(path: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(path.name)}\.[{re.escape(_TEMP_LETTERS)}]{{{_TEMP_LENGTH}}}\.tmp")


def remove_stale_temporaries(files: Iterable[str | os.PathLike]) -> list[tuple[Path, int]]:
    """Remove the temporaries that a killed run left beside `files` (an output's files), and
    return (path, size) of each one removed. Call it only while holding the output's lock: then
    no live run is writing any of them. Only our own regular files named exactly like our
    temporaries are removed; links, folders and other users' files are left alone."""
    removed: list[tuple[Path, int]] = []
    by_folder: dict[Path, list[re.Pattern]] = {}
    for file in files:
        file = Path(file)
        by_folder.setdefault(file.parent, []).append(_temporary_pattern(file))
    for folder, patterns in by_folder.items():
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            if not name.endswith(".tmp") or not any(p.fullmatch(name) for p in patterns):
                continue
            candidate = folder / name
            try:
                info = os.lstat(candidate)
            except OSError:
                continue
            if not stat.S_ISREG(info.st_mode) or (hasattr(os, "geteuid") and info.st_uid != os.geteuid()):
                continue
            try:
                os.unlink(candidate)
            except OSError:
                continue
            removed.append((candidate, info.st_size))
    return removed


# ============================================================================ the lock
def cannot_write(path, exc: OSError) -> OutputError:
    """One line for a failed write of `path`: a full disk and a quota say so, and that finished
    rows are kept."""
    if exc.errno == errno.ENOSPC:
        return OutputError(f"{path}: no space left on the device; free some space and run again (with --resume to keep finished rows)")
    if exc.errno == errno.EDQUOT:
        return OutputError(f"{path}: disk quota exceeded; free some space and run again (with --resume to keep finished rows)")
    return OutputError(f"{path}: cannot write ({exc.strerror or exc})")


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


class OutputLock:
    """An exclusive lock on an output, held for a whole run: `.<name>.lock` beside it holds an
    `fcntl` lock and the owner's pid. The lock goes with the process on any exit (even SIGKILL);
    the file is removed on a clean release.

    The lock file is opened with O_NOFOLLOW|O_CREAT and must be a regular file owned by us: a
    symbolic link planted at its name is refused (its target is never written, the link never
    removed), as are a FIFO and another user's file (a hard link to a victim's file)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = lock_path(self.out)
        self._fd: int | None = None

    def _open(self) -> int:
        try:
            return _open_checked(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _NONBLOCK, 0o644, owned=True)
        except NotRegularFile as exc:
            raise UsageError(f"--out {self.out}: the lock file {self.path} {exc.strerror}; remove it and run again") from None
        except OSError as exc:
            raise cannot_write(self.path, exc) from None

    def acquire(self) -> "OutputLock":
        while True:
            fd = self._open()
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
            if self._names_our_file(fd):
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        except OSError as exc:
            os.close(fd)
            raise cannot_write(self.path, exc) from None
        self._fd = fd
        return self

    def _names_our_file(self, fd: int) -> bool:
        try:
            mine, there = os.fstat(fd), os.lstat(self.path)
        except FileNotFoundError:
            return False
        return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)

    def release(self) -> None:
        if self._fd is None:
            return
        # Removed while still holding the lock (a waiting run then retries on a new file), and
        # only while the name is still our file: never someone's link planted since.
        if self._names_our_file(self._fd):
            remove_file(self.path)
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
        return f"pid {int(owner['pid'])}, started {str(owner['started'])[:19]}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
