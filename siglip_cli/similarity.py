"""`siglip similarity`: cosine matrix over any mix of images and texts, plus SigLIP
probabilities for the image-text pairs."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np

from . import render
from .scoring import logits, sigmoid

GROUPS = {"all": ("image", "text"), "images": ("image",), "texts": ("text",)}


def run_similarity(engine, sources, texts, templates, rows: str, cols: str, output: str, error_line) -> int:
    names, kinds, vectors, errors = [], [], [], []
    features = engine.iter_image_features([s.value for s in sources], [s.name for s in sources]) if sources else []
    for item in features:  # (no images: the vision tower is never loaded)
        if item.error is not None:
            error_line(item.error)
            errors.append({"path": item.name, "error": item.error})
        else:
            names.append(item.name)
            kinds.append("image")
            vectors.append(item.vector)
    if texts:
        names += list(texts)
        kinds += ["text"] * len(texts)
        vectors += list(engine.embed_texts(texts, templates or None))
    matrix = np.stack(vectors) if vectors else np.zeros((0, engine.embed_dim), np.float32)
    row_ids = [i for i, k in enumerate(kinds) if k in GROUPS[rows]]
    col_ids = [i for i, k in enumerate(kinds) if k in GROUPS[cols]]
    cosine = matrix[row_ids] @ matrix[col_ids].T
    images = [i for i, k in enumerate(kinds) if k == "image"]
    text_ids = [i for i, k in enumerate(kinds) if k == "text"]
    pair_logits = logits(matrix[images], matrix[text_ids], engine.logit_scale, engine.logit_bias)
    pair_probs = sigmoid(pair_logits)
    image_pos = {i: p for p, i in enumerate(images)}
    text_pos = {j: q for q, j in enumerate(text_ids)}
    cells = []
    for a, i in enumerate(row_ids):
        for b, j in enumerate(col_ids):
            cell = {"row": names[i], "row_kind": kinds[i], "col": names[j], "col_kind": kinds[j],
                    "cosine": render.clean_float(cosine[a, b])}
            if kinds[i] != kinds[j]:
                image, text = (i, j) if kinds[i] == "image" else (j, i)
                p, q = image_pos[image], text_pos[text]
                cell["logit"] = render.clean_float(pair_logits[p, q])
                cell["probability"] = render.clean_float(pair_probs[p, q])
            cells.append(cell)
    out = sys.stdout
    if output == "jsonl":
        render.write_jsonl(cells + errors, out)
    elif output == "json":
        record = {
            "rows": [{"name": names[i], "kind": kinds[i]} for i in row_ids],
            "cols": [{"name": names[j], "kind": kinds[j]} for j in col_ids],
            "cosine": [[render.clean_float(v) for v in row] for row in cosine.tolist()],
            "pairs": [
                {"image": names[i], "text": names[j], "logit": render.clean_float(pair_logits[p, q]),
                 "probability": render.clean_float(pair_probs[p, q])}
                for p, i in enumerate(images) for q, j in enumerate(text_ids)
            ],
            "errors": errors,
        }
        json.dump(record, out, ensure_ascii=False, indent=2)
        out.write("\n")
    elif output == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["row", "row_kind", "col", "col_kind", "cosine", "logit", "probability", "error"])
        for c in cells:
            writer.writerow([c["row"], c["row_kind"], c["col"], c["col_kind"], c["cosine"], c.get("logit", ""), c.get("probability", ""), ""])
        for e in errors:
            writer.writerow([e["path"], "image", "", "", "", "", "", e["error"]])
    else:
        quote = lambda i: names[i] if kinds[i] == "image" else f'"{names[i]}"'  # noqa: E731
        console = render.stdout_console()
        if row_ids and col_ids:
            console.print(render.matrix_table("cosine similarity", [quote(i) for i in row_ids], [quote(j) for j in col_ids], cosine))
        if images and text_ids:
            console.print(
                render.matrix_table(
                    "SigLIP probability: sigmoid(exp(t) * cosine + b), each pair on its own",
                    [quote(i) for i in images], [quote(j) for j in text_ids], pair_probs, fmt=render.format_score,
                )
            )
    return len(errors)
