"""`GET /v1/health` on one kept-alive connection against a new connection per request: the
two should cost about the same. Before the listening socket was created as IPPROTO_TCP (so that
asyncio sets TCP_NODELAY), every request after the first on a kept-alive connection waited
~40 ms for the client's delayed ACK (docs/serve.md#speed). Usage:

    python benchmarks/serve_keepalive.py [--model FOLDER]

Builds the full-size base-224 checkpoint (random weights) unless --model is given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, build_checkpoint, machine  # noqa: E402
from serve_speed import start_server, stop  # noqa: E402


def main() -> None:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    model = args.model or build_checkpoint(Path("/tmp/siglip-bench/base224"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    server, url = start_server(["--model", str(model)], env)
    try:
        def timed(call) -> float:
            start = time.perf_counter()
            call()
            return time.perf_counter() - start

        with httpx.Client(base_url=url) as kept:
            kept.get("/v1/health")
            same = [timed(lambda: kept.get("/v1/health").raise_for_status()) for _ in range(args.repeats)]
        fresh = []
        for _ in range(args.repeats):
            with httpx.Client(base_url=url) as client:
                fresh.append(timed(lambda: client.get("/v1/health").raise_for_status()))
        print(f"# {machine()}")
        print(f"/v1/health p50: {statistics.median(same) * 1000:.1f} ms on one kept-alive connection, "
              f"{statistics.median(fresh) * 1000:.1f} ms on a new connection each")
    finally:
        stop(server)


if __name__ == "__main__":
    main()
