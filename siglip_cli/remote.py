"""`--server URL` (or SIGLIP_SERVER): the commands send their work to a running `siglip serve`.

`RemoteEngine` stands in for the engine in the commands' own code (classify, similarity,
embed to stdout): images and texts are embedded by the server (`/v1/embed` with
`full_precision`, so the vectors arrive as the float32 the server computed), and everything
after the embeddings (scores, ranking, rendering) runs here exactly as it runs locally. So a
command prints what it prints without --server, up to the float rounding of the server's
batches. A video is uploaded whole and sampled by the server with the command's --every,
--scenes, --min-gap and --max-frames: its frames come back with their times, and the command
summarises them as it does locally. `remote_search` asks the server's `/v1/search` for an
index it serves.

A server that is down, or that serves another model or precision than the command asks for,
is one line and exit 4 (BackendUnavailable): printing another model's scores would be wrong
without a word.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .core.errors import BackendUnavailable, InputError, UsageError
from .core.scoring import logits, sigmoid, softmax
from .core.video import VideoSampling, frame_name, split_frame_name
from .results import SearchHit, SearchResult
from .urls import fetch_url, is_url

CHUNK_IMAGES = 32  # images per request
CHUNK_BYTES = 16_000_000  # and at most about this many bytes (the server's --max-upload is 50 MB by default)
RETRIES = 20  # 503 busy: wait as Retry-After says, this many times
FORM_BYTES = 2_000  # of a request, what is not files: the form fields and their multipart framing


def _client():
    try:
        import httpx
    except ImportError:
        raise BackendUnavailable("--server needs httpx: pip install 'siglip-cli[serve]'") from None
    return httpx


@dataclass
class ImageResult:
    """As pipeline.ImageResult (which lives beside torch: a client needs no torch)."""

    index: int
    name: str
    vector: np.ndarray | None = None
    error: str | None = None
    time: float = -1.0  # a video frame's time in seconds (its name ends in #t=...); -1 for a still


@dataclass
class _Resolved:
    name: str
    revision: str
    folder: Path | None = None


class Connection:
    def __init__(self, url: str, token: str | None = None):
        httpx = _client()
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(600, connect=10))
        self._httpx = httpx

    def request(self, method: str, path: str, **kwargs):
        for _ in range(RETRIES):
            try:
                response = self.http.request(method, path, **kwargs)
            except self._httpx.HTTPError as exc:
                raise BackendUnavailable(f"the server at {self.url} does not answer ({type(exc).__name__}: {exc or 'no reply'})") from None
            if response.status_code != 503:
                break
            time.sleep(float(response.headers.get("retry-after", "1") or 1))
        if response.status_code == 401:
            raise BackendUnavailable(f"the server at {self.url} wants a token: set SIGLIP_TOKEN")
        if response.status_code >= 400:
            try:
                message = response.json().get("error") or response.text
            except ValueError:
                message = response.text.strip() or response.reason_phrase
            kind = InputError if response.status_code in (413, 422) else BackendUnavailable if response.status_code >= 500 else UsageError
            raise kind(f"the server at {self.url}: {message}")
        return response

    def info(self) -> dict:
        return self.request("GET", "/v1/info").json()


def _same_model(requested: str, served: str) -> bool:
    if os.path.isdir(requested) and os.path.isdir(served):
        return os.path.realpath(requested) == os.path.realpath(served)
    return requested == served


def check_model(url: str, info: dict, requested: str | None, dtype: str = "auto", exact: bool = False) -> None:
    """The server must serve the model (and precision) the command asks for; exit 4 if not."""
    from .hub import DEFAULT_MODEL

    wanted = requested or DEFAULT_MODEL
    if not _same_model(wanted, info["model"]):
        raise BackendUnavailable(f"the server at {url} serves {info['model']}, not {wanted}; "
                                 "give --model with the served model, or another --server")
    wanted_dtype = "fp32" if exact else dtype
    if wanted_dtype not in ("auto", None) and wanted_dtype != info["dtype"]:
        raise BackendUnavailable(f"the server at {url} computes in {info['dtype']}, not {wanted_dtype}; "
                                 "drop --dtype/--exact, or start the server with them")


def _image_bytes(source, limit: int | None = None, url: str = "") -> tuple[str, bytes] | str:
    """(name, bytes) to upload, or the error that kept the source out (read here, as locally).
    A file over `limit` bytes (the server's --max-upload) is refused before it is read."""
    value = source.value
    try:
        if isinstance(value, str) and is_url(value):
            content = fetch_url(value)
        elif isinstance(value, (bytes, bytearray)):
            content = bytes(value)
        else:
            with open(value, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if limit is not None and size > limit:
                    return _too_large(source.name, size, url)
                content = handle.read()
        if limit is not None and len(content) > limit:
            return _too_large(source.name, len(content), url)
        return source.name, content
    except InputError as exc:
        return str(exc)
    except OSError as exc:
        return f"{source.name}: cannot read ({exc.strerror or exc})"


def _upload_room(info: dict) -> int:
    """The bytes of files one request may carry: the server's --max-upload, less the form."""
    return int(info.get("max_upload") or 50_000_000) - FORM_BYTES


def _part_bytes(name: str) -> int:
    """A file's multipart framing: its headers, which carry its name."""
    return 200 + len(name.encode("utf-8", "surrogateescape"))


def _too_large(name: str, size: int, url: str) -> str:
    return f"{name}: {size:,} bytes, more than the server at {url} takes (its --max-upload); run it without --server"


class RemoteEngine:
    """The engine's embedding and scoring API, answered by a server. Videos are uploaded whole
    and sampled by the server with this command's sampling (`video`: --every, --scenes,
    --min-gap, --max-frames), so their frames are the ones a local run takes."""

    def __init__(self, connection: Connection, info: dict, video: VideoSampling | None = None):
        self.connection = connection
        self.info = info
        self.video = video or VideoSampling()
        self.max_upload = _upload_room(info)
        self.embed_dim = int(info["embed_dim"])
        self.logit_scale = float(info["logit_scale"])
        self.logit_bias = float(info["logit_bias"])
        self.precision = info["dtype"]
        self.decode = info["decode"]
        self.device = f"{info['device']} at {connection.url}"
        self.attn = info["attn"]
        self.batch_size = int(info["batch_size"])
        self.workers = 0
        self.resolved = _Resolved(info["model"], info["revision"])
        self.on_truncated = None

    def describe(self) -> dict:
        return {key: self.info[key] for key in ("model", "revision", "device", "dtype", "decode", "attn") if key in self.info}

    # ------------------------------------------------------------------ the server's work
    def _embed(self, images: list[tuple[str, bytes]], texts: Sequence[str], templates: Sequence[str] | None,
               normalized: bool) -> list[dict]:
        data: dict[str, Any] = {"full_precision": "true", "no_normalize": "false" if normalized else "true",
                                **sampling_fields(self.video)}
        if texts:
            data["text"] = list(texts)
        if templates:
            data["template"] = list(templates)
        files = [("image", (name, content, "application/octet-stream")) for name, content in images]
        response = self.connection.request("POST", "/v1/embed", data=data, files=files or None)
        return [json.loads(line) for line in response.text.splitlines() if line.strip()]

    def iter_image_features(self, sources, normalized: bool = True, batch_size=None, workers=None,
                            on_progress=None) -> Iterator[ImageResult]:
        """One result per image, a video's frames (with their times) in its place, in input
        order, as Engine.iter_image_features gives them. Uploads go in chunks of at most
        CHUNK_IMAGES files and about CHUNK_BYTES; a file the server's --max-upload refuses is
        that file's error, not the run's."""
        chunk: list[tuple[int, str, bytes]] = []
        size = 0

        def send(items):
            if not items:
                return
            records = self._embed([(name, content) for _, name, content in items], [], None, normalized)
            counted = None
            for record in records:
                if record.get("kind") != "image":
                    continue
                index, name, _ = items[record["input"]]
                if on_progress and index != counted:
                    counted = index
                    on_progress(1)
                seconds = float(record.get("time", -1.0))
                shown = frame_name(name, seconds) if seconds >= 0 else name  # (named here: a file name survives any upload)
                if "error" in record:
                    yield ImageResult(index, shown, error=_renamed(record["error"], record["path"], shown), time=seconds)
                else:
                    yield ImageResult(index, shown, vector=np.asarray(record["embedding"], np.float32), time=seconds)

        for index, source in enumerate(sources):
            read = _image_bytes(source, self.max_upload - _part_bytes(source.name), self.connection.url)
            if isinstance(read, str):
                yield from send(chunk)
                chunk, size = [], 0
                if on_progress:
                    on_progress(1)
                yield ImageResult(index, source.name, error=read)
                continue
            cost = len(read[1]) + _part_bytes(source.name)
            if chunk and size + cost > min(CHUNK_BYTES, self.max_upload):
                yield from send(chunk)
                chunk, size = [], 0
            chunk.append((index, *read))
            size += cost
            if len(chunk) >= CHUNK_IMAGES or size >= CHUNK_BYTES:
                yield from send(chunk)
                chunk, size = [], 0
        yield from send(chunk)

    def embed_texts(self, texts, template=None, normalize: bool = True) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        templates = [template] if isinstance(template, str) else list(template or [])
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        records = self._embed([], texts, templates or None, normalize)
        return np.stack([np.asarray(r["embedding"], np.float32) for r in records])

    def label_embeddings(self, labels, templates) -> np.ndarray:
        return self.embed_texts(labels, list(templates))

    # ------------------------------------------------------------------ scores, here
    def logits(self, image_embeddings, text_embeddings) -> np.ndarray:
        return logits(np.asarray(image_embeddings, np.float32), np.asarray(text_embeddings, np.float32), self.logit_scale, self.logit_bias)

    def probabilities(self, logit_matrix, use_softmax: bool = False) -> np.ndarray:
        return softmax(logit_matrix) if use_softmax else sigmoid(logit_matrix)


def connect(url: str, model: str | None, dtype: str = "auto", exact: bool = False,
            video: VideoSampling | None = None) -> RemoteEngine:
    connection = Connection(url, os.environ.get("SIGLIP_TOKEN"))
    info = connection.info()
    check_model(url, info, model, dtype, exact)
    return RemoteEngine(connection, info, video)


def sampling_fields(video: VideoSampling) -> dict[str, str]:
    """A video sampling as the form fields of /v1/classify and /v1/embed."""
    fields = {"every": repr(video.every), "scenes": str(video.scenes).lower(), "min_gap": repr(video.min_gap)}
    if video.max_frames is not None:
        fields["max_frames"] = str(video.max_frames)
    return fields


def _renamed(error: str, served: str, name: str) -> str:
    """An error as the server wrote it, naming the input as this command names it."""
    return name + error[len(served):] if served != name and error.startswith(served) else error


# ============================================================================ search
def served_index(url: str, info: dict, index: Path) -> int:
    """The server's number for `index`: the same file, else the only one of that name."""
    mine = os.path.realpath(index)
    served = info.get("indexes", [])
    for item in served:
        if os.path.realpath(item["path"]) == mine:
            return item["index"]
    named = [item for item in served if os.path.basename(item["path"]) == os.path.basename(mine)]
    if len(named) == 1:
        return named[0]["index"]
    listed = ", ".join(item["path"] for item in served) or "none"
    raise BackendUnavailable(f"the server at {url} does not serve {index} (it serves: {listed})")


def remote_search(url: str, index: Path, texts: Sequence[str], templates: Sequence[str] | None, no_template: bool,
                  listing, top_k: int, threshold: float | None, include_texts: bool) -> list[SearchResult]:
    connection = Connection(url, os.environ.get("SIGLIP_TOKEN"))
    info = connection.info()
    number = served_index(url, info, index)
    data: dict[str, Any] = {"index": str(number), "k": str(top_k), "texts": str(include_texts).lower(),
                            "no_template": str(no_template).lower()}
    if texts:
        data["q"] = list(texts)
    if templates:
        data["template"] = list(templates)
    if threshold is not None:
        data["threshold"] = repr(threshold)
    sources = listing.sources if listing else []
    uploads, failed = [], {}
    for position, source in enumerate(sources):
        read = _image_bytes(source, _upload_room(info) - _part_bytes(source.name), url)
        if isinstance(read, str):
            failed[position] = read
        else:
            uploads.append((position, *read))
    records = []
    if texts or uploads:
        files = [("image", (name, content, "application/octet-stream")) for _, name, content in uploads]
        records = connection.request("POST", "/v1/search", data=data, files=files or None).json()
    results = [_result(record, "text") for record in records[: len(texts)]]
    image_records = records[len(texts):]
    found, positions, taken = [], {}, 0
    for position, source in enumerate(sources):
        if position in failed:
            mine = [SearchResult(source.name, error=failed[position], kind="image")]
        else:
            count = _records_of(source.name, image_records, taken)
            mine = [_result(record, "image") for record in image_records[taken:taken + count]]
            taken += count
        for result in mine:
            positions[id(result)] = position
        found += mine
    if listing is not None:
        for failure, result in listing.in_order(found, index=lambda r: positions[id(r)]):
            results.append(SearchResult(failure.name, error=failure.error, kind="image") if failure is not None else result)
    return results


def _records_of(name: str, records: list[dict], start: int) -> int:
    """How many records from `start` answer the query image `name`: one for an image; for a
    video, one per sampled frame (`name#t=...`) and the error that ended them, if any."""
    def frame_of(record) -> bool:
        split = split_frame_name(record["query"])
        return split is not None and split[0] == name

    if start >= len(records):
        return 0
    count = 1
    if frame_of(records[start]):
        while start + count < len(records) and (frame_of(records[start + count]) or (
                records[start + count]["query"] == name and "error" in records[start + count])):
            count += 1
            if records[start + count - 1]["query"] == name:
                break  # the error after the frames ends the video
    return count


def _result(record: dict, kind: str) -> SearchResult:
    if "error" in record:
        return SearchResult(record["query"], error=record["error"], kind=kind)
    return SearchResult(record["query"], [SearchHit(**hit) for hit in record["results"]], kind=kind)
