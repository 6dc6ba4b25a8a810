"""`siglip embed`: inputs -> engine -> EmbeddingWriter (or JSON lines on stdout)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .errors import UsageError
from .writer import TEXT_PREFIX, EmbeddingWriter, embedding_record, has_line_break, sidecar


class EmbedJob:
    def __init__(self, engine, out: Path | None, out_dtype: str, normalize: bool, templates, strict: bool, resume: bool):
        self.engine = engine
        self.out = out
        self.out_dtype = out_dtype
        self.normalize = normalize
        self.templates = templates
        self.strict = strict
        self.resume = resume

    def settings(self, sources=None, texts=None) -> dict:
        """What the rows depend on. With the inputs: also a digest of their ordered names, as
        --resume must continue the same list (or rows would come out in another order than a
        clean run's, or include files that are gone)."""
        described = self.engine.describe()
        described["model_dtype"] = described.pop("dtype")
        settings = {**described, "normalized": self.normalize, "templates": list(self.templates or [])}
        if sources is not None:
            names = [s.name for s in sources] + ["\0texts"] + list(texts or [])
            settings["inputs"] = hashlib.sha256("\0".join(names).encode("utf-8", "surrogateescape")).hexdigest()
        return settings

    def run(self, sources, texts: list[str], progress_bar, note, error_line) -> int:
        started = time.perf_counter()
        if self.out is not None:
            _refuse_overwriting_inputs(self.out, sources)
        sink = _Stdout(self.out_dtype) if self.out is None else EmbeddingWriter(
            self.out, self.engine.embed_dim, self.out_dtype, self.settings(sources, texts), self.resume
        )
        done = sink.done()
        if done:
            note(f"resuming: {len(done)} inputs already done in {self.out}.partial")
        unique = list({s.name: s for s in sources}.values())
        if len(unique) < len(sources):
            note(f"{len(sources) - len(unique)} inputs were listed more than once; each is embedded once")
        todo = [s for s in unique if s.name not in done]
        text_rows = [t for t in dict.fromkeys(texts) if TEXT_PREFIX + _one_line(t) not in done]
        skipped = embedded = 0
        try:
            streaming_to_terminal = self.out is None and sys.stdout.isatty()
            with progress_bar(len(todo), "images", enabled=not streaming_to_terminal) as advance:
                batch_end = self.engine.batch_size
                results = self.engine.iter_image_features(
                    [s.value for s in todo], [s.name for s in todo], normalize_output=self.normalize, on_progress=advance
                ) if todo else []  # texts only: the vision tower is never loaded
                for count, item in enumerate(results, 1):
                    if item.error is None and has_line_break(item.name):
                        item.error = f"{item.name!r}: a path with a line break cannot be listed in paths.txt"
                    if item.error is not None:
                        if self.strict:
                            sink.commit()
                            sink.close()
                            error_line(item.error)
                            note("stopped by --strict; finished rows are kept, rerun with --resume after fixing the input")
                            return 1
                        note(f"skipped {item.error}")
                        sink.skip(item.name, item.error)
                        skipped += 1
                    else:
                        sink.add(item.name, item.vector)
                        embedded += 1
                    if count >= batch_end:
                        sink.commit()
                        batch_end += self.engine.batch_size
            if text_rows:
                vectors = self.engine.embed_texts(text_rows, self.templates, normalize=self.normalize)
                for text, vector in zip(text_rows, vectors):
                    sink.add(TEXT_PREFIX + _one_line(text), vector)
            sink.commit()
            meta = sink.finish({**self.settings(), "images": embedded + sink.resumed_images(), "texts": len(texts)})
        except KeyboardInterrupt:
            sink.commit()
            sink.close()
            if self.out is not None:
                note(
                    f"interrupted: {len(sink.names)} rows kept in {sink.partial}; "
                    "run the same command with --resume to continue"
                )
            return 130
        elapsed = time.perf_counter() - started
        if self.out is not None:
            rate = f", {embedded / elapsed:.1f} images/s" if embedded and elapsed > 0 else ""
            note(
                f"wrote {meta['count']} rows ({meta['dim']}-d {meta['dtype']}) to {self.out} in {elapsed:.1f} s"
                f"{rate}" + (f"; skipped {meta['skipped_count']}, listed in {sidecar(self.out, '.meta.json')}" if meta["skipped_count"] else "")
            )
        return 1 if meta["skipped_count"] else 0


def _refuse_overwriting_inputs(out: Path, sources) -> None:
    targets = {os.path.realpath(p) for p in (out, sidecar(out, ".paths.txt"), sidecar(out, ".meta.json"))}
    for source in sources:
        if isinstance(source.value, str) and os.path.realpath(source.value) in targets:
            raise UsageError(f"--out {out}: would overwrite the input {source.name}")


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


class _Stdout:
    """JSON lines on stdout, for pipelines; skipped inputs go to stderr only."""

    partial = None

    def __init__(self, dtype: str):
        self.stream = sys.stdout  # taken now: a progress bar may stand in for sys.stdout later
        self.dtype = np.dtype(dtype)
        self.names: list[str] = []
        self.skipped: list[dict] = []

    def done(self) -> set:
        return set()

    def resumed_images(self) -> int:
        return 0

    def add(self, name: str, vector) -> None:
        row = np.asarray(vector).astype(self.dtype)
        self.stream.write(json.dumps(embedding_record(name, row), ensure_ascii=False) + "\n")
        self.names.append(name)

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append({"path": name, "error": reason})

    def commit(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        self.commit()

    def finish(self, meta: dict) -> dict:
        self.commit()
        return {**meta, "count": len(self.names), "skipped_count": len(self.skipped), "dim": None, "dtype": self.dtype.name}

