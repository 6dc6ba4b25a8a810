"""How stores name files and models: by absolute paths, so that a store reads the same from any
folder (`embed --update` from a cron job, `search` from wherever the user is).

Absolute, normalised, and NOT resolved through symbolic links: a name stays the one the user
sees (as `ls`, `find` and rclip show it). Stores written before names were absolute hold them
relative to the folder `embed` ran in; `stored_model` and `embedding.settle_stored_paths` read
those against a folder. Tables show names relative to the working folder (render.display_path);
JSON keeps them exact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .urls import is_url


def is_local_path(value: Any) -> bool:
    """A file named by a path (not a URL, nor an in-memory image of the Python API)."""
    return isinstance(value, str) and not is_url(value)


def is_relative_name(name: str) -> bool:
    """A stored file name that depends on the folder it was written from (older stores). Called
    for every row of a store: the common case, an absolute path, is answered first."""
    return not name.startswith(os.sep) and is_local_path(name) and not os.path.isabs(name)


def absolute_name(path: str, folder: str | os.PathLike | None = None) -> str:
    """`path` made absolute against `folder` (default: the working folder) and normalised
    (`a/./b`, `a//b` and `a/x/../b` -> `a/b`, as `cd` reads them), without following symbolic
    links: resolving them would rename a photo reached through a linked folder to a target the
    user never typed, and lose it when the link is pointed elsewhere."""
    path = os.path.expanduser(path)
    if folder is None:
        return os.path.abspath(path)
    return os.path.normpath(os.path.join(os.path.abspath(os.path.expanduser(folder)), path))


def recorded_model(name: str) -> str:
    """How a store records its model: a local checkpoint folder by its absolute path, a hub id
    as it is."""
    return absolute_name(name) if os.path.isdir(os.path.expanduser(name)) else name


def stored_model(meta: dict, store_path: Path, folders: tuple = ()) -> str | None:
    """The model a store's meta names, found from here: an older store may name a local folder
    relative to the folder `embed` ran in; it is looked for under `folders`, then beside the
    store. Returns the name as recorded when no such folder is found (a hub id, or a model that
    is not here: the caller's error says so)."""
    name = meta.get("model")
    if not isinstance(name, str) or not is_relative_name(name) or os.path.isdir(name):
        return name
    for folder in [*folders, store_path.parent]:
        candidate = absolute_name(name, folder)
        if os.path.isdir(candidate):
            return candidate
    return name
