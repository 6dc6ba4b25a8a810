"""What absolute paths cost `embed --update`: the time to check a store's names against the
inputs (`settle_stored_paths`, run twice per update: once before the model loads, once under the
output's lock), as a ratio to `Store.image_rows()`, the name -> row map every update builds
anyway, measured in the same process. Two stores: one with absolute names (today's), one with
relative names (written before; every row is read against a folder). No model, no images:
the inputs are listed as Sources with the same names. Usage:

    python benchmarks/update_paths.py [--rows 1000000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import machine  # noqa: E402

import numpy as np  # noqa: E402

from siglip_cli.embedding import EmbedPlan, settle_stored_paths  # noqa: E402
from siglip_cli.sources import Source  # noqa: E402
from siglip_cli.store import Entry, open_store, write_store  # noqa: E402


def best_of(rounds: int, work) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        relative = [f"photos/{i // 1000:04d}/IMG_{i:08d}.jpg" for i in range(args.rows)]
        absolute = [os.path.join(folder, name) for name in relative]
        rows = np.zeros((args.rows, 4), np.float32)
        plan = EmbedPlan([Source(name, name, (1, 1)) for name in absolute])
        os.chdir(folder)
        for label, names in (("absolute", absolute), ("relative", relative)):
            out = folder / f"{label}.npy"
            entries = [Entry("image", name, (1, 1, b""), rows, i) for i, name in enumerate(names)]
            write_store(out, entries, 4, "float32", {"model": "m", "revision": "r"})
            store = open_store(out)
            reference = best_of(args.rounds, lambda: open_store(out).image_rows())
            checked = best_of(args.rounds, lambda: settle_stored_paths(open_store(out), plan, None, lambda m: None))
            print(f"{label:>8} names, {args.rows:,} rows: settle_stored_paths {checked:.3f} s, image_rows {reference:.3f} s, "
                  f"ratio {checked / reference:.2f}x (best of {args.rounds})")
            assert len(settle_stored_paths(store, plan, None, lambda m: None).image_rows()) == args.rows
    print(machine().rsplit(";", 2)[-2].strip(), "(after)")


if __name__ == "__main__":
    main()
