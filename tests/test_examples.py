"""`siglip classify --examples DIR`: a Tip-Adapter cache of example images on top of the
zero-shot logits. On a corpus whose classes differ visibly (colours), classify with examples
beats classify without, even with the random-weight tiny checkpoint (its random vision tower
still maps similar images close); the reported leave-one-out accuracy is recomputed here by
an independent implementation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import siglip_cli
from siglip_cli.cli.app import app
from siglip_cli.examples import TipAdapter

COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200), "yellow": (220, 210, 40)}


def colour_image(colour: str, seed: int, size=(40, 40)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.asarray(COLOURS[colour])[None, None, :] + rng.integers(-50, 50, (size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture()
def corpus(tmp_path) -> tuple[Path, Path]:
    """examples/<colour>/ with 4 images each, and queries/<colour>-<i>.png, 5 per colour."""
    examples, queries = tmp_path / "examples", tmp_path / "queries"
    queries.mkdir()
    for c, colour in enumerate(COLOURS):
        (examples / colour).mkdir(parents=True)
        for i in range(4):
            colour_image(colour, 100 * c + i).save(examples / colour / f"{i}.png")
        for i in range(5):
            colour_image(colour, 1000 + 100 * c + i).save(queries / f"{colour}-{i}.png")
    return examples, queries


def accuracy(stdout: str) -> float:
    records = json.loads(stdout)
    return float(np.mean([Path(r["path"]).name.split("-")[0] == r["labels"][0]["label"] for r in records]))


REPORT = re.compile(r"examples: (\d+) images of (\d+) labels; .*?alpha=([\d.]+) \(x ([\d.e+-]+), .*?beta=([\d.]+); "
                    r"leave-one-out accuracy ([\d.]+)% \(text alone: ([\d.]+)%\)")


def test_examples_beat_the_text_alone(run, corpus):
    examples, queries = corpus
    labels = ",".join(COLOURS)
    without = run("classify", queries, "-l", labels, "--json")
    with_examples = run("classify", queries, "-l", labels, "--examples", examples, "--json")
    assert without.exit_code == 0 and with_examples.exit_code == 0, with_examples.stderr
    assert accuracy(with_examples.stdout) > accuracy(without.stdout)
    assert accuracy(with_examples.stdout) >= 0.9
    assert REPORT.search(with_examples.stderr), with_examples.stderr


def test_labels_from_the_example_folders_alone(run, corpus):
    examples, queries = corpus
    result = run("classify", queries / "red-0.png", "--examples", examples, "--json")
    assert result.exit_code == 0, result.stderr
    [record] = json.loads(result.stdout)
    assert sorted(l["label"] for l in record["labels"]) == sorted(COLOURS)
    assert record["labels"][0]["label"] == "red"


def test_the_reported_leave_one_out_accuracy_is_right(run, corpus, tiny_checkpoint):
    examples, queries = corpus
    result = run("classify", queries / "red-0.png", "--examples", examples, "--json")
    count, labels, alpha, spread, beta, loo, text_only = REPORT.search(result.stderr).groups()
    assert (int(count), int(labels)) == (16, 4)
    # an independent leave-one-out with the reported weights, from the Python API's embeddings
    engine = siglip_cli.load(str(tiny_checkpoint), use_cache=False)
    names = sorted(COLOURS)
    files = [(names.index(c), p) for c in names for p in sorted((examples / c).iterdir())]
    keys = engine.embed_images([p for _, p in files])
    truth = np.array([i for i, _ in files])
    text = engine.embed_texts(names, "This is a photo of {}.")
    text_logits = engine.logits(keys, text)
    correct = 0
    for i in range(len(files)):
        votes = np.zeros(len(names))
        for c in range(len(names)):
            others = [j for j in range(len(files)) if j != i and truth[j] == c]
            votes[c] = np.mean([np.exp(-float(beta) * (1 - keys[i] @ keys[j])) for j in others])
        correct += int(np.argmax(text_logits[i] + float(alpha) * float(spread) * votes) == truth[i])
    assert float(loo) == pytest.approx(100 * correct / len(files), abs=0.05)
    assert float(text_only) == pytest.approx(100 * np.mean(np.argmax(text_logits, 1) == truth), abs=0.05)
    assert float(spread) == pytest.approx(np.mean(np.std(text_logits, axis=1)), rel=1e-2)


def test_weight_zero_is_exactly_zero_shot(tiny_checkpoint, corpus):
    examples, queries = corpus
    engine = siglip_cli.load(str(tiny_checkpoint), use_cache=False)
    keys = engine.embed_images(sorted(examples.rglob("*.png")))
    text = engine.embed_texts(list(COLOURS), "This is a photo of {}.")
    images = engine.embed_images(sorted(queries.iterdir()))
    adapter = TipAdapter(text, keys, np.arange(len(keys)) % 4, engine.logit_scale, engine.logit_bias)
    adapter.choose(alphas=(0.0,))
    np.testing.assert_allclose(adapter.logits(images), engine.logits(images, text), rtol=1e-5, atol=1e-5)


def test_example_embeddings_are_cached(run, corpus, tmp_path):
    examples, queries = corpus
    first = run("classify", queries, "--examples", examples, "--json")
    entries = sorted((tmp_path / "cache" / "images").rglob("*.npy"))
    assert len(entries) == 16
    second = run("classify", queries, "--examples", examples, "--json")
    assert second.stdout == first.stdout and sorted((tmp_path / "cache" / "images").rglob("*.npy")) == entries
    # the cached vectors are what is used: spoil them all alike and the results change
    dim = np.load(entries[0]).shape[0]
    for entry in entries:
        np.save(entry, np.full(dim, 1 / np.sqrt(dim), np.float32))
    third = run("classify", queries, "--examples", examples, "--json")
    assert third.exit_code == 0 and third.stdout != first.stdout, (first.stderr, third.stderr)


# ----------------------------------------------------------------------------- bad input
def one_line_usage_error(result, *needles):
    assert result.exit_code == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_a_label_folder_with_one_image(run, corpus):
    examples, queries = corpus
    for extra in sorted((examples / "red").iterdir())[1:]:
        extra.unlink()
    one_line_usage_error(run("classify", queries, "--examples", examples), "red", "only 1 image")


def test_an_empty_label_folder(run, corpus):
    examples, queries = corpus
    (examples / "purple").mkdir()
    one_line_usage_error(run("classify", queries, "--examples", examples), "purple", "no images")


def test_a_folder_not_among_the_labels(run, corpus):
    examples, queries = corpus
    one_line_usage_error(run("classify", queries, "-l", "red,green,blue", "--examples", examples), "yellow", "not among the labels")


def test_labels_without_examples_use_their_text(run, corpus):
    examples, queries = corpus
    result = run("classify", queries / "red-0.png", "-l", "red,green,blue,yellow,purple", "--examples", examples, "--json")
    assert result.exit_code == 0, result.stderr
    assert "purple" in [l["label"] for l in json.loads(result.stdout)[0]["labels"]]


def test_a_missing_examples_folder(run, corpus, tmp_path):
    one_line_usage_error(run("classify", corpus[1], "--examples", tmp_path / "nope"), "no such folder")


def test_an_example_that_fails_to_decode_is_reported_and_left_out(run, corpus):
    examples, queries = corpus
    (examples / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    result = run("classify", queries, "--examples", examples, "--json")
    assert result.exit_code == 0, result.stderr
    assert "broken.png" in result.stderr and "left out" in result.stderr
    assert "16 images of 4 labels" in result.stderr


def test_too_few_readable_examples_left(run, corpus):
    examples, queries = corpus
    for path in sorted((examples / "blue").iterdir())[1:]:
        path.write_bytes(b"not an image")
    result = run("classify", queries, "--examples", examples)
    assert result.exit_code == 2 and "blue" in result.stderr and "only 1 readable image" in result.stderr
    assert "Traceback" not in result.stderr
