"""A real `siglip serve` process on a free loopback port, for the API, browser and lifecycle
tests: started with `--port 0`, its port read from the line it prints on start."""

from __future__ import annotations

import os
import re
import signal as signals
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .search_fixtures import ROOT

httpx = pytest.importorskip("httpx", reason="the serve tests need the serve extra: pip install 'siglip-cli[serve]'")
pytest.importorskip("fastapi", reason="the serve tests need the serve extra: pip install 'siglip-cli[serve]'")
pytest.importorskip("uvicorn", reason="the serve tests need the serve extra: pip install 'siglip-cli[serve]'")

STARTED = re.compile(r"^siglip: serving .* at (http://\S+)/$")


class Server:
    def __init__(self, args, env: dict | None = None, cwd: Path | None = None, timeout: float = 120):
        environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        command = [sys.executable, "-m", "siglip_cli", "serve", *map(str, args)]
        if "--port" not in command:
            command += ["--port", "0"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=environment, cwd=cwd)
        self.lines: list[str] = []
        self.url: str | None = None
        started = threading.Event()

        def drain():
            for line in self.process.stderr:
                self.lines.append(line.rstrip("\n"))
                match = STARTED.match(line.rstrip("\n"))
                if match:
                    self.url = match.group(1)
                    started.set()
            started.set()

        threading.Thread(target=drain, daemon=True).start()
        started.wait(timeout)
        if self.url is None:
            self.stop()
            raise AssertionError("the server did not start:\n" + "\n".join(self.lines))
        self.client = httpx.Client(base_url=self.url, timeout=60)

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def get(self, path, **kwargs):
        return self.client.get(path, **kwargs)

    def post(self, path, **kwargs):
        return self.client.post(path, **kwargs)

    def healthy(self) -> bool:
        return self.get("/v1/health").json() == {"status": "ok"}

    def signal(self, sig=signals.SIGTERM) -> None:
        self.process.send_signal(sig)

    def stop(self, sig=signals.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "client", None) is not None:
            self.client.close()
        return self.process.returncode


def upload(path: Path, name: str | None = None, data: bytes | None = None):
    """An `image` multipart field named as the CLI names the file (its path as given)."""
    return ("image", (name or str(path), data if data is not None else Path(path).read_bytes(), "application/octet-stream"))


def wait_for(predicate, timeout: float = 30, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False
