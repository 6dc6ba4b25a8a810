"""Peak memory of the store's paths (Parquet by default; any format with --format) as the row
count grows: writing a store, searching it, and copying its rows into a new store as `--update`
does. Each step runs in a fresh process
(its peak RSS is the figure); flat memory means the peak does not grow with the rows (apart from
the names, ~40 bytes a row here). Usage:

    python benchmarks/store_memory.py [--rows 100000,400000] [--dim 768] [--work /tmp/siglip-bench]
    python benchmarks/store_memory.py --format jsonl --rows 20000   # an exchange format, read whole
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine  # noqa: E402

from siglip_cli.store import output_files  # noqa: E402

STEP = r"""
import resource, sys, time
import numpy as np
from siglip_cli.store import Entry, open_store, write_store
from siglip_cli.topk import top_k

from pathlib import Path
step, source, out, rows, dim = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
start = time.perf_counter()
if step == "write":
    values = np.load(source, mmap_mode="r")
    entries = [Entry("image", f"photos/{i // 1000:04d}/IMG_{i:08d}.jpg", (1, 1, b""), values, i) for i in range(rows)]
    write_store(out, entries, dim, "float32", {"model": "m", "revision": "r", "normalized": True})
elif step == "search":
    store = open_store(out)
    query = np.ones(dim, np.float32) / np.sqrt(dim)
    store.names_at(top_k(store, query[None], 10)[0].rows)
else:  # copy every row of the store into a new one, as --update keeps unchanged rows
    store = open_store(source)
    names = store.names
    entries = [Entry("image", name, (1, 1, b""), store.row_source, i) for i, name in enumerate(names)]
    write_store(out, entries, dim, "float32", {"model": "m", "revision": "r"})
import pyarrow as pa
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, pa.default_memory_pool().max_memory() / 2**20)
"""


def random_rows(path: Path, rows: int, dim: int) -> None:
    """Made by a child process, so that this one stays small (see write_unit_rows)."""
    if not path.exists():
        code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from common import write_unit_rows; write_unit_rows(*sys.argv[1:2], *map(int, sys.argv[2:]))"
        subprocess.run([sys.executable, "-c", code, str(path), str(rows), str(dim)], check=True)


def step(name: str, source: Path, out: Path, rows: int, dim: int) -> tuple[float, float, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", STEP, name, str(source), str(out), str(rows), str(dim)],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"step {name} failed:\n{result.stderr}")
    seconds, peak, arrow = result.stdout.split()
    return float(seconds), float(peak), float(arrow)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="100000,400000")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--work", type=Path, default=Path("/tmp/siglip-bench"))
    parser.add_argument("--format", default="parquet", choices=["parquet", "npy", "npz", "jsonl"])
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f".{args.format} store, {args.dim}-d float32 rows, each step in its own process; {machine()}")
    print("MB: peak RSS (the rows a step reads through a memory map count in it) / peak of pyarrow's buffers")
    print(f"{'rows':>9} {'file MB':>8} {'write s':>8} {'write MB':>12} {'search s':>9} {'search MB':>12} {'copy s':>7} {'copy MB':>12}")
    for rows in [int(r) for r in args.rows.split(",")]:
        source = args.work / f"memory-rows-{rows}x{args.dim}.npy"
        random_rows(source, rows, args.dim)
        out, copy = args.work / f"memory-{rows}.{args.format}", args.work / f"memory-{rows}-copy.{args.format}"
        write = step("write", source, out, rows, args.dim)
        search = step("search", source, out, rows, args.dim)
        copied = step("copy", out, copy, rows, args.dim)
        cells = [f"{seconds:{width}.{digits}f} {f'{peak:.0f} / {arrow:.0f}':>12}"
                 for (seconds, peak, arrow), width, digits in ((write, 8, 1), (search, 9, 2), (copied, 7, 1))]
        print(f"{rows:9,} {out.stat().st_size / 1e6:8.0f} {' '.join(cells)}")
        for path in (out, copy):
            for part in output_files(path):
                part.unlink()


if __name__ == "__main__":
    main()
