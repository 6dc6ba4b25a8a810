"""What the journal costs: copying, moving and linking photos through `siglip_cli.actions`
(hash, fsynced record, temporary, fsync, verify, link into place, fsynced record) against the
plain `shutil.copy2` / `os.rename` / `os.link` a script would use, in the same run, as ratios.

    python benchmarks/actions_overhead.py [--files 200] [--size-kb 3000]

The journal reads every file twice more than a plain copy (hash first, verify after) and fsyncs
twice per step, so the ratio depends on the disk far more than on the CPU; measure on the disk
you sort on. Prints one JSON line per operation with the machine, its flags and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine  # noqa: E402
from siglip_cli.actions import Journal  # noqa: E402


def make_files(folder: Path, count: int, size: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        path = folder / f"img{i:05d}.jpg"
        path.write_bytes(os.urandom(size))
        paths.append(path)
    return paths


def plain(op: str, sources: list[Path], out: Path) -> float:
    (out / "label").mkdir(parents=True)
    start = time.perf_counter()
    for source in sources:
        target = out / "label" / source.name
        if op == "copy":
            shutil.copy2(source, target)
        elif op == "move":
            os.rename(source, target)
        else:
            os.link(source, target)
    return time.perf_counter() - start


def journaled(op: str, sources: list[Path], out: Path) -> float:
    start = time.perf_counter()
    with Journal(out) as journal:
        for source in sources:
            getattr(journal, op)(source, f"label/{source.name}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--size-kb", type=int, default=3000, help="per file (a phone JPEG is 2-5 MB)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        root = Path(tmp)
        for op in ("copy", "move", "link"):
            times = {}
            for kind, run in (("plain", plain), ("journal", journaled)):
                sources = make_files(root / f"{op}-{kind}-in", args.files, args.size_kb * 1024)
                os.sync()
                times[kind] = run(op, sources, root / f"{op}-{kind}-out")
            print(json.dumps({
                "op": op, "files": args.files, "size_kb": args.size_kb,
                "plain_s": round(times["plain"], 3), "journal_s": round(times["journal"], 3),
                "ratio": round(times["journal"] / times["plain"], 2), "machine": machine(),
            }), flush=True)


if __name__ == "__main__":
    main()
