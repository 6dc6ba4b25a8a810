"""Plain results the engine returns to the CLI and renderers (no torch objects)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LabelScore:
    label: str
    score: float
    logit: float


@dataclass
class ImageScores:
    """One image's scores, labels best first; or the error that kept it from being scored."""

    path: str
    labels: list[LabelScore] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "labels": [vars(s) for s in self.labels]}


@dataclass
class Embedded:
    """One input of a batch job: its vector, or why it was skipped."""

    index: int
    name: str
    vector: object = None  # np.ndarray (D,) float32
    error: str | None = None
