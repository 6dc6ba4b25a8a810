"""`siglip serve`: the command's flow (checks, loading, the server's life) and the handlers
that answer the API by running each command's own code.

The HTTP side (serve/app.py) parses requests; `Handlers` here turns them into the same calls as
`siglip classify`, `embed --format jsonl` and `search` make (cli/classify.py, cli/embed.py,
cli/search.py), with the served engine (images through the micro-batcher) in place of the
engine, and renders their results with the command's JSON renderer. So an endpoint's JSON is
the command's `--json` by construction.

Lifecycle: the port and the model are printed on stderr once the socket listens. SIGINT or
SIGTERM: stop taking connections, finish the requests in flight, exit 0 (a second one exits at
once). SIGHUP, and with --reload-index a check every few seconds, re-open the indexes that
`embed --update` replaced; a request already running finishes on the index it started with.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..core.errors import BackendUnavailable, InputError, UsageError
from .terminal import note

RELOAD_EVERY = 2.0  # seconds between checks with --reload-index
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    no_auth: bool = False
    max_upload: int = 50_000_000
    allow_urls: bool = False
    batch_size: int | None = None
    window_ms: float = 5.0
    queue_size: int = 256
    reload_index: bool = False
    max_pixels: int | None = None


def check_settings(settings: ServeSettings) -> None:
    if settings.token is not None and not settings.token.strip():
        raise UsageError("--token is empty; give a secret, or --no-auth on a trusted network")
    if settings.token is not None and settings.no_auth:
        raise UsageError("--token and --no-auth contradict each other; give one of them")
    if settings.host not in LOOPBACK and settings.token is None and not settings.no_auth:
        raise UsageError(f"--host {settings.host} lets other machines in: give --token SECRET (clients send "
                         "'Authorization: Bearer SECRET'), or --no-auth on a network you trust")
    if not 0 <= settings.port <= 65535:
        raise UsageError(f"--port {settings.port}: choose 0 to 65535 (0: any free port)")


def import_server():
    """FastAPI and uvicorn: the `serve` extra. Missing is exit 4 with the line to install it."""
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise BackendUnavailable(f"siglip serve needs {exc.name}: pip install 'siglip-cli[serve]'") from None
    return uvicorn


# ============================================================================ the answers
class Handlers:
    """What each endpoint does; JSON text out, from the commands' own code and renderer."""

    def __init__(self, served, indexes, settings: ServeSettings):
        self.served = served
        self.indexes = indexes
        self.settings = settings

    @staticmethod
    def _listing(images: Sequence[tuple[str, Any]]):
        from ..sources import Listing, Source

        return Listing(sources=[Source(name, value) for name, value in images])

    def info(self) -> dict:
        described = self.served.describe()
        return {
            **described,
            "embed_dim": self.served.embed_dim,
            "logit_scale": self.served.logit_scale,  # exp(t), full precision: --server clients score with them
            "logit_bias": self.served.logit_bias,
            "batch_size": self.served.batcher.batch_size,
            "window_ms": self.settings.window_ms,
            "queue_size": self.settings.queue_size,
            "max_upload": self.settings.max_upload,
            "max_pixels": self.settings.max_pixels,
            "allow_urls": self.settings.allow_urls,
            "indexes": [item.describe() for item in self.indexes.items],
            "batches": self.served.batcher.batches,
            "batched_images": self.served.batcher.images,
        }

    def _sampled(self, video):
        """The served engine as a command sees it, sampling videos as the request asks."""
        return self.served if video is None else SampledEngine(self.served, video)

    def classify(self, images, labels, label, templates, no_template, softmax, top_k, threshold, video=None) -> str:
        from ..prompts import collect_labels, resolve_templates
        from . import render
        from .classify import classify

        label_set = collect_labels(labels, label, [])
        if len(label_set.labels) > 1000:
            raise UsageError(f"{len(label_set.labels)} labels; at most 1000 per request")
        chosen = resolve_templates(templates or None, use_template=not no_template)
        results = list(classify(self._sampled(video), self._listing(images), label_set.labels, chosen, softmax, top_k, threshold))
        self._refuse_if_all_failed(results)
        return render.json_text(render.classify_view(label_set.labels, "softmax" if softmax else "sigmoid").json_document(results))

    def embed(self, images, texts, templates, no_normalize, out_dtype, full_precision=False, video=None) -> str:
        from ..embedding import EmbedPlan
        from ..prompts import resolve_templates
        from . import render
        from .embed import embed_to_stdout

        chosen = resolve_templates(templates) if templates else None
        if no_normalize and chosen and len(chosen) > 1:
            raise UsageError("no_normalize needs a single template (an ensemble averages normalised embeddings)")
        if full_precision:
            return self._full_precision_rows(images, texts, chosen, not no_normalize, video)
        skipped: list[str] = []
        plan = EmbedPlan(self._listing(images).sources, list(texts), [])
        rows = list(embed_to_stdout(self._sampled(video), plan, out_dtype, not no_normalize, chosen, False, skipped.append))
        if skipped and not rows:
            raise InputError("; ".join(message.removeprefix("skipped ") for message in skipped))
        return "".join(render.json_text(record) + "\n" for row in rows for record in render.EMBED_VIEW.jsonl_records(row))

    def _full_precision_rows(self, images, texts, templates, normalized: bool, video=None) -> str:
        """For --server clients: one line per image (a video: per sampled frame, with its
        `time`, then the error that ended its frames, if any), each naming its upload by
        position (`input`), then one per text; errors included, the float32 values unrounded
        (the client scores and renders them as the command does locally)."""
        import json

        lines = []
        for item in self._sampled(video).iter_image_features(self._listing(images).sources, normalized):
            record = {"kind": "image", "path": item.name, "input": item.index}
            if item.time >= 0:
                record["time"] = item.time
            record.update({"error": item.error} if item.error is not None else {"embedding": item.vector.tolist()})
            lines.append(json.dumps(record))
        if texts:
            for text, vector in zip(texts, self.served.embed_texts(list(texts), templates, normalize=normalized)):
                lines.append(json.dumps({"kind": "text", "text": text, "embedding": vector.tolist()}))
        return "".join(line + "\n" for line in lines)

    def search(self, number, queries, images, like, k, threshold, include_texts, templates, no_template, with_rows=False) -> str:
        from ..prompts import resolve_templates
        from ..serve.model import IndexedRow, IndexQueries
        from ..sources import Listing, Source
        from . import render
        from .search import search

        index = self.indexes.get(number)
        if any(not text.strip() for text in queries):
            raise UsageError("an empty text query was given")
        chosen = resolve_templates(templates or None, use_template=not no_template)
        listing = self._listing(images) if images else None
        if like is not None:
            _, name = self.indexes.image_row(number, like)
            listing = listing or Listing()
            listing.sources.append(Source(name, IndexedRow(index, like)))
        if not queries and listing is None:
            raise UsageError("nothing to search for: give q (text), an image upload, or like (a row)")
        results = list(search(index.store, IndexQueries(self.served, index), queries, chosen, listing, k, threshold, include_texts))
        self._refuse_if_all_failed(results)
        document = render.SEARCH_VIEW.json_document(results)
        if with_rows:  # the page's thumbnails and "more like this" need each hit's row
            for record in document:
                for hit in record.get("results", []):
                    if hit["kind"] == "image":
                        hit["row"] = index.row_of(hit["path"])
        return render.json_text(document)

    def thumbnail(self, number: int, row: int) -> bytes:
        return self.indexes.thumbnail(number, row, self.settings.max_pixels)

    @staticmethod
    def _refuse_if_all_failed(results) -> None:
        """Some inputs failed: their error records travel with the rest (as in --json). All
        failed: a 422 naming each cause."""
        if results and all(r.error is not None for r in results):
            raise InputError("; ".join(r.error for r in results))


class SampledEngine:
    """The served engine with a request's video sampling: what the commands' code calls
    `engine` (`iter_image_features` samples videos as asked; everything else is the served
    engine's)."""

    def __init__(self, served, video):
        self.served, self.video = served, video

    def __getattr__(self, name):
        return getattr(self.served, name)

    def iter_image_features(self, sources, normalized: bool = True, batch_size=None, workers=None, on_progress=None):
        return self.served.iter_image_features(sources, normalized, on_progress=on_progress, video=self.video)


# ============================================================================ the command
def load_served_model(options, indexes, settings: ServeSettings, load_engine):
    """The engine: the indexes' model when indexes are given (as `search` loads it), else the
    model options' (as `classify` does)."""
    from ..queries import IndexModel
    from ..serve.model import ServedEngine

    if indexes.items:
        first = indexes.items[0]
        engine = IndexModel(first.path, first.store.meta, options.model, options.device,
                            options.dtype, options.attn, options.offline, options.use_cache, options.max_pixels).engine
    else:
        engine = load_engine(options)
    batch = settings.batch_size or engine.batch_size
    return ServedEngine(engine, batch, settings.window_ms / 1000, settings.queue_size)


def served_app(indexes, options, settings: ServeSettings, load_engine):
    """The model, loaded and warmed, and the app over it: what `siglip serve` runs under uvicorn,
    and what each replica runs behind Ray Serve's proxy (cli/ray_serve.py). (served, app)."""
    from ..serve.app import create_app

    settings.max_pixels = options.max_pixels
    served = load_served_model(options, indexes, settings, load_engine)
    served.warm_text()
    return served, create_app(Handlers(served, indexes, settings), settings.token, settings.max_upload, settings.allow_urls)


def serve(index_paths: Sequence[Path], options, settings: ServeSettings, load_engine) -> int:
    """Run until SIGINT/SIGTERM; returns the exit code."""
    check_settings(settings)
    uvicorn = import_server()
    from ..serve.model import ServedIndexes

    from ..runtime import keep_freed_memory

    keep_freed_memory()  # (load_engine does it too; the indexes' model is loaded by IndexModel)
    indexes = ServedIndexes([Path(p) for p in index_paths])
    sock = _bind(settings.host, settings.port)
    served, app = served_app(indexes, options, settings, load_engine)
    logging.basicConfig(level=logging.INFO, format="siglip: %(message)s", stream=sys.stderr)
    # asyncio and h11 whatever else is installed (uvicorn would pick up uvloop and httptools, which
    # `ray[serve]` brings): one behaviour everywhere, the one measured (docs/serve.md#speed) and the
    # one whose TCP_NODELAY tests/test_serve_socket.py checks
    config = uvicorn.Config(app, loop="asyncio", http="h11", log_level="warning", access_log=False,
                            timeout_graceful_shutdown=30, lifespan="off")
    server = _Server(config, indexes)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    described = served.describe()
    note(f"serving {described['model']} (revision {described['revision']}, {described['dtype']} on {described['device']}) "
         f"at http://{shown}:{port}/")
    for item in indexes.items:
        note(f"index {item.number}: {item.path} ({item.store.count} rows)")
    if settings.no_auth and settings.host not in LOOPBACK:
        note(f"warning: --no-auth on {settings.host}: anyone who reaches this port can use the model and read the indexes' thumbnails")
    stop_watch = threading.Event()
    if settings.reload_index and indexes.items:
        threading.Thread(target=_watch, args=(indexes, stop_watch), name="siglip-reload", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        stop_watch.set()
        served.close()
    counts = app.state.requests
    note(f"stopped: {counts.answered} requests answered, {counts.taken - counts.answered} taken and not answered")
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on connections accepted from a
    # socket that says it is TCP (base_events._set_nodelay). Without it, every request after the
    # first on a kept-alive connection waited ~40 ms: the response's header and body writes met
    # Nagle's algorithm and the client's delayed ACK (benchmarks/serve_speed.py; docs/serve.md).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BackendUnavailable(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _reload(indexes) -> None:
    for line in indexes.reload():
        note(line)


def _watch(indexes, stop: threading.Event) -> None:
    while not stop.wait(RELOAD_EVERY):
        _reload(indexes)


class _Server:
    """uvicorn's server, with our signals: SIGINT/SIGTERM finish the requests in flight and the
    process exits 0 (uvicorn would re-raise the signal at the end, a death by signal); SIGHUP
    re-reads the indexes."""

    def __init__(self, config, indexes):
        import uvicorn

        class Server(uvicorn.Server):
            @contextmanager
            def capture_signals(inner):
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
                signal.signal(signal.SIGINT, inner.handle_exit)
                signal.signal(signal.SIGTERM, inner.handle_exit)
                signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=_reload, args=(indexes,), daemon=True).start())
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)

        self.server = Server(config)

    def run(self, sockets) -> None:
        self.server.run(sockets=sockets)
