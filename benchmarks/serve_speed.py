"""`siglip serve` against the same work without it, on a full-size base-224 checkpoint (random
weights, benchmarks/common.py), in the product's default mode (`--dtype auto`: bf16 on CPUs
with native bf16, else fp32) unless `--dtype` says otherwise:

1. warm /v1/classify of one COCO-size JPEG (labels cached): p50 of the HTTP round trip against
   the in-process engine's time for the same image and labels (decode + forward + scores),
   and against a cold `siglip classify` process of the same image;
2. 32 concurrent clients, one image per request: total images/s (and p50/p95 latency) against
   `siglip embed`'s own images/s on the same images;
3. /v1/search over a 1,000,000 x 768 index (random unit rows, search_speed.py's builder): p50
   of a cached text query;
4. the server's resident set before and after N requests in a row (/v1/classify of a small
   image and /v1/embed of a text, alternating).

Every figure is printed with the CPU, its flags and the load. Usage:

    python benchmarks/serve_speed.py [--rows 1000000] [--memory-requests 10000] [--work /tmp/siglip-bench]
"""

from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, build_checkpoint, load_average, machine, make_jpegs, run_process  # noqa: E402

sys.path.insert(0, str(ROOT))

LABELS = "a cat,a dog,a car,a beach,a mountain,a plate of food,a person,a building"
STARTED = re.compile(r"serving .* at (http://\S+)/")


def start_server(args: list[str], env: dict) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "siglip_cli", "serve", "--port", "0", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        match = STARTED.search(line)
        if match:
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()  # keep draining
            return process, match.group(1)
    raise RuntimeError("the server did not start")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(120)


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU seconds so far: on a shared, loaded machine a steadier
    figure than wall time, which depends on who else runs."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def say(text: str) -> None:
    print(f"{text}  [{load_average()}]", flush=True)


def memory(args, server: subprocess.Popen, client) -> None:
    """4. The server's resident set over `--memory-requests` requests in a row (classify of a
    small image and embed of a text, alternating), after 100 of them as a warm-up (first-use
    buffers are not a leak); the RSS every tenth of the way, so a slope shows."""
    small = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 40, 40)).save(small, format="JPEG")
    small_bytes = small.getvalue()

    def request(number: int) -> None:
        if number % 2:
            client.post("/v1/embed", data={"text": "a red car"}).raise_for_status()
        else:
            client.post("/v1/classify", data={"labels": LABELS}, files=[("image", ("s.jpg", small_bytes))]).raise_for_status()

    for number in range(100):
        request(number)
    start_rss = rss_mb(server.pid)
    start = time.perf_counter()
    marks = []
    step = max(1, args.memory_requests // 10)
    for number in range(args.memory_requests):
        request(number)
        if (number + 1) % step == 0:
            marks.append(round(rss_mb(server.pid)))
    end_rss = rss_mb(server.pid)
    say(f"memory: RSS {start_rss:.0f} MB before {args.memory_requests} requests (after 100 to warm up), {end_rss:.0f} MB after "
        f"({(end_rss / start_rss - 1) * 100:+.1f}%), {time.perf_counter() - start:.0f} s; every {step}: {marks}")


def main() -> None:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--images", type=int, default=128, help="images sent by the concurrent clients in all")
    parser.add_argument("--memory-requests", type=int, default=10_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/siglip-bench"))
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--only-single", action="store_true", help="only the one-image figures (1.)")
    parser.add_argument("--only-memory", action="store_true", help="only the resident-set figure (4.)")
    parser.add_argument("--dtype", default="auto", help="the mode of the server, the engine and the cold run alike: auto (the "
                        "product's default: bf16 on CPUs with native bf16), fp32, bf16, int8")
    args = parser.parse_args()

    print(f"# {machine()}")
    checkpoint = build_checkpoint(args.work / "base224")
    photos = make_jpegs(args.work / "serve-jpegs", max(args.images, 8))
    photo = photos[0]
    cache = args.work / "serve-cache"
    env = {**os.environ, "SIGLIP_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    common = ["--model", str(checkpoint), "--dtype", args.dtype]
    print(f"# dtype {args.dtype}", flush=True)

    # ---------------------------------------------------------------- 1. one image, warm
    server, url = start_server(common, env)
    client = httpx.Client(base_url=url, timeout=600)
    data = photo.read_bytes()
    if args.only_memory:
        memory(args, server, client)
        client.close()
        stop(server)
        return

    def classify_once() -> float:
        start = time.perf_counter()
        response = client.post("/v1/classify", data={"labels": LABELS}, files=[("image", (photo.name, data))])
        response.raise_for_status()
        return time.perf_counter() - start

    for _ in range(3):
        classify_once()
    http = [classify_once() for _ in range(args.repeats)]

    os.environ["SIGLIP_CACHE_DIR"] = str(cache)
    from siglip_cli import load
    from siglip_cli.prompts import DEFAULT_TEMPLATE
    from siglip_cli.runtime import keep_freed_memory

    keep_freed_memory()  # as every command (and the server) does: otherwise each pass page-faults afresh
    engine = load(str(checkpoint), dtype=args.dtype, batch_size=1, workers=0)
    labels = LABELS.split(",")

    def engine_work() -> float:
        start = time.perf_counter()
        text = engine.label_embeddings(labels, [DEFAULT_TEMPLATE])
        vector = engine.embed_images([str(photo)])
        engine.probabilities(engine.logits(vector, text))
        return time.perf_counter() - start

    # Measured on the loaded 2-core development machine: the same forward pass took 4-5 s of
    # wall time (1.5-2 CPU s) from the main thread and 0.6-0.75 s (0.45 CPU s) from another
    # thread (as the server's batcher runs it); flush-to-zero changed nothing. So the reference
    # runs on a thread of its own too, or the server would look faster than the engine it uses.
    reference_thread = ThreadPoolExecutor(1)

    def engine_once() -> float:
        return reference_thread.submit(engine_work).result()

    for _ in range(3):
        engine_once()
    # interleaved with HTTP rounds, so that both see the same load
    in_process, http2, cpu_in_process, cpu_server = [], [], [], []
    for _ in range(args.repeats):
        before_cpu = cpu_seconds(os.getpid())
        in_process.append(engine_once())
        cpu_in_process.append(cpu_seconds(os.getpid()) - before_cpu)
        before_cpu = cpu_seconds(server.pid)
        http2.append(classify_once())
        cpu_server.append(cpu_seconds(server.pid) - before_cpu)
    http += http2
    cold = [run_process([sys.executable, "-m", "siglip_cli", "classify", str(photo), "--labels", LABELS, *common, "--json"], env=env)["wall"]
            for _ in range(3)]
    p50_http, p50_engine, cold_median = statistics.median(http), statistics.median(in_process), statistics.median(cold)
    say(f"classify one {photo.stat().st_size // 1000} KB 640x480 JPEG, {len(labels)} labels cached: /v1/classify p50 {p50_http * 1000:.1f} ms; "
        f"in-process engine p50 {p50_engine * 1000:.1f} ms ({p50_http / p50_engine:.2f}x); cold `siglip classify` median "
        f"{cold_median:.2f} s ({cold_median / p50_http:.1f}x slower than the warm server); CPU seconds per image: server "
        f"{statistics.median(cpu_server) * 1000:.0f} ms, in-process {statistics.median(cpu_in_process) * 1000:.0f} ms "
        f"({statistics.median(cpu_server) / statistics.median(cpu_in_process):.2f}x)")

    if args.only_single:
        stop(server)
        return

    # ---------------------------------------------------------------- 2. 32 clients
    sent = photos[: args.images]

    def one(path: Path) -> float:
        with httpx.Client(base_url=url, timeout=600) as session:
            start = time.perf_counter()
            session.post("/v1/embed", files=[("image", (path.name, path.read_bytes()))]).raise_for_status()
            return time.perf_counter() - start

    before = client.get("/v1/info").json()
    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        latencies = list(pool.map(one, sent))
    elapsed = time.perf_counter() - start
    after = client.get("/v1/info").json()
    batches = after["batches"] - before["batches"]
    served_rate = len(sent) / elapsed
    embed = run_process([sys.executable, "-m", "siglip_cli", "embed", *map(str, sent), "--out", str(args.work / "serve-embed.npy"), *common], env=env)
    embed_rate = float(re.search(r"([\d.]+) images/s", embed["stderr"]).group(1))
    say(f"{args.clients} concurrent clients, {len(sent)} single-image requests: {served_rate:.1f} images/s "
        f"(p50 {percentile(latencies, 50) * 1000:.0f} ms, p95 {percentile(latencies, 95) * 1000:.0f} ms, "
        f"{len(sent) / max(batches, 1):.1f} images per forward pass); `siglip embed` {embed_rate:.1f} images/s "
        f"({served_rate / embed_rate:.2f}x)")

    memory(args, server, client)
    client.close()
    stop(server)

    # ---------------------------------------------------------------- 3. search 1M x 768
    if args.skip_search:
        return
    index = args.work / f"search-{args.rows}.npy"
    if not index.exists():
        code = ("import sys; sys.path.insert(0, %r); import search_speed; search_speed.build_index(*sys.argv[1:])" % str(Path(__file__).parent))
        subprocess.run([sys.executable, "-c", code, str(index), str(args.rows), str(checkpoint)], check=True, env=env)
    server, url = start_server([str(index), "--model", str(checkpoint)], env)
    with httpx.Client(base_url=url, timeout=600) as session:
        def search_once() -> float:
            begin = time.perf_counter()
            session.get("/v1/search", params={"q": "a red car parked in front of an old building", "k": 10}).raise_for_status()
            return time.perf_counter() - begin

        for _ in range(2):
            search_once()
        times = [search_once() for _ in range(args.repeats)]
    say(f"/v1/search over {args.rows:,} x 768 rows (float32, page-cached), cached text query: p50 {statistics.median(times) * 1000:.0f} ms, "
        f"min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f}; server RSS {rss_mb(server.pid):.0f} MB")
    stop(server)


if __name__ == "__main__":
    main()
