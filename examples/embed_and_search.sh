#!/usr/bin/env bash
# Embed a folder, then find the images closest to a text with numpy. Run from the repository root.
set -euo pipefail
MODEL=${MODEL:-google/siglip-base-patch16-224}
FOLDER=${1:-examples}

siglip embed "$FOLDER" --out /tmp/vecs.npy --model "$MODEL"
siglip embed --text "two cats on a sofa" --format jsonl --model "$MODEL" > /tmp/query.jsonl

python3 - <<'PY'
import json, numpy as np
vectors = np.load("/tmp/vecs.npy")
paths = open("/tmp/vecs.paths.txt").read().splitlines()
query = np.array(json.loads(open("/tmp/query.jsonl").readline())["embedding"], dtype=np.float32)
for i in np.argsort(-(vectors @ query))[:5]:
    print(f"{float(vectors[i] @ query):.3f}  {paths[i]}")
PY
