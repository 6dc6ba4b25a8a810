"""`siglip classify`: images x labels -> SigLIP's per-label scores, image by image."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

from ..core.scoring import rank
from ..results import ImageScores, LabelScore
from ..sources import Listing


def classify(
    engine,
    listing: Listing,
    labels: Sequence[str],
    templates: Sequence[str],
    use_softmax: bool = False,
    top_k: int | None = None,
    threshold: float | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Iterator[ImageScores]:
    """One ImageScores per input, in input order: labels best first (cut by top-k and
    threshold), or the error that kept the input out."""
    text = engine.label_embeddings(labels, templates) if listing.sources else None
    images = engine.iter_image_features(listing.sources, on_progress=on_progress) if listing.sources else []
    for failure, item in listing.in_order(images):
        if failure is not None:
            yield ImageScores(path=failure.name, error=failure.error)
            continue
        if item.error is not None:
            yield ImageScores(path=item.name, error=item.error)
            continue
        logit_row = engine.logits(item.vector[None, :], text)
        probs = engine.probabilities(logit_row, use_softmax)[0]
        yield ImageScores(
            path=item.name,
            labels=[LabelScore(labels[i], float(probs[i]), float(logit_row[0, i])) for i in rank(probs, top_k, threshold)],
        )
