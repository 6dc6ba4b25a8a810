"""Errors a user can fix. `cli.py` prints their message as one line and exits with `exit_code`.

Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class SiglipError(Exception):
    """A problem with the user's input, environment or model; the message names what and why."""

    exit_code = 1


class UsageError(SiglipError):
    """Bad flags or arguments (exit 2, like every Unix tool)."""

    exit_code = 2


class ModelUnavailable(SiglipError):
    """The model cannot be found, downloaded or read."""

    exit_code = 3


class BackendUnavailable(SiglipError):
    """The requested device, dtype or attention backend cannot run here."""

    exit_code = 4


class InputError(SiglipError):
    """One input (image, text file, folder) cannot be read; batch commands record it and go on."""

    exit_code = 1
