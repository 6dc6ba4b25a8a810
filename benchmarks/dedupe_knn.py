"""The neighbour step of `siglip dedupe` (knn.self_neighbours) on synthetic unit rows with
planted near-copies: time, peak memory, and recall of the planted pairs and of the exact
method's pairs on a sample of rows.

The rows imitate image embeddings rather than uniform noise (on which every index is at its
worst and no photo library lies): `--clusters` random "scene" directions, each row a scene
direction plus noise (cosine ~0.5-0.7 between rows of one scene, ~0 across scenes), then
`--planted` rows replaced by near-copies of others at cosine 0.96-0.995 (re-encodes, resizes).
Each method runs in a child process of its own, so that its peak resident memory is its own;
the rows are a float32 .npy file, memory-mapped as a store's rows are. Usage:

    nice python benchmarks/dedupe_knn.py --rows 100000 --methods exact,approximate
    nice python benchmarks/dedupe_knn.py --rows 1000000 --methods approximate --sample 1000

Prints one JSON line per method with the machine's CPU, flags and load (see docs/dedupe.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cpu_flags, load_average, machine  # noqa: E402

FLOOR = 0.95
K = 16
REUSE_CHECK_MAX_ROWS = 200_000  # above this the second run (saved index reused) is skipped: it costs the whole search again

CHILD = """
import json, resource, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from siglip_cli import knn
rows = np.load(sys.argv[2], mmap_mode="r")
method, out = sys.argv[3], sys.argv[4]
index = sys.argv[5] if len(sys.argv) > 5 else None
start = time.perf_counter()
from pathlib import Path
found = knn.self_neighbours(rows, %d, %r, method, Path(index) if index else None, "bench" if index else None)
elapsed = time.perf_counter() - start
np.save(out, found.indices)
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": elapsed, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_mb": usage.ru_maxrss / 1024}))
""" % (K, FLOOR)


def write_rows(path: Path, count: int, dim: int, clusters: int, planted: int, seed: int) -> np.ndarray:
    """The rows, written in pieces (flat memory); returns the planted (a, b) pairs."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    rows = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(count, dim))
    for start in range(0, count, 65536):
        n = min(65536, count - start)
        block = centers[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim)).astype(np.float32) * (0.9 / np.sqrt(dim))
        rows[start : start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
    chosen = rng.choice(count, (planted, 2), replace=False)
    for a, b in chosen:
        noise = rng.standard_normal(dim).astype(np.float32)
        noise -= (noise @ rows[a]) * rows[a]
        noise /= np.linalg.norm(noise)
        cosine = rng.uniform(0.96, 0.995)
        rows[b] = cosine * rows[a] + np.sqrt(1 - cosine**2) * noise
    rows.flush()
    return np.sort(chosen, axis=1)


def exact_pairs_of_sample(rows: np.ndarray, sample: np.ndarray) -> set[tuple[int, int]]:
    """Every pair (sample row, other row) at or above the floor, by brute force."""
    pairs = set()
    queries = np.asarray(rows[sample], np.float32)
    for start in range(0, len(rows), 65536):
        scores = queries @ np.asarray(rows[start : start + 65536], np.float32).T
        for i, j in zip(*np.nonzero(scores >= FLOOR)):
            if sample[i] != start + j:
                pairs.add((int(sample[i]), int(start + j)))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--clusters", type=int, default=0, help="default: rows / 50")
    parser.add_argument("--planted", type=int, default=0, help="default: rows / 100")
    parser.add_argument("--methods", default="exact,approximate")
    parser.add_argument("--sample", type=int, default=1000, help="rows whose exact pairs are checked")
    parser.add_argument("--work", type=Path, default=Path("/tmp/siglip-dedupe-bench"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    clusters = args.clusters or max(1, args.rows // 50)
    planted_count = args.planted or max(1, args.rows // 100)
    path = args.work / f"rows-{args.rows}x{args.dim}.npy"
    started = time.perf_counter()
    planted = write_rows(path, args.rows, args.dim, clusters, planted_count, seed=0)
    made = time.perf_counter() - started
    rows = np.load(path, mmap_mode="r")
    sample = np.random.default_rng(1).choice(args.rows, min(args.sample, args.rows), replace=False)
    truth = exact_pairs_of_sample(rows, sample)
    for method in args.methods.split(","):
        out = args.work / f"found-{method}.npy"
        index = args.work / f"rows-{args.rows}.faiss"
        for leftover in (index, index.with_name(index.name + ".json")):
            leftover.unlink(missing_ok=True)
        argv = [sys.executable, "-c", CHILD, str(ROOT), str(path), method, str(out)] + ([str(index)] if method == "approximate" else [])
        load_before = load_average()
        child = subprocess.run(argv, capture_output=True, text=True)
        if child.returncode:
            print(child.stderr, file=sys.stderr)
            continue
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        found = np.load(out)
        neighbours = [set(r[r >= 0].tolist()) for r in found]
        planted_found = sum(1 for a, b in planted if b in neighbours[a] or a in neighbours[b])
        sample_found = sum(1 for a, b in truth if b in neighbours[a] or a in neighbours[b])
        reused = None
        if method == "approximate" and args.rows <= REUSE_CHECK_MAX_ROWS:  # a second run reuses the saved index
            again = subprocess.run(argv, capture_output=True, text=True)
            reused = json.loads(again.stdout.strip().splitlines()[-1])["seconds"] if again.returncode == 0 else None
        print(json.dumps({
            "method": method, "rows": args.rows, "dim": args.dim, "clusters": clusters,
            "seconds": round(measured["seconds"], 1), "cpu_seconds": round(measured["cpu_seconds"], 1),
            "seconds_with_saved_index": round(reused, 1) if reused else None,
            "peak_mb": round(measured["peak_mb"]), "rows_mb": round(path.stat().st_size / 2**20),
            "index_mb": round(index.stat().st_size / 2**20) if index.exists() else None,
            "planted_recall": round(planted_found / len(planted), 4), "planted": len(planted),
            "sample_exact_pairs": len(truth), "sample_recall": round(sample_found / len(truth), 4) if truth else None,
            "rows_written_s": round(made, 1), "load_before": load_before, "load_after": load_average(), "machine": machine(), "cpu_flags": cpu_flags(),
        }), flush=True)


if __name__ == "__main__":
    main()
