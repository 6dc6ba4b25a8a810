"""`siglip info INDEX`: what an index holds and how it was made, without loading the model.

Everything comes from the store as `store.open_store` reads it back (its parts checked against
each other, so a damaged index is the same one-line error as in `search`) and from its files'
sizes on disk.
"""

from __future__ import annotations

from pathlib import Path

from ..paths import is_local_path, is_relative_name
from ..results import IndexInfo, StoreFile
from ..store import open_store, output_files


def index_info(index: Path) -> IndexInfo:
    store = open_store(index)
    meta = store.meta
    files = [StoreFile(str(path), path.stat().st_size) for path in output_files(index) if path.is_file()]
    partial = index.with_name(index.name + ".partial")
    skipped = meta.get("skipped") or []
    return IndexInfo(
        path=str(index),
        format=index.suffix.lstrip("."),
        files=files,
        bytes=sum(f.bytes for f in files),
        model=meta.get("model"),
        revision=meta.get("revision"),
        model_dtype=meta.get("model_dtype"),
        decode=meta.get("decode", "exact" if meta.get("model_dtype") else None),  # before --decode: exact
        max_patches=meta.get("max_patches"),
        normalized=meta.get("normalized"),
        templates=list(meta.get("templates") or []),
        image_rows=store.image_count,
        text_rows=store.count - store.image_count,
        dim=store.dim,
        dtype=meta["dtype"],
        paths=path_style(store.names_at(range(store.image_count))),
        skipped=[s for s in skipped if isinstance(s, dict)],
        created=meta.get("created"),
        partial=str(partial) if partial.is_dir() else None,
    )


def path_style(names: list[str]) -> str:
    """How image rows name their files: absolute (stores since paths were made absolute),
    relative (older stores: relative to the folder embed ran in), mixed, or none (no files:
    URLs only, or no image rows)."""
    files = [name for name in names if is_local_path(name)]
    relative = sum(1 for name in files if is_relative_name(name))
    if not files:
        return "none"
    return "relative" if relative == len(files) else "mixed" if relative else "absolute"
