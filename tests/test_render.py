"""The renderer on its own: tables at 80 columns against stored snapshots, numbers never cut,
and one rounding rule for every format. Results are built by hand: this tests the printing, the
numbers themselves are tested against the reference elsewhere.

Update the snapshots after a deliberate change with SIGLIP_UPDATE_SNAPSHOTS=1."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from siglip_cli.cli import render
from siglip_cli.results import BenchRow, ImageScores, InputFailure, Item, LabelScore, SimilarityMatrix

SNAPSHOTS = Path(__file__).parent / "snapshots"
LABELS = ["2 cats", "2 dogs", "a remote control"]


def _scores(path: str, values: list[float]) -> ImageScores:
    logits = [float(np.log(v / (1 - v))) for v in values]
    ranked = sorted(zip(LABELS, values, logits), key=lambda t: -t[1])
    return ImageScores(path, [LabelScore(label, value, logit) for label, value, logit in ranked])


def _table(results, view, width: int = 80) -> str:
    out = io.StringIO()
    console = render.stdout_console(out, width=width)
    render.emit(results, "table", view, out=out, console=console)
    return out.getvalue()


def _check(name: str, text: str, notes: tuple[str, ...] = ()) -> None:
    """`notes`: the starts of footnote lines, which stay one line each (the terminal wraps them)."""
    path = SNAPSHOTS / f"{name}.txt"
    if os.environ.get("SIGLIP_UPDATE_SNAPSHOTS"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; if on purpose, rerun with SIGLIP_UPDATE_SNAPSHOTS=1"
    assert max(len(line) for line in text.splitlines() if not line.startswith(notes)) <= 80


def _numbers_whole(text: str) -> None:
    assert not re.search(r"[\d,.%x]…|…[\d,.]", text), "a number was cut"


def _folder_results():
    return [
        _scores("/photos/holiday/2024/IMG_0001.jpg", [0.188, 0.0000712, 0.31]),
        ImageScores("/photos/holiday/2024/broken.jpg", error="/photos/holiday/2024/broken.jpg: corrupt or truncated image (image file is truncated)"),
        _scores("/photos/holiday/2024/a-much-longer-file-name-that-will-not-fit-in-its-column.png", [0.0021, 0.93, 0.5]),
    ]


def test_classify_one_image():
    _check("classify_one", _table([_scores("cats.png", [0.188, 0.0000712, 0.31])], render.classify_view(LABELS, "sigmoid")),
           notes=("sigmoid: ",))


def test_classify_a_folder_with_an_error_row():
    text = _table(_folder_results(), render.classify_view(LABELS, "sigmoid"))
    _check("classify_folder", text, notes=("sigmoid: ",))
    for number in ("18.8%", "0.0071%", "★ 31.0%", "0.2%", "★ 93.0%", "50.0%"):
        assert number in text
    assert "error [1]" in text and "[1] /photos/holiday/2024/broken.jpg: corrupt" in text


def test_classify_many_labels_says_what_is_hidden():
    labels = [f"label {i}" for i in range(8)]
    results = [ImageScores("a.jpg", [LabelScore(l, 0.5 - i / 100, 0.0) for i, l in enumerate(labels)])] * 2
    text = _table(results, render.classify_view(labels, "sigmoid"))
    _check("classify_many_labels", text, notes=("sigmoid: ",))
    assert "best 3 of 8 labels" in text


def test_classify_at_60_columns_keeps_each_path_on_one_line():
    text = _table(_folder_results(), render.classify_view(LABELS, "sigmoid"), width=60)
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert len(rows) == 3 and "…" in rows[0]  # three images, three lines: paths cut in the middle
    assert all(len(line) <= 60 for line in text.splitlines() if not line.startswith("sigmoid: "))  # notes: one line
    for number in ("18.8%", "0.0071%", "31.0%", "93.0%"):
        assert number in text


def test_similarity_table():
    images, texts = [Item("a.jpg", "image"), Item("b.png", "image")], [Item("a cat", "text")]
    vectors = np.array([[1, 0, 0], [0.6, 0.8, 0], [0.8, 0.6, 0]], np.float32)
    matrix = SimilarityMatrix(images + texts, images + texts, vectors, vectors, images, texts, vectors[:2], vectors[2:], 10.0, -5.0)
    failure = InputFailure("c.jpg", "c.jpg: no such file")
    _check("similarity", _table([failure, matrix], render.SIMILARITY_VIEW))


def _bench_rows() -> list[BenchRow]:
    rows = []
    for attn, rate, ms in (("eager", 1218.4567, 13.13), ("sdpa", 1342.9, 11.915)):
        rows.append(BenchRow("google/siglip-base-patch16-224", "random", "cpu", "fp32", attn, "vision", 16, items_per_s=rate,
                             ms_per_batch=ms, ms_min=ms * 0.9, ms_max=ms * 1.7, runs=10, speedup_vs_eager=13.13 / ms,
                             max_abs_diff_vs_eager=0.0 if attn == "eager" else 2.4e-7, peak_mem_mb=1066.2,
                             peak_mem_kind="process peak RSS during the row", tflops=0.1234))
    rows.append(BenchRow("google/siglip-base-patch16-224", "random", "cpu", "fp32", "flash", "vision", 16, status="unavailable",
                         reason="flash attention needs a CUDA device, not cpu; use --attn sdpa"))
    return rows


def test_bench_table_keeps_its_numbers_at_80_columns():
    text = _table(_bench_rows(), render.BENCH_VIEW)
    _check("bench", text, notes=("[1] ", "warning: ", "max|Δ|"))
    _numbers_whole(text)
    assert "1,218.5" in text and "1,342.9" in text  # whole, not "1,218…"
    assert "varied by more than 1.5x" in text  # a busy machine is called out
    assert "classify =" not in text  # the footnote only when classify was timed


def test_one_rounding_rule_for_every_format():
    result = ImageScores("a.jpg", [LabelScore("x", 0.123456789, float("nan"))])
    out = io.StringIO()
    render.emit([result], "json", render.classify_view(["x"], "sigmoid"), out=out)
    record = json.loads(out.getvalue())[0]["labels"][0]
    assert record == {"label": "x", "score": 0.1234568, "logit": None}
    out = io.StringIO()
    render.emit([result], "csv", render.classify_view(["x"], "sigmoid"), out=out)
    assert out.getvalue().splitlines()[1] == "a.jpg,1,x,0.1234568,,"


@pytest.mark.parametrize("score,shown", [(0.188, "18.8%"), (0.0000712, "0.0071%"), (1.2e-9, "1.2e-07%"), (0.0, "0.0%")])
def test_scores_are_always_percentages(score, shown):
    assert render.format_score(score) == shown


# ---------------------------------------------------------------------------- issue 18: tables never cut
def _similarity_matrix(n_images: int = 4, n_texts: int = 4) -> SimilarityMatrix:
    images = [Item(f"/photos/holiday/picture-of-{name}.jpg", "image") for name in ("alice", "bob", "carol", "dave")[:n_images]]
    texts = [Item(t, "text") for t in ["a cat on a sofa", "a dog", "a remote control", "two cats", "a red car"][:n_texts]]
    vectors = np.random.default_rng(0).normal(size=(n_images + n_texts, 5)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[1] = -vectors[1]  # negative cosines: the widest numbers
    items = images + texts
    return SimilarityMatrix(items, items, vectors, vectors, images, texts, vectors[:n_images], vectors[n_images:], 10.0, -5.0)


@pytest.mark.parametrize("width", [40, 60, 80])
def test_similarity_table_never_cuts_a_number(width):
    matrix = _similarity_matrix()
    text = _table([matrix], render.SIMILARITY_VIEW, width=width)
    _numbers_whole(text)
    assert all(len(line) <= width for line in text.splitlines())
    cosines = [f"{v:.3f}" for v in np.asarray(matrix.cosine).ravel()]
    probabilities = [render.format_score(float(v)) for v in np.asarray(matrix.pair_probabilities).ravel()]
    cells = re.findall(r"-?\d+\.\d+(?:e-\d+)?%?", text)
    # every cell of both matrices is printed whole, once each
    assert sorted(c for c in cells if not c.endswith("%")) == sorted(cosines)
    assert sorted(c for c in cells if c.endswith("%")) == sorted(probabilities)


def test_classify_with_no_label_left_draws_no_empty_table():
    """--softmax --threshold 0.9 where nothing reaches it: a line, not a header over no rows."""
    text = _table([ImageScores("a.jpg", [])], render.classify_view(LABELS, "softmax"))
    assert "no label reached the --threshold" in text
    assert "┃" not in text and "━" not in text and "logit" not in text


def test_a_table_into_a_pipe_honours_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    assert render.stdout_console(io.StringIO()).width == 60
    monkeypatch.delenv("COLUMNS")
    assert render.stdout_console(io.StringIO()).width >= 120  # a saved report keeps its columns


def test_bench_notes_are_one_line_each():
    """A warning is never broken mid-sentence: the terminal wraps it, a pipe gets it whole."""
    text = _table(_bench_rows(), render.BENCH_VIEW)
    lines = text.splitlines()
    assert any(line.startswith("warning: 2 row(s) varied") and line.endswith("compare ratios from one run only") for line in lines)
    assert any(line.startswith("[1] flash unavailable") and line.endswith("use --attn sdpa") for line in lines)


@pytest.mark.parametrize("labels,matrix", [
    ([f"label {i}" for i in range(5)], True),  # 5 short labels fit 80 columns
    ([f"label {i}" for i in range(6)], False),  # 6 do not: the best 3 per image
    ([f"a long label number {i}" for i in range(3)], True),
    ([f"a long label number {i}" for i in range(4)], False),  # 4 long ones do not (docs/classify.md)
])
def test_when_the_many_image_table_switches_to_the_best_3(labels, matrix):
    results = [ImageScores(f"{name}.jpg", [LabelScore(l, 0.5 - i / 100, 0.0) for i, l in enumerate(labels)]) for name in "ab"]
    text = _table(results, render.classify_view(labels, "sigmoid"))
    assert ("★" in text) == matrix
    assert (f"best 3 of {len(labels)} labels" in text) == (not matrix)
