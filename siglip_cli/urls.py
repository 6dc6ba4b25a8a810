"""http(s) inputs: download an image's bytes under one deadline and a size cap.

The core decodes bytes; fetching them is the app's business. Written on `http.client` rather
than `urllib.request` so that the promises hold on every path:
- one deadline covers connecting, the response headers and the body: a server that drips its
  headers a byte a second is cut off like one that drips its body;
- redirects are followed only to http and https (never ftp, file or others), at most 5 hops;
- credentials in the URL (`https://user:password@host/...`) are sent as HTTP basic auth, only to
  that host, and never printed: names and errors show `https://user:***@host/...`.
"""

from __future__ import annotations

import base64
import http.client
import socket
import threading
import time
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from .core.errors import InputError

DEFAULT_URL_TIMEOUT = 30.0
DEFAULT_URL_MAX_BYTES = 50 * 1024 * 1024
MAX_REDIRECTS = 5
_SCHEMES = ("http", "https")


def is_url(source: str) -> bool:
    return source[:8].lower().startswith(("http://", "https://"))


def redact(url: str) -> str:
    """The URL with its password replaced by *** (the user name is kept, to tell accounts apart)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


class _Deadline:
    """Shuts a connection's socket down when the deadline passes, which wakes a blocked read."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.seconds = seconds
        self.expired = False
        self._timer: threading.Timer | None = None

    def remaining(self) -> float:
        return max(0.001, self.end - time.monotonic())

    def watch(self, connection: http.client.HTTPConnection) -> None:
        self.cancel()
        sock = connection.sock  # taken now: the connection lets go of it once a response starts

        def expire() -> None:
            self.expired = True
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        self._timer = threading.Timer(self.remaining(), expire)
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _connection(parts, deadline: _Deadline) -> http.client.HTTPConnection:
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    try:
        port = parts.port
    except ValueError:
        raise InputError("bad port") from None
    return kind(parts.hostname, port, timeout=deadline.remaining())


def _headers(parts, credentials: tuple[str, str] | None, auth_host: str | None) -> dict:
    headers = {"User-Agent": "siglip-cli", "Accept": "image/*,*/*;q=0.5"}
    if credentials and parts.hostname == auth_host:
        token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    return headers


def _read_body(response: http.client.HTTPResponse, max_bytes: int, shown: str, deadline: _Deadline) -> bytes:
    length = response.getheader("Content-Length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise InputError(f"{shown}: {int(length):,} bytes is over the {max_bytes:,}-byte download limit")
    chunks, size = [], 0
    while size <= max_bytes:
        chunk = response.read1(min(1 << 16, max_bytes + 1 - size))  # returns what has arrived
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > max_bytes:
        raise InputError(f"{shown}: over the {max_bytes:,}-byte download limit")
    if deadline.expired:
        raise InputError(f"{shown}: download not finished within {deadline.seconds:g} s")
    return b"".join(chunks)


def fetch_url(url: str, timeout: float = DEFAULT_URL_TIMEOUT, max_bytes: int = DEFAULT_URL_MAX_BYTES) -> bytes:
    """The body of `url` (following http(s) redirects), or InputError naming the redacted URL."""
    shown = redact(url)
    deadline = _Deadline(timeout)
    first = urlsplit(url)
    credentials = (unquote(first.username or ""), unquote(first.password or "")) if first.username is not None else None
    auth_host = first.hostname
    try:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme.lower() not in _SCHEMES:
                raise InputError(f"{shown}: redirected to a {parts.scheme or 'non-http'} URL; only http and https are followed")
            if not parts.hostname:
                raise InputError(f"{shown}: no host in the URL")
            connection = _connection(parts, deadline)
            try:
                connection.connect()
                deadline.watch(connection)
                target = urlunsplit(("", "", parts.path or "/", parts.query, ""))
                connection.request("GET", target, headers=_headers(parts, credentials, auth_host))
                response = connection.getresponse()
                if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                    url = urljoin(url, response.getheader("Location"))
                    continue
                if response.status >= 400:
                    raise InputError(f"{shown}: HTTP {response.status} {response.reason}")
                return _read_body(response, max_bytes, shown, deadline)
            finally:
                deadline.cancel()
                connection.close()
        raise InputError(f"{shown}: more than {MAX_REDIRECTS} redirects")
    except InputError:
        raise
    except (TimeoutError, socket.timeout):
        raise InputError(f"{shown}: no complete answer within {timeout:g} s") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if deadline.expired:
            raise InputError(f"{shown}: download not finished within {timeout:g} s") from None
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise InputError(f"{shown}: cannot download ({reason})") from None
