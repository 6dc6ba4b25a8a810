"""How dedupe's faiss index settings were chosen (siglip_cli/knn.py `_index_settings`): the
same synthetic rows as dedupe_knn.py (embedding-like scenes, 1% planted near-copies at cosine
0.96-0.995), faiss IVF with a given row storage, cell count and cells probed; time to train,
add and search every row, and the share of planted pairs found among each row's 16 nearest.
One process, faiss's threads on every core. Usage:

    python benchmarks/knn_settings.py 100000 flat:1024:4 fp16:1024:8
    python benchmarks/knn_settings.py 1000000 fp16:4096:4 fp16:4096:8

Each setting is STORAGE:CELLS:PROBED, STORAGE one of flat, fp16, bf16, 8bit. Needs faiss-cpu
(pip install -e '.[ann]'). Prints one JSON line per setting with the CPU, its flags and load.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine  # noqa: E402
from dedupe_knn import write_rows  # noqa: E402


def main() -> None:
    import faiss

    count, settings = int(sys.argv[1]), sys.argv[2:]
    work = Path("/tmp/siglip-knn-settings")
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"rows-{count}.npy"
    planted = write_rows(path, count, 768, max(1, count // 50), max(1, count // 100), seed=0)
    rows = np.load(path, mmap_mode="r")
    print(f"# {machine()}", flush=True)
    for setting in settings:
        storage, cells, probed = setting.split(":")
        cells, probed = int(cells), int(probed)
        start, cpu = time.perf_counter(), time.process_time()
        quantizer = faiss.IndexFlatIP(768)
        if storage == "flat":
            index = faiss.IndexIVFFlat(quantizer, 768, cells, faiss.METRIC_INNER_PRODUCT)
        else:
            kind = {"fp16": faiss.ScalarQuantizer.QT_fp16, "bf16": faiss.ScalarQuantizer.QT_bf16,
                    "8bit": faiss.ScalarQuantizer.QT_8bit}[storage]
            index = faiss.IndexIVFScalarQuantizer(quantizer, 768, cells, kind, faiss.METRIC_INNER_PRODUCT)
        sample = np.sort(np.random.default_rng(0).choice(count, min(count, 40 * cells), replace=False))
        index.train(np.ascontiguousarray(rows[sample], dtype=np.float32))
        trained = time.perf_counter() - start
        for first in range(0, count, 65536):
            index.add(np.ascontiguousarray(rows[first : first + 65536], dtype=np.float32))
        added = time.perf_counter() - start
        index.nprobe = probed
        found = np.empty((count, 17), np.int64)
        for first in range(0, count, 8192):
            _, found[first : first + 8192] = index.search(np.ascontiguousarray(rows[first : first + 8192], dtype=np.float32), 17)
        recall = sum(1 for a, b in planted if b in found[a] or a in found[b]) / len(planted)
        print(json.dumps({"setting": setting, "rows": count, "train_s": round(trained, 1), "add_s": round(added, 1),
                          "total_s": round(time.perf_counter() - start, 1), "cpu_s": round(time.process_time() - cpu, 1),
                          "planted_recall": round(recall, 4), "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                          "load": load_average()}), flush=True)


if __name__ == "__main__":
    main()
