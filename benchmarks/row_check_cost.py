"""What checking each row as it is read costs a search (store.check_rows: numbers, and length 1
in a normalized store): `top_k` over a synthetic normalized index with the check, against the
same search scoring as before the check (no row lengths computed), interleaved in one process,
the file in the page cache.

    python benchmarks/row_check_cost.py [--rows 300000] [--dim 768] [--rounds 5] [--queries 1]

Prints the median seconds of each and their ratio, with the machine's CPU, flags and load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine, write_unit_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/siglip-bench"))
    args = parser.parse_args()

    from siglip_cli import topk
    from siglip_cli.store import Entry, open_store, write_store

    args.work.mkdir(parents=True, exist_ok=True)
    source = args.work / f"check-rows-{args.rows}x{args.dim}.npy"
    if not source.exists():
        write_unit_rows(source, args.rows, args.dim)
    index = args.work / f"check-index-{args.rows}x{args.dim}.npy"
    if not index.exists():
        values = np.load(source, mmap_mode="r")
        write_store(index, [Entry("image", f"img{i}.jpg", (1, 1, b""), values, i) for i in range(args.rows)],
                    args.dim, "float32", {"model": "m", "revision": "r", "normalized": True})
    queries = np.random.default_rng(1).standard_normal((args.queries, args.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    checked = topk._cosines

    def unchecked(store, first, block, queries, normalized):
        """The scores as before the check: no row lengths for a normalized store."""
        rows = block if block.dtype == np.float32 else block.astype(np.float32)
        scores = np.vecdot(rows, queries[0])[:, None] if len(queries) == 1 else np.vecdot(rows[:, None, :], queries[None, :, :])
        return scores

    def run(check: bool) -> float:
        topk._cosines = checked if check else unchecked
        store = open_store(index)
        start = time.perf_counter()
        topk.top_k(store, queries, 10)
        return time.perf_counter() - start

    print(f"# {machine()}; {args.rows} x {args.dim} float32 rows, {args.queries} queries; before: {load_average()}")
    run(True), run(False)  # the file into the page cache
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for check in (False, True):
            times[check].append(run(check))
    with_check, without = statistics.median(times[True]), statistics.median(times[False])
    print(f"without the check {without:.3f} s, with it {with_check:.3f} s (medians of {args.rounds}): ratio {with_check / without:.2f}x")
    print(f"# after: {load_average()}")


if __name__ == "__main__":
    main()
