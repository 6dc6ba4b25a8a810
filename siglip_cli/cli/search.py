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
) -> Iterator[SearchResult]:
    """One SearchResult per query, in query order: its hits best first, or its error."""
    start, stop = row_range(store, include_texts)
    queries = embed_queries(model, texts, templates, images)
    good = [q for q in queries if q.error is None]
    rankings = top_k(store, np.stack([q.vector for q in good]), top, start, stop) if good else []
    found = dict(zip(map(id, good), rankings))
    hit_rows = sorted({int(r) for ranking in rankings for r in ranking.rows})
    names = dict(zip(hit_rows, store.names_at(hit_rows)))
    scale, bias = model.scale_and_bias() if good else (1.0, 0.0)
    for query in queries:
        if query.error is not None:
            yield SearchResult(query.text, error=query.error, kind=query.kind)
            continue
        yield SearchResult(query.text, _hits(store, query, found[id(query)], names, scale, bias, threshold), kind=query.kind,
                           threshold=threshold)


def _hits(store: Store, query: Query, ranking, names: dict, scale: float, bias: float, threshold: float | None) -> list[SearchHit]:
    """A ranking as hits. The score is computed in float32 as classify computes it; a rank is
    the place in the whole ranking, so --threshold never renumbers."""
    cosines = ranking.cosines.astype(np.float32)
    scores = sigmoid(cosines * np.float32(scale) + np.float32(bias))
    hits = []
    for place, (row, cosine, score) in enumerate(zip(ranking.rows.tolist(), cosines.tolist(), scores.tolist()), 1):
        kind = store.kind(row)
        probability = score if kind != query.kind else None  # SigLIP scores only image-text pairs
        if threshold is not None and (probability if probability is not None else cosine) < threshold:
            continue
        hits.append(SearchHit(names[row], probability, cosine, place, kind))
    return hits
