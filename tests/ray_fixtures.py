"""Helpers for the `--engine ray` tests: a folder of ~100 images with bad files among them, a
real Ray head started for a test module (and stopped by its own process id), and a way to find
the worker actors' processes."""

from __future__ import annotations

import io
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .conftest import random_image

ACTOR_TITLE = "ray::MapWorker(MapBatches(ShardEmbedder))"


def make_mixed_images(folder: Path, good: int = 96, size=(1200, 900)) -> Path:
    """`good` JPEGs, large enough that decoding takes a few milliseconds each (so a run lasts
    long enough to be interrupted), with four unreadable files among them in sorted order."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(good):
        random_image(i, size).save(folder / f"{i:03d}.jpg", quality=85)
    buffer = io.BytesIO()
    random_image(999, (64, 64)).save(buffer, format="JPEG")
    (folder / "010-truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "040-notes.jpg").write_text("this is not a picture\n")
    (folder / "070-empty.png").write_bytes(b"")
    Image.new("1", (12000, 12000)).save(folder / "090-bomb.png")  # over the default --max-pixels
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RayHead:
    """`ray start --head --block` with 2 CPUs: a real one-node cluster that drivers reach through
    RAY_ADDRESS. Stopped by signalling the process we started, which stops its children."""

    def __init__(self, temp: Path):
        self.port = free_port()
        # no 30 s drain on SIGTERM (ray start waits for a graceful handover meant for services)
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        self.log = open(temp / "ray-head.log", "w")
        ray = Path(sys.executable).with_name("ray")
        self.process = subprocess.Popen(
            [str(ray), "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0", "--port", str(self.port),
             "--node-ip-address", "127.0.0.1", "--include-dashboard", "false", "--disable-usage-stats"],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
        )
        self.address = f"127.0.0.1:{self.port}"
        self._wait_ready(temp / "ray-head.log")

    def _wait_ready(self, log: Path, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if "will now block" in log.read_text(errors="replace"):
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start failed: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        raise RuntimeError("ray start did not come up in time")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(parent, []).append(int(entry))
    return tree


def worker_actors(root: int) -> list[int]:
    """Process ids of our Ray actors among the descendants of `root`."""
    tree, found, stack = _children(), [], [root]
    while stack:
        pid = stack.pop()
        for child in tree.get(pid, []):
            stack.append(child)
            try:
                title = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith(ACTOR_TITLE):
                found.append(child)
    return found


def run_on_a_terminal(argv: list[str], env: dict, timeout: float = 300) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal, so that progress bars show, collecting what is
    written there as it comes (a full pty buffer would block the process)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=follower, env=env)
    os.close(follower)
    output = bytearray()
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if select.select([leader], [], [], 0.2)[0]:
                try:
                    data = os.read(leader, 65536)
                except OSError:  # EIO: every writer has closed its side
                    break
                if not data:
                    break
                output += data
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=10), output.decode(errors="replace")
    finally:
        os.close(leader)
