"""siglip-cli: zero-shot image classification, embeddings and similarity with SigLIP.

    >>> import siglip_cli
    >>> model = siglip_cli.load("google/siglip-base-patch16-224")
    >>> model.classify(["cat.jpg"], ["2 cats", "2 dogs"])   # (1, 2) sigmoid probabilities

Importing this package is cheap: torch loads on the first call of `load()`.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(name_or_path=None, **kwargs):
    """Open a SigLIP checkpoint; see `siglip_cli.engine.load` for the options."""
    from .engine import load as _load

    return _load(name_or_path, **kwargs)
