"""Peak memory of a whole `siglip classify` run on each image bomb of the test corpus
(tests/bomb_fixtures.py) against one ordinary image, with the tiny random checkpoint the tests
use (a bigger model adds the same to every run). Each run is a fresh process; the figure is its
peak RSS as the kernel counts it. Goal (issue 17, item 15): every bomb within 50 MB of the
ordinary run. Usage:

    python benchmarks/bomb_memory.py [--work /tmp/siglip-bombs]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import load_average, machine  # noqa: E402

from tests.bomb_fixtures import corpus, siglip_peak  # noqa: E402


def tiny_checkpoint(folder: Path) -> Path:
    """The test suite's tiny SigLIP (transformers' own save_pretrained, random weights)."""
    from tests.conftest import build_checkpoint

    spiece = Path(__file__).resolve().parent.parent / "tests" / "data" / "test_sentencepiece_no_bos.model"
    if not (folder / "tiny" / "config.json").exists():
        build_checkpoint(folder / "tiny", spiece, text={"vocab_size": 1000})  # the vocabulary's size
    return folder / "tiny"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/siglip-bombs"))
    args = parser.parse_args()
    files = corpus(args.work / "corpus")
    env = {"SIGLIP_MODEL": str(tiny_checkpoint(args.work)), "SIGLIP_CACHE_DIR": str(args.work / "cache")}
    print(machine())  # CPU, flags and load
    base = None
    for name, path in files.items():
        run = siglip_peak(["classify", path, "--labels", "a cat,a dog", "--json", "--max-pixels", "10000000"], env)
        if name == "ordinary.png":
            if run["rc"] != 0:
                raise SystemExit(f"the ordinary run failed: {run['stderr']}")
            base = run["peak_mb"]
        extra = f"{run['peak_mb'] - base:+.0f} MB vs ordinary.png" if base is not None else ""
        print(f"{name:18} exit {run['rc']}  peak {run['peak_mb']:6.0f} MB  {extra}")
    print(f"after: {load_average()}")


if __name__ == "__main__":
    main()
