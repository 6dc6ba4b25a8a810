"""Exact search over a synthetic 1,000,000 x 768 index: `siglip search` as a whole process
(model load included; the text query's embedding cached, as on every repeated query) against
the obvious numpy script (`np.load` + `@` + `argsort`), and the search alone in this process.

The index is written by our own `write_store` (float32 rows, L2-normalised random vectors,
a million file names like `photos/0123/IMG_00123456.jpg`), with the meta of a full-size
base-224 checkpoint (random weights, benchmarks/common.py) so that the query is embedded by a
real model once and then comes from the cache. Runs are interleaved and repeated; medians,
min and max are printed with the machine's CPU, flags and load. Usage:

    python benchmarks/search_speed.py [--rows 1000000] [--rounds 5] [--work /tmp/siglip-bench]

It needs ~3.1 GB of disk per million 768-d rows, and as much free memory to keep the file in
the page cache (the figures are for a cached file: a cold read is the disk's speed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, build_checkpoint, load_average, machine, write_unit_rows  # noqa: E402

sys.path.insert(0, str(ROOT))

QUERY = "a red car parked in front of an old building"
DIM = 768

NUMPY_SCRIPT = """
import sys
import numpy as np
rows = np.load(sys.argv[1]{mmap})
query = np.load(sys.argv[2])
scores = rows @ query
best = np.argsort(-scores)[:10]
names = open(sys.argv[1] + ".paths.txt", encoding="utf-8").read().splitlines()
for i in best:
    print(f"{{scores[i]:.4f}} {{names[i]}}")
"""


WRAPPER = (
    "import resource, subprocess, sys, json, time\n"
    "t = time.perf_counter()\n"
    "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
    "wall = time.perf_counter() - t\n"
    "usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(json.dumps({'wall': wall, 'cpu': usage.ru_utime + usage.ru_stime, 'peak': usage.ru_maxrss / 1024,\n"
    "                  'rc': p.returncode, 'stderr': p.stderr[-2000:]}))\n"
)


def timed_process(argv: list[str], env: dict) -> dict:
    """One whole process: wall seconds, CPU seconds (user + system: on a shared machine the
    steadier figure, since the wall time depends on who else runs) and peak RSS in MB."""
    out = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    result = json.loads(out.stdout)
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result['rc']}): {result['stderr']}")
    return result


def build_index(out: str, rows: str, checkpoint: str) -> None:
    """A store as `siglip embed` writes it, made of random unit vectors (written a chunk at a
    time through a memory map, so building it needs little memory)."""
    out, rows, checkpoint = Path(out), int(rows), Path(checkpoint)
    from siglip_cli.core.logit_scalars import read_logit_scalars
    from siglip_cli.hub import resolve_model
    from siglip_cli.store import Entry, write_store

    raw = out.with_name("raw-rows.npy")
    write_unit_rows(raw, rows, DIM)
    values = np.load(raw, mmap_mode="r")
    resolved = resolve_model(str(checkpoint))
    scale, bias = read_logit_scalars(checkpoint / "model.safetensors")
    entries = [Entry("image", f"photos/{i // 1000:04d}/IMG_{i:08d}.jpg", (2_000_000 + i, 1_700_000_000_000_000_000 + i, b""), values, i)
               for i in range(rows)]
    meta = {"model": str(checkpoint), "revision": resolved.revision, "model_dtype": "fp32", "normalized": True,
            "templates": [], "logit_scale": scale, "logit_bias": bias, "images": rows, "texts": 0, "skipped_count": 0, "skipped": []}
    write_store(out, entries, DIM, "float32", meta)
    raw.unlink()


def search_in_process(index: Path, query: np.ndarray) -> tuple[float, float]:
    """(open_store, top_k + the hits' names) wall seconds, in this process, the file cached."""
    from siglip_cli.store import open_store
    from siglip_cli.topk import top_k

    start = time.perf_counter()
    store = open_store(index)
    opened = time.perf_counter()
    ranking = top_k(store, query[None, :], 10)[0]
    store.names_at(ranking.rows)
    return opened - start, time.perf_counter() - opened


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/siglip-bench"))
    args = parser.parse_args()

    checkpoint = build_checkpoint(args.work / "base224")
    index = args.work / f"search-{args.rows}.npy"
    if not index.exists():  # in a child process: this one must stay small (see write_unit_rows)
        code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import search_speed; search_speed.build_index(*sys.argv[1:])"
        subprocess.run([sys.executable, "-c", code, str(index), str(args.rows), str(checkpoint)], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    cache = args.work / "search-cache"
    env = {**os.environ, "SIGLIP_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    ours = [sys.executable, "-m", "siglip_cli", "search", str(index), QUERY, "--top-k", "10", "--format", "jsonl"]

    # Fill the text cache (the model runs once) and keep the query for the numpy scripts.
    shutil.rmtree(cache, ignore_errors=True)
    first = timed_process(ours, env)
    from siglip_cli.queries import IndexModel

    meta = json.loads(Path(f"{index}.meta.json").read_text())
    query = IndexModel(index, meta).text_embeddings([QUERY], ["This is a photo of {}."])[0]
    query_file = args.work / "search-query.npy"
    np.save(query_file, query)
    runs = {
        "siglip search (cached query)": ours,
        "numpy: np.load + @ + argsort": [sys.executable, "-c", NUMPY_SCRIPT.format(mmap=""), str(index), str(query_file)],
        "numpy: np.load(mmap_mode='r') + @": [sys.executable, "-c", NUMPY_SCRIPT.format(mmap=", mmap_mode='r'"), str(index), str(query_file)],
    }
    for argv in runs.values():  # warm the page cache
        timed_process(argv, env)
    load_before = load_average()
    found: dict[str, list[dict]] = {name: [] for name in runs}
    opening: list[float] = []
    searching: list[float] = []
    for _ in range(args.rounds):
        for name, argv in runs.items():
            found[name].append(timed_process(argv, env))
        opened, searched = search_in_process(index, query)
        opening.append(opened)
        searching.append(searched)
    load_after = load_average()

    print(f"exact search, {args.rows:,} x {DIM} float32 rows ({index.stat().st_size / 1e9:.2f} GB, in the page cache), "
          f"one text query, top 10, {args.rounds} rounds interleaved")
    print(f"machine: {machine()}; before: {load_before}; after: {load_after}")
    print(f"(first siglip run, empty cache, the query embedded by the base-224 model: {first['wall']:.2f} s)")
    base = statistics.median(r["wall"] for r in found["numpy: np.load + @ + argsort"])
    print(f"{'run':40} {'median s':>9} {'min s':>7} {'max s':>7} {'CPU s':>6} {'peak MB':>8} {'time vs numpy':>14}")
    for name, results in found.items():
        walls = [r["wall"] for r in results]
        median = statistics.median(walls)
        cpu = statistics.median(r["cpu"] for r in results)
        peak = statistics.median(r["peak"] for r in results)
        print(f"{name:40} {median:9.2f} {min(walls):7.2f} {max(walls):7.2f} {cpu:6.2f} {peak:8.0f} {median / base:13.2f}x")
    print("in this process, the same query (wall s):")
    for name, values in (("  open_store (meta, names, checks)", opening), ("  top_k + the hits' names", searching)):
        print(f"{name:40} {statistics.median(values):9.3f} {min(values):7.3f} {max(values):7.3f}")


if __name__ == "__main__":
    main()
