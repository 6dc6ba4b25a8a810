"""The HTTP layer of `siglip serve`: a FastAPI app (its OpenAPI at /openapi.json, a local
/docs page that reads it: FastAPI's own /docs loads Swagger UI from a CDN, which an offline
machine cannot reach), bearer-token auth, the upload cap, error mapping and the static page.

The app knows requests, not the model: each endpoint parses its form or query into plain
values and calls one method of `handlers` (cli/serve.py's `Handlers`, which runs the very code
of the command and renders it through the command's JSON renderer). What comes back is JSON
text, served as is, so an endpoint's JSON is the command's `--json` by construction.

Status codes: 400 bad parameters (UsageError), 401 no or wrong token, 403 URLs when
--allow-urls is off, 404 an index or row that is not there, 413 a body past --max-upload,
422 no input could be read (each image's cause named) or a field out of range, 501 a video
frame's thumbnail on a server without PyAV, 503 the queue is full (with Retry-After). A 500 is
a bug: logged with its traceback, answered in one line.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Annotated, Any, Optional

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from ..core.errors import InputError, ModelUnavailable, SiglipError, UsageError
from ..core.video import DEFAULT_EVERY, DEFAULT_MIN_GAP, VideoSampling
from .batcher import Busy
from .model import NotFound, Unsupported

log = logging.getLogger("siglip.serve")
STATIC = Path(__file__).resolve().parent / "static"
MAX_K = 1000  # hits per query
MAX_LABELS = 1000  # labels per classify request
MAX_IMAGES = 256  # images per request
# The page's own assets only: no inline script, no CDN, no frames; thumbnails arrive as blobs.
PAGE_SECURITY = "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; frame-ancestors 'none'"


# A video upload's sampling: the CLI's --every, --scenes, --min-gap and --max-frames, with their
# defaults and limits (core/video.py), so that a request answers what the command prints.
EveryField = Annotated[float, Form(ge=0.01, description="Videos: one frame every this many seconds, from 0 (as --every)")]
ScenesField = Annotated[bool, Form(description="Videos: one frame per shot instead (as --scenes)")]
MinGapField = Annotated[float, Form(ge=0.0, description="Videos with scenes: the shortest shot, seconds (as --min-gap)")]
MaxFramesField = Annotated[Optional[int], Form(ge=1, description="Videos: at most this many frames per video (as --max-frames)")]


class Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


def _error(status: int, message: str, headers: dict | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def _json(text: str, media_type: str = "application/json") -> Response:
    return Response(text, media_type=media_type)


def create_app(handlers, token: str | None = None, max_upload: int = 50_000_000, allow_urls: bool = False) -> FastAPI:
    app = FastAPI(
        title="siglip serve",
        version="1",
        summary="SigLIP zero-shot classification, embeddings and search over a warm model",
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(UploadLimit, max_bytes=max_upload, message=f"the request is larger than --max-upload ({max_upload:,} bytes)")
    app.state.requests = RequestCount()
    app.add_middleware(CountRequests, counts=app.state.requests)  # outermost: every request that reached the app

    # ------------------------------------------------------------------ auth and errors
    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        path = request.url.path
        if token is not None and (path.startswith("/v1/") or path == "/openapi.json") and path != "/v1/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _error(401, "missing or wrong token: send 'Authorization: Bearer <token>'",
                              {"WWW-Authenticate": "Bearer"})
        response = await call_next(request)
        if not path.startswith("/v1/"):
            response.headers["Content-Security-Policy"] = PAGE_SECURITY
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "body", "path"))
            parts.append(f"{where}: {error.get('msg', 'invalid')}")
        return _error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused):
        return _error(exc.status, str(exc), exc.headers)

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy):
        return _error(503, "busy: the queue is full; retry shortly", {"Retry-After": "1"})

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        return _error(404, str(exc))

    @app.exception_handler(Unsupported)
    async def unsupported(request: Request, exc: Unsupported):
        return _error(501, str(exc))

    @app.exception_handler(SiglipError)
    async def siglip_error(request: Request, exc: SiglipError):
        status = 400 if isinstance(exc, UsageError) else 422 if isinstance(exc, InputError) else 503 if isinstance(exc, ModelUnavailable) else 500
        if status == 500:
            log.error("%s %s: %s", request.method, request.url.path, exc)
        return _error(status, str(exc))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    # ------------------------------------------------------------------ inputs
    async def images_of(files: list[UploadFile], urls: list[str]) -> list[tuple[str, Any]]:
        """(name, bytes or URL) for each upload and URL, in order: files first."""
        if urls and not allow_urls:
            raise Refused(403, "this server fetches no URLs (start it with --allow-urls); upload the image instead")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise UsageError(f"url {url!r}: only http(s) URLs")
        if len(files) + len(urls) > MAX_IMAGES:
            raise UsageError(f"{len(files) + len(urls)} images in one request; at most {MAX_IMAGES}")
        images = []
        for number, upload in enumerate(files):
            images.append((upload.filename or f"upload-{number + 1}", await upload.read()))
        return images + [(url, url) for url in urls]

    # ------------------------------------------------------------------ the API
    @app.get("/v1/health", tags=["server"], summary="Liveness: 200 while the server takes requests")
    def health():
        return {"status": "ok"}

    @app.get("/v1/info", tags=["server"], summary="The model, how it runs, the indexes and their row counts")
    def info():
        return handlers.info()

    @app.post("/v1/classify", tags=["api"], summary="Score uploaded images against labels: the records of `siglip classify --json`")
    async def classify(
        image: Annotated[list[UploadFile], File(description="Images (repeatable)")] = [],
        url: Annotated[list[str], Form(description="Image URLs (repeatable; only with --allow-urls)")] = [],
        labels: Annotated[list[str], Form(description='Comma-separated labels, as --labels (repeatable)')] = [],
        label: Annotated[list[str], Form(description="One label, commas kept, as --label (repeatable)")] = [],
        template: Annotated[list[str], Form(description="Prompt templates with {} (repeatable; an ensemble)")] = [],
        no_template: Annotated[bool, Form()] = False,
        softmax: Annotated[bool, Form()] = False,
        top_k: Annotated[Optional[int], Form(ge=1, le=MAX_LABELS)] = None,
        threshold: Annotated[Optional[float], Form(ge=0.0, le=1.0)] = None,
        every: EveryField = DEFAULT_EVERY,
        scenes: ScenesField = False,
        min_gap: MinGapField = DEFAULT_MIN_GAP,
        max_frames: MaxFramesField = None,
    ):
        images = await images_of(image, url)
        if not images:
            raise UsageError("no images: upload one or more as 'image'")
        video = VideoSampling(every=every, scenes=scenes, max_frames=max_frames, min_gap=min_gap)
        return _json(await _thread(handlers.classify, images, labels, label, template, no_template, softmax, top_k, threshold, video))

    @app.post("/v1/embed", tags=["api"], summary="Embed images and texts: the lines of `siglip embed --format jsonl`")
    async def embed(
        image: Annotated[list[UploadFile], File(description="Images (repeatable)")] = [],
        url: Annotated[list[str], Form(description="Image URLs (repeatable; only with --allow-urls)")] = [],
        text: Annotated[list[str], Form(description="Texts (repeatable)")] = [],
        template: Annotated[list[str], Form(description="Put each text into these templates (an ensemble)")] = [],
        no_normalize: Annotated[bool, Form()] = False,
        out_dtype: Annotated[str, Form(pattern="^(float32|float16)$")] = "float32",
        full_precision: Annotated[bool, Form(description="For --server clients: every float32 value unrounded, an "
                                                         "error line for each image that could not be read, and each "
                                                         "line's upload as `input`")] = False,
        every: EveryField = DEFAULT_EVERY,
        scenes: ScenesField = False,
        min_gap: MinGapField = DEFAULT_MIN_GAP,
        max_frames: MaxFramesField = None,
    ):
        images = await images_of(image, url)
        if not images and not text:
            raise UsageError("nothing to embed: upload images as 'image' or give 'text'")
        video = VideoSampling(every=every, scenes=scenes, max_frames=max_frames, min_gap=min_gap)
        return _json(await _thread(handlers.embed, images, text, template, no_normalize, out_dtype, full_precision, video),
                     "application/x-ndjson")

    search_doc = "Search a loaded index: the record of `siglip search --json`"

    @app.get("/v1/search", tags=["api"], summary=search_doc)
    async def search_get(
        q: Annotated[list[str], Query(description="Text queries (repeatable)")] = [],
        index: Annotated[int, Query(ge=0)] = 0,
        like: Annotated[Optional[int], Query(ge=0, description="More like this: the row of `index` to search with")] = None,
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
        threshold: Annotated[Optional[float], Query(ge=-1.0, le=1.0)] = None,
        texts: bool = False,
        template: Annotated[list[str], Query()] = [],
        no_template: bool = False,
        rows: Annotated[bool, Query(description="Also give each image hit its row in the index (for thumbnails and `like`); "
                                                "off, the record is exactly `siglip search --json`'s")] = False,
    ):
        return _json(await _thread(handlers.search, index, q, [], like, k, threshold, texts, template, no_template, rows))

    @app.post("/v1/search", tags=["api"], summary=search_doc + " (by uploaded image)")
    async def search_post(
        image: Annotated[list[UploadFile], File(description="Query images (repeatable)")] = [],
        url: Annotated[list[str], Form()] = [],
        q: Annotated[list[str], Form(description="Text queries (repeatable)")] = [],
        index: Annotated[int, Form(ge=0)] = 0,
        like: Annotated[Optional[int], Form(ge=0)] = None,
        k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
        threshold: Annotated[Optional[float], Form(ge=-1.0, le=1.0)] = None,
        texts: Annotated[bool, Form()] = False,
        template: Annotated[list[str], Form()] = [],
        no_template: Annotated[bool, Form()] = False,
        rows: Annotated[bool, Form()] = False,
    ):
        images = await images_of(image, url)
        return _json(await _thread(handlers.search, index, q, images, like, k, threshold, texts, template, no_template, rows))

    @app.get("/v1/thumbnail/{index}/{row}", tags=["api"], summary="A small JPEG of an image row of a loaded index",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    async def thumbnail(index: int, row: int):
        data = await _thread(handlers.thumbnail, index, row)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    # ------------------------------------------------------------------ the page
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    def docs():
        return FileResponse(STATIC / "docs.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class RequestCount:
    """Requests that reached the app, and those whose response was sent whole: `siglip serve`
    says both when it stops, so a request taken and never answered cannot pass unseen."""

    def __init__(self):
        self.taken = 0
        self.answered = 0


class CountRequests:
    def __init__(self, app, counts: RequestCount):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.counts.taken += 1  # one event loop: no lock needed

        async def counted(message):
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.counts.answered += 1

        await self.app(scope, receive, counted)


class UploadLimit:
    """At most `max_bytes` of request body: a Content-Length past it is answered 413 before a
    byte is read; a body that grows past it (chunked) stops the request's parsing with 413."""

    def __init__(self, app, max_bytes: int, message: str):
        self.app, self.max_bytes, self.message = app, max_bytes, message

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", ())).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _error(413, self.message, {"Connection": "close"})(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, self.message)
            return message

        await self.app(scope, counted, send)


async def _thread(function, *args):
    """Model work off the event loop: the loop keeps taking requests while a batch runs."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(function, *args)
