"""Problems a user can fix. The message names the input and the cause, in one line.

The core raises them; the command line maps each kind to an exit code (`cli/app.py`).
Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class SiglipError(Exception):
    """A problem with the user's input, environment or model; the message names what and why."""


class UsageError(SiglipError):
    """A bad argument or option value."""


class ModelUnavailable(SiglipError):
    """The model cannot be found, downloaded or read, or its files are inconsistent."""


class BackendUnavailable(SiglipError):
    """The requested device, dtype or attention backend cannot run here."""


class InputError(SiglipError):
    """One input (image, text file, folder) cannot be read; batch commands record it and go on."""


class OutputError(SiglipError):
    """An output cannot be written (permissions, a full disk) or read back (damaged, mismatched)."""


def cannot_read(name: str, exc: OSError, what: str = "an image") -> str:
    """One line saying why `name` could not be opened, from the OSError that said so."""
    if isinstance(exc, FileNotFoundError):
        return f"{name}: no such file"
    if isinstance(exc, IsADirectoryError):
        return f"{name}: is a folder, not {what}"
    if isinstance(exc, PermissionError):
        return f"{name}: permission denied"
    return f"{name}: cannot read ({exc.strerror or exc})"
