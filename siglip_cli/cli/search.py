"""`siglip search`: texts and images -> the closest rows of an index that `siglip embed` wrote.

Exact search (topk.py): every row is compared with every query. The query embeddings come from
the model that made the index (queries.py). A hit's score is SigLIP's probability that the
image matches the text, sigmoid(exp(t) * cosine + b), for text-image pairs; SigLIP was never
trained to score two images (or two texts) that way, so such hits have only their cosine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from ..core.errors import UsageError
from ..core.scoring import sigmoid
from ..prompts import PLACEHOLDER
from ..results import SearchHit, SearchResult
from ..store import Store
from ..topk import top_k
from .terminal import printable

if TYPE_CHECKING:  # sources imports Pillow: a text query needs neither
    from ..sources import Listing


@dataclass
class Query:
    text: str  # what the user typed, or the image's name
    kind: str  # text | image
    vector: np.ndarray | None = None
    error: str | None = None


# A terminal escape sequence: CSI (ESC [ ... final byte, or the one-byte 0x9b) and OSC (ESC ]
# ... BEL or ESC \), as a pasted or generated query may carry them.
_ESCAPE_SEQUENCE = re.compile(r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?")


def check_text_queries(texts: Sequence[str]) -> None:
    """Refuse text queries with nothing to search for: empty, blank, only control characters
    or escape sequences (which the tokenizer drops: the query would be the bare template), or
    the bare `{}`."""
    for text in texts:
        visible = "".join(c for c in _ESCAPE_SEQUENCE.sub("", text) if c.isprintable()).strip()
        if not text.strip():
            raise UsageError("an empty text query was given (an unset shell variable?)")
        if not visible:
            raise UsageError(f"the text query \"{printable(text)}\" holds only control characters: nothing to search for")
        if visible == PLACEHOLDER:
            raise UsageError("the text query '{}' is a template's placeholder, not words to search for; "
                             "use --template to change the template")


def row_range(store: Store, include_texts: bool) -> tuple[int, int]:
    """Rows to search: the images (rows are images first, then texts), and the texts with --texts."""
    if include_texts:
        return 0, store.count
    if store.image_count == 0 and store.count:
        raise UsageError(f"{store.path}: holds only text rows ({store.count}); add --texts to search them")
    return 0, store.image_count


def embed_queries(model, texts: Sequence[str], templates: Sequence[str], images: Listing | None) -> list[Query]:
    """Text queries first, in the order given, then image queries in input order."""
    queries = [Query(text, "text") for text in texts]
    if texts:
        for query, vector in zip(queries, model.text_embeddings(texts, templates)):
            query.vector = vector
    if images is not None:
        results = model.image_embeddings(images.sources) if images.sources else []
        for failure, result in images.in_order(results):
            if failure is not None:
                queries.append(Query(failure.name, "image", error=failure.error))
            elif result.error is not None:
                queries.append(Query(result.name, "image", error=result.error))
            else:
                queries.append(Query(result.name, "image", vector=result.vector))
    return queries


def search(
    store: Store,
    model,
    texts: Sequence[str],
    templates: Sequence[str],
    images: Listing | None,
    top: int = 10,
    threshold: float | None = None,
    include_texts: bool = False,
    per_video: int | None = None,
) -> Iterator[SearchResult]:
    """One SearchResult per query, in query order: its hits best first, or its error. With
    `per_video`, at most that many frames of one video are hits (the next best rows fill in)."""
    start, stop = row_range(store, include_texts)
    queries = embed_queries(model, texts, templates, images)
    good = [q for q in queries if q.error is None]
    vectors = np.stack([q.vector for q in good]) if good else None
    # Only a store with video frames has times to read (`video` in its meta, written with them).
    times = store.times if "video" in store.meta else np.full(store.count, -1.0)
    depth = top
    while True:
        rankings = top_k(store, vectors, depth, start, stop) if good else []
        kept = [_per_video(store, ranking, per_video, top, times) for ranking in rankings]
        # a ranking cut short by --per-video looks deeper, until it fills up or the rows run out
        if per_video is None or all(len(k) >= top for k in kept) or depth >= stop - start:
            break
        depth = min(depth * 4, stop - start)
    found = dict(zip(map(id, good), kept))
    hit_rows = sorted({int(r) for rows in kept for r, _, _ in rows})
    names = dict(zip(hit_rows, store.names_at(hit_rows)))
    scale, bias = model.scale_and_bias() if good else (1.0, 0.0)
    for query in queries:
        if query.error is not None:
            yield SearchResult(query.text, error=query.error, kind=query.kind)
            continue
        yield SearchResult(query.text, _hits(store, query, found[id(query)], names, scale, bias, threshold, times), kind=query.kind,
                           threshold=threshold)


def _per_video(store: Store, ranking, per_video: int | None, top: int, times) -> list[tuple[int, int, float]]:
    """(row, place in the whole ranking, cosine) of the best `top` rows, at most `per_video`
    frames of any one video (a still is never capped)."""
    rows, cosines = ranking.rows.tolist(), ranking.cosines.tolist()
    if per_video is None:
        return list(zip(rows, range(1, len(rows) + 1), cosines))[:top]
    frames = [row for row in rows if times[row] >= 0]
    video_of = {row: name.rpartition("#t=")[0] for row, name in zip(frames, store.names_at(frames))}
    counts: dict[str, int] = {}
    kept = []
    for place, (row, cosine) in enumerate(zip(rows, cosines), 1):
        video = video_of.get(row)
        if video is not None:
            if counts.get(video, 0) >= per_video:
                continue
            counts[video] = counts.get(video, 0) + 1
        kept.append((row, place, cosine))
        if len(kept) == top:
            break
    return kept


def _hits(store: Store, query: Query, ranking: list, names: dict, scale: float, bias: float, threshold: float | None,
          times) -> list[SearchHit]:
    """A ranking as hits. The score is computed in float32 as classify computes it; a rank is
    the place in the whole ranking, so --threshold (and --per-video) never renumber."""
    cosines = np.array([c for _, _, c in ranking], dtype=np.float32)
    scores = sigmoid(cosines * np.float32(scale) + np.float32(bias))
    hits = []
    for (row, place, _), cosine, score in zip(ranking, cosines.tolist(), scores.tolist()):
        kind = store.kind(row)
        probability = score if kind != query.kind else None  # SigLIP scores only image-text pairs
        if threshold is not None and (probability if probability is not None else cosine) < threshold:
            continue
        hits.append(SearchHit(names[row], probability, cosine, place, kind, float(times[row])))
    return hits
