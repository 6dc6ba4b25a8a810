"""http(s) inputs: download an image's bytes with a deadline and a size cap.

The core decodes bytes; fetching them is the app's business (network, timeouts, limits).
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request

from .core.errors import InputError

DEFAULT_URL_TIMEOUT = 30.0
DEFAULT_URL_MAX_BYTES = 50 * 1024 * 1024


def is_url(source: str) -> bool:
    return source[:8].lower().startswith(("http://", "https://"))


def fetch_url(url: str, timeout: float = DEFAULT_URL_TIMEOUT, max_bytes: int = DEFAULT_URL_MAX_BYTES) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "siglip-cli"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise InputError(f"{url}: {int(length):,} bytes is over the {max_bytes:,}-byte download limit")
            # The timeout bounds each socket read; the deadline bounds the whole download, so a
            # server that trickles bytes cannot hold a batch job up for longer.
            deadline = time.monotonic() + timeout
            chunks, size = [], 0
            while size <= max_bytes:
                chunk = response.read1(min(1 << 16, max_bytes + 1 - size))  # returns what has arrived
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if time.monotonic() > deadline:
                    raise InputError(f"{url}: download not finished within {timeout:g} s")
            data = b"".join(chunks)
    except urllib.error.HTTPError as exc:
        raise InputError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise InputError(f"{url}: cannot download ({exc.reason})") from None
    except TimeoutError:
        raise InputError(f"{url}: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise InputError(f"{url}: cannot download ({exc})") from None
    if len(data) > max_bytes:
        raise InputError(f"{url}: over the {max_bytes:,}-byte download limit")
    return data
