"""Embedding runs: a plan of inputs, the rows the model computes for it, and the store that
keeps them. Used by `siglip embed` (plain, `--resume`, `--update`) and by the Ray engine.

The three parts are separate on purpose:
- `EmbedPlan`: what the final store will hold, in order (images as listed, then texts), and a
  digest of it, so `--resume` continues only the same run.
- `EmbedRun.embed()`: the compute, appending finished rows to the partial state batch by batch.
  Rows already there (a resumed run) or unchanged in the previous store (`--update`) are not
  computed again; a file whose size or modification time changed is.
- `EmbedRun.finish()`: the final files, assembled in plan order and committed atomically.

A video is one input that gives many rows, one per sampled frame (`clip.mp4#t=12.5`, with its
time): it is planned, stamped, kept by --update and redone by --resume as one file. A video
whose decoding failed part way keeps the frames before the fault, and is listed as skipped.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .core.errors import UsageError
from .core.video import is_video_name
from .paths import absolute_name, is_local_path, is_relative_name, recorded_model
from .sources import Failure, Listing, Source
from .store import (
    NO_STAMP,
    Entry,
    PartialRows,
    Store,
    has_line_break,
    record_stamp,
    remove_partial,
    write_store,
)


@dataclass
class EmbedPlan:
    images: list[Source]
    texts: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)  # inputs that failed while listing

    @classmethod
    def from_listing(cls, listing: Listing, texts: Sequence[str] = ()) -> "EmbedPlan":
        """The plan of a listing, every file named by its absolute path (see `absolute_name`)."""
        images = [replace(s, name=absolute_name(s.value)) if is_local_path(s.value) else s for s in listing.sources]
        failures = [replace(f, name=absolute_name(f.name)) if is_local_path(f.name) else f for f in listing.failures]
        return cls(images, list(texts), failures)

    def digest(self) -> str:
        """Identity of the ordered inputs: a resumed run must continue exactly this list."""
        names = [s.name for s in self.images] + ["\0texts"] + list(self.texts)
        return hashlib.sha256("\0".join(names).encode("utf-8", "surrogateescape")).hexdigest()


def file_hash(path: str) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.digest()


def stamp_of(source: Source, with_hash: bool) -> tuple:
    """(size, mtime_ns, sha256) of a listed file; no stamp for URLs and in-memory images."""
    if source.stamp is None:
        return NO_STAMP
    size, mtime = source.stamp
    return (size, mtime, file_hash(source.value) if with_hash else b"")


def same_file(old: tuple, new: tuple) -> bool:
    """Whether a row made from a file with stamp `old` still stands for the file as it is now:
    by content hash when both have one, else by size and modification time. URLs never match
    (their content cannot be checked), so they are fetched again."""
    if old[0] < 0 or new[0] < 0:
        return False
    if old[2] and new[2]:
        return old[2] == new[2]
    return tuple(old[:2]) == tuple(new[:2])


def kept_stamp(old, new: tuple) -> tuple:
    """The stamp of a row kept from the previous store: the file as it is now (an update by
    hash keeps a row whose file was only touched, and must not see it as changed next time),
    with the old content hash when no new one was computed (same size and time, same file)."""
    old = tuple(old.tolist()) if hasattr(old, "tolist") else tuple(old)
    if new[0] < 0:
        return old
    return (new[0], new[1], new[2] or old[2])


@dataclass
class EmbedSummary:
    meta: dict
    computed: int  # image rows computed by this run
    reused: int  # rows kept from a previous store or an interrupted run
    elapsed: float

    @property
    def skipped(self) -> list[dict]:
        return self.meta["skipped"]


class EmbedRun:
    """One run of `siglip embed --out`: plan -> partial rows -> final store. The caller holds the
    output's lock for the whole run."""

    def __init__(
        self,
        engine,
        plan: EmbedPlan,
        out: Path,
        out_dtype: str,
        normalized: bool,
        templates: Sequence[str] | None,
        resume: bool = False,
        base: Store | None = None,
        hash_files: bool = False,
    ):
        self.engine = engine
        self.plan = plan
        self.out = out
        self.normalized = normalized
        self.templates = list(templates or [])
        self.base = base
        self.hash_files = hash_files
        self.started = time.perf_counter()
        if out.suffix == ".npy":
            for text in plan.texts:
                if has_line_break(text):
                    raise UsageError(f"--text {text!r}: a text with a line break cannot be a line of {out.name}.paths.txt; use .npz, .jsonl or .parquet")
        self.stamps: list[tuple] | None = None  # of plan.images, taken once per run (hashing is slow)
        self.vanished: dict[str, str] = {}  # name -> error, for files that could not be hashed
        self.partial = PartialRows(out.with_name(out.name + ".partial"), engine.embed_dim, out_dtype, self.state(), resume)
        self.resumed = self.done_rows()
        self.computed = 0

    def state(self) -> dict:
        """What `--resume` must find unchanged in `<out>.partial/state.json`."""
        state = {**self.settings(), "inputs": self.plan.digest()}
        if self.base is not None:
            state["base"] = {"count": self.base.count, "revision": self.base.meta.get("revision")}
        return state

    def done_rows(self) -> int:
        """Rows finished so far (kept in the partial state when the run is interrupted)."""
        return len(self.partial.records)

    def settings(self) -> dict:
        """What the rows depend on; recorded in the meta, and checked by --resume and --update."""
        described = self.engine.describe()
        videos = any(is_video_name(s.name) for s in self.plan.images)
        return {
            "model": recorded_model(described["model"]),
            "revision": described["revision"],
            "model_dtype": described["dtype"],
            "decode": described["decode"],
            "normalized": self.normalized,
            "templates": self.templates,
            # NaFlex only (absent otherwise, so stores of other models keep their settings)
            **({"max_patches": described["max_patches"]} if "max_patches" in described else {}),
            # with video inputs only (absent otherwise, so image stores keep their settings)
            **({"video": self.engine.video.describe()} if videos else {}),
        }

    # ------------------------------------------------------------------ what is left to do
    def _stamps(self) -> list[tuple]:
        """Each listed file's stamp, hashed (--update=hash) once per run. A file that vanished
        or became unreadable since it was listed is a skipped input, never the end of the run."""
        if self.stamps is None:
            stamps = []
            for source in self.plan.images:
                try:
                    stamps.append(stamp_of(source, self.hash_files))
                except OSError as exc:
                    self.vanished[source.name] = f"{source.name}: cannot be read to hash it ({exc.strerror or exc}; removed since it was listed?)"
                    stamps.append(NO_STAMP)
            self.stamps = stamps
        return self.stamps

    def _reusable(self, source: Source, stamp: tuple, done: dict, base_rows: dict) -> bool:
        record = done.get(("image", source.name))
        if record is None:
            record = self._finished.get(source.name)
        if record is not None and (stamp[0] < 0 or same_file(record_stamp(self.partial.records[record]), stamp)):
            return True  # finished by the interrupted run (URLs and in-memory inputs are trusted there)
        row = base_rows.get(source.name)
        if row is None and source.name in self._base_videos():
            if source.name in self.cut_short_videos():
                return False  # sampled again, as a skipped input is: kept, it would lose its skipped record
            row = self._base_videos()[source.name][0]  # a video: its frames share the file's stamp
        if row is not None:
            old = tuple(self.base.stamps[row].tolist())
            if stamp[2] and not old[2] and tuple(old[:2]) == tuple(stamp[:2]):
                return True  # the store had no hash yet; size and time agree
            return same_file(old, stamp)
        return False

    def _finished_videos(self) -> dict[str, int]:
        """video name -> the partial row of its last frame, for videos the interrupted run finished."""
        return {r["video"]: i for i, r in enumerate(self.partial.records) if r.get("end")}

    def cut_short_videos(self) -> set[str]:
        """Videos the previous store lists as skipped although it holds some of their frames (cut
        short, or a frame unusable): an update samples them again, so that the new store lists
        them as skipped too (dedupe leaves such a video out; a reader can tell it is partial)."""
        if self.base is None:
            return set()
        if not hasattr(self, "_base_cut_short_videos"):
            self._base_cut_short_videos = {entry["path"].rpartition("#t=")[0] if "#t=" in entry["path"] else entry["path"]
                                           for entry in self.base.meta.get("skipped", [])}
        return self._base_cut_short_videos

    def _base_videos(self) -> dict[str, list[int]]:
        if self.base is None:
            return {}
        if not hasattr(self, "_base_video_rows"):
            self._base_video_rows = self.base.video_rows()
        return self._base_video_rows

    def todo(self) -> tuple[list[Source], list[tuple], list[str]]:
        """(images to embed, their stamps, texts to embed)."""
        done = self.partial.latest()
        skipped = {s["path"] for s in self.partial.skipped}
        base_rows = self.base.image_rows() if self.base is not None else {}
        self._finished = self._finished_videos()
        images, stamps = [], []
        for source, stamp in zip(self.plan.images, self._stamps()):
            if source.name in skipped or source.name in self.vanished or self._reusable(source, stamp, done, base_rows):
                continue
            images.append(source)
            stamps.append(stamp)
        texts = [t for t in dict.fromkeys(self.plan.texts) if ("text", t) not in done]
        return images, stamps, texts

    # ------------------------------------------------------------------ the compute
    def record_listing_failures(self, on_skip: Callable[[str], None] | None, strict: bool = False) -> bool:
        """Inputs that failed while listing, recorded as skipped once (a resumed run has them
        already). Returns False when `strict` stops at the first one."""
        recorded = {s["path"] for s in self.partial.skipped}
        vanished = [Failure(name, error) for name, error in self.vanished.items()]
        for failure in [*self.plan.failures, *vanished]:
            if failure.name not in recorded:
                if strict:
                    self.partial.commit()
                    on_skip and on_skip(failure.error)
                    return False
                self.partial.skip(failure.name, failure.error)
                on_skip and on_skip(failure.error)
        return True

    def embed(
        self,
        on_progress: Callable[[int], None] | None = None,
        on_skip: Callable[[str], None] | None = None,
        strict: bool = False,
    ) -> bool:
        """Compute every missing row into the partial state. Returns False when `strict` stopped
        at a bad input (finished rows are kept). Durable after each batch; on any exception
        (Ctrl-C included) the finished rows are committed before it propagates."""
        images, stamps, texts = self.todo()
        if not self.record_listing_failures(on_skip, strict):
            return False
        batch = self.engine.batch_size
        held = None  # a video's latest frame, written once it is known whether it is the last
        try:
            results = image_results(self.engine, images, self.normalized, self.out, on_progress) if images else []
            for count, item in enumerate(results, 1):  # (texts only: the vision tower never loads)
                source = images[item.index]
                if held is not None and (item.index != held.index or item.time < 0):
                    self._add_frame(held, images, stamps, end=True)
                    held = None
                if item.error is not None:
                    on_skip and on_skip(item.error)
                    if strict:
                        return False
                    self.partial.skip(source.name if item.time < 0 else item.name, item.error)
                elif item.time >= 0:
                    if held is not None:
                        self._add_frame(held, images, stamps, end=False)
                    held = item
                else:
                    self.partial.add("image", source.name, stamps[item.index], item.vector)
                    self.computed += 1
                if count % batch == 0:
                    self.partial.commit()
            if held is not None:
                self._add_frame(held, images, stamps, end=True)
                held = None
            if texts:
                vectors = self.engine.embed_texts(texts, self.templates or None, normalize=self.normalized)
                for text, vector in zip(texts, vectors):
                    self.partial.add("text", text, None, vector)
        finally:
            self.partial.commit()
        return True

    def _add_frame(self, item, images: Sequence[Source], stamps: Sequence[tuple], end: bool) -> None:
        source = images[item.index]
        frame = {"time": item.time, "video": source.name, **({"end": True} if end else {})}
        self.partial.add("image", item.name, stamps[item.index], item.vector, frame)
        self.computed += 1

    # ------------------------------------------------------------------ the final files
    def entries(self) -> list[Entry]:
        """The final rows in plan order: images as listed, then texts; skipped inputs left out."""
        partial_rows = self.partial.rows_map()
        latest = self.partial.latest()
        base_rows = self.base.image_rows() if self.base is not None else {}
        skipped = {s["path"] for s in self.partial.skipped}
        entries = []
        video_rows: dict[str, list[int]] = {}  # video -> its frames' partial rows, latest run's only
        for row, record in enumerate(self.partial.records):
            if "video" in record:
                video_rows.setdefault(record["video"], []).append(row)
        for rows in video_rows.values():  # a video redone on resume: its newest frames, once each
            names = {self.partial.records[r]["name"]: r for r in rows}
            rows[:] = sorted(names.values(), key=lambda r: self.partial.records[r]["time"])
        base_videos = self._base_videos()
        for source, stamp in zip(self.plan.images, self._stamps()):
            if source.name in self.vanished:
                continue  # gone: its rows (from an interrupted run or the store) go with it
            if source.name in video_rows:
                for row in video_rows[source.name]:
                    record = self.partial.records[row]
                    entries.append(Entry("image", record["name"], record_stamp(record), partial_rows, row, record["time"]))
                continue
            if source.name in base_videos and source.name not in skipped:
                times = self.base.times
                names = self.base.names_at(base_videos[source.name])
                for index, name in zip(base_videos[source.name], names):
                    entries.append(Entry("image", name, kept_stamp(self.base.stamps[index], stamp), self.base.row_source, index, float(times[index])))
                continue
            row = latest.get(("image", source.name))
            if row is not None:
                entries.append(Entry("image", source.name, record_stamp(self.partial.records[row]), partial_rows, row))
            elif source.name in base_rows and source.name not in skipped:
                index = base_rows[source.name]
                entries.append(Entry("image", source.name, kept_stamp(self.base.stamps[index], stamp), self.base.row_source, index))
        for text in dict.fromkeys(self.plan.texts):
            row = latest.get(("text", text))
            if row is not None:
                entries.append(Entry("text", text, NO_STAMP, partial_rows, row))
        return entries

    def skipped_inputs(self) -> list[dict]:
        """{path, error} of every input left out, in the order they were met."""
        listed = {s.name for s in self.plan.images} | {f.name for f in self.plan.failures}
        return [s for s in self.partial.skipped if s["path"] in listed or s["path"].rpartition("#t=")[0] in listed]

    def finish(self) -> EmbedSummary:
        self.partial.close()
        entries = self.entries()
        skipped = self.skipped_inputs()
        meta = {
            **self.settings(),
            # What `siglip search` needs to turn a cosine into SigLIP's probability without
            # opening the model when the query's embedding is cached.
            "logit_scale": self.engine.logit_scale,
            "logit_bias": self.engine.logit_bias,
            "images": sum(1 for e in entries if e.kind == "image"),
            "texts": sum(1 for e in entries if e.kind == "text"),
            "skipped_count": len(skipped),
            "skipped": skipped,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        meta = write_store(self.out, entries, self.partial.dim, self.partial.dtype.name, meta)
        remove_partial(self.partial.folder)
        reused = sum(1 for e in entries if e.kind == "image") - self.computed
        return EmbedSummary(meta, self.computed, reused, time.perf_counter() - self.started)

    def close(self) -> None:
        self.partial.close()


def image_results(engine, images: Sequence[Source], normalized: bool, out: Path, on_progress=None):
    """The engine's ImageResults in input order, with an error for a name that the output
    format cannot hold (a line break in a `.npy` store's paths.txt)."""
    for item in engine.iter_image_features(images, normalized, on_progress=on_progress):
        if item.error is None and out.suffix == ".npy" and has_line_break(item.name):
            item.error = f"{item.name!r}: a path with a line break cannot be a line of {out.name}.paths.txt; use .npz, .jsonl or .parquet"
        yield item


def check_base(base: Store, engine, normalized: bool, templates: Sequence[str] | None, out_dtype: str) -> None:
    """--update may only add to a store made the same way: refuse, naming what differs."""
    described = engine.describe()
    meta = base.meta
    if meta.get("revision") != described["revision"]:
        raise UsageError(
            f"--update: {base.path} was made with {meta.get('model')} (revision {meta.get('revision')}); "
            f"this run uses {described['model']} (revision {described['revision']}); "
            "pass the same --model, or write a new file without --update"
        )
    wanted = {"model_dtype": described["dtype"], "decode": described["decode"], "normalized": normalized,
              "templates": list(templates or []), "dtype": np.dtype(out_dtype).name,
              "max_patches": described.get("max_patches")}
    recorded = {"decode": "exact", **meta}  # stores written before --decode existed decoded exactly
    if "video" in meta:  # frames sampled another way would not be the frames kept
        wanted["video"] = engine.video.describe()
    changed = [f"{k} {recorded.get(k)!r} -> {v!r}" for k, v in wanted.items() if recorded.get(k) != v]
    if changed:
        raise UsageError(f"--update: {base.path} was made with other settings ({'; '.join(changed)}); use the same options, or write a new file")
    if meta.get("dim") != engine.embed_dim:
        raise UsageError(f"--update: {base.path} holds {meta.get('dim')}-d rows, the model makes {engine.embed_dim}-d ones")


def settle_stored_paths(base: Store, plan: EmbedPlan, relative_to: Path | None, note: Callable[[str], None]) -> Store:
    """The previous store for `--update`, its image rows named by absolute paths.

    Stores written before paths were stored absolute hold them as typed, relative to the folder
    `embed` ran in, which the store does not record. They are read against `relative_to` when
    given, else against the working folder or the store's own folder, whichever finds more of
    the inputs; the new store names them absolute. An update that would find none of its rows
    among the inputs (a moved library, or the wrong folder) would embed everything again: it is
    refused, with what to do instead."""
    names = base.names
    images = names[: base.image_count]
    relative = [i for i, name in enumerate(images) if is_relative_name(name)]
    wanted = {s.name for s in plan.images}
    frames = base.times[: base.image_count] >= 0

    def files(names: Sequence[str]) -> list[str]:
        """The files that rows come from: a video frame's row names the video plus #t=."""
        return [name.rpartition("#t=")[0] if frame else name for name, frame in zip(names, frames)]

    if relative:
        folders = [str(relative_to.expanduser().absolute())] if relative_to is not None else list(
            dict.fromkeys([os.getcwd(), str(base.path.parent.absolute())]))
        from_files = files(images)
        found = {folder: sum(absolute_name(from_files[i], folder) in wanted for i in relative) for folder in folders}
        folder = max(folders, key=lambda f: found[f])  # the first, on a tie
        if not found[folder] and wanted:
            where = f"--relative-to {folders[0]}" if relative_to is not None else f"the working folder ({folders[0]})" + (
                f" or the store's folder ({folders[1]})" if len(folders) > 1 else "")
            raise UsageError(
                f"--update: {base.path} names its {len(relative)} images relative to the folder embed ran in, and none of "
                f"them is among the inputs read against {where}; run from that folder, or name it with --relative-to DIR")
        names = list(names)
        for i in relative:
            names[i] = absolute_name(images[i], folder)
        note(f"--update: {base.path} holds paths relative to the folder embed ran in (written before paths were stored "
             f"absolute); read against {folder}, they are stored absolute from now on")
        base = base.with_names(names)
        images = names[: base.image_count]
    if images and wanted and wanted.isdisjoint(files(images)):
        raise UsageError(
            f"--update: none of the {len(images)} images in {base.path} is among the inputs (a moved or renamed folder?), "
            "so the update would embed every input again; check the paths, or run without --update to embed them anew")
    return base
