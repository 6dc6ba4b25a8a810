"""`siglip similarity`: the cosine of any mix of images and texts, and SigLIP's probability for
each image-text pair."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

from ..results import InputFailure, Item, SimilarityMatrix
from ..sources import Listing

GROUPS = {"all": ("image", "text"), "images": ("image",), "texts": ("text",)}


def similarity(
    engine,
    listing: Listing,
    texts: Sequence[str],
    templates: Sequence[str] | None,
    rows: str = "all",
    cols: str = "all",
    on_progress: Callable[[int], None] | None = None,
) -> Iterator[InputFailure | SimilarityMatrix]:
    """The inputs that failed (as they are found), then the matrix of the others."""
    items: list[Item] = []
    vectors: list[np.ndarray] = []
    # (no images: the vision tower is never loaded)
    images = engine.iter_image_features(listing.sources, on_progress=on_progress) if listing.sources else []
    for failure, result in listing.in_order(images):
        if failure is not None:
            yield InputFailure(failure.name, failure.error)
        elif result.error is not None:
            yield InputFailure(result.name, result.error)
        else:
            items.append(Item(result.name, "image"))
            vectors.append(result.vector)
    if texts:
        items += [Item(text, "text") for text in texts]
        vectors += list(engine.embed_texts(list(texts), templates or None))
    matrix = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, engine.embed_dim), np.float32)
    row_ids = [i for i, item in enumerate(items) if item.kind in GROUPS[rows]]
    col_ids = [i for i, item in enumerate(items) if item.kind in GROUPS[cols]]
    image_ids = [i for i, item in enumerate(items) if item.kind == "image"]
    text_ids = [i for i, item in enumerate(items) if item.kind == "text"]
    has_pairs = bool(image_ids and text_ids)
    yield SimilarityMatrix(
        rows=[items[i] for i in row_ids],
        cols=[items[i] for i in col_ids],
        row_vectors=matrix[row_ids],
        col_vectors=matrix[col_ids],
        images=[items[i] for i in image_ids],
        texts=[items[i] for i in text_ids],
        image_vectors=matrix[image_ids],
        text_vectors=matrix[text_ids],
        scale=engine.logit_scale if has_pairs else 1.0,
        bias=engine.logit_bias if has_pairs else 0.0,
    )
