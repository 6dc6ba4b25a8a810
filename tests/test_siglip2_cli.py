"""`classify`, `embed`, `similarity` and `bench` on fixed-resolution and NaFlex SigLIP 2 and on
a multilingual SigLIP 1 checkpoint, each against transformers' zero-shot recipe (for SigLIP 2
with the prompts lower-cased by Siglip2Tokenizer), through the command line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from siglip_cli.cli.app import app
from siglip_cli.store import open_store

from .conftest import random_image
from .siglip2_fixtures import multilingual_siglip, reference2, siglip2_fixed, siglip2_naflex

# Upper case (SigLIP 2 lower-cases), accents, CJK; the last one is over 64 tokens long.
LABELS = ["2 CATS", "a Dog", "Zürich", "猫", " ".join(["an airplane flying over the snowy mountains at sunset"] * 4)]
KINDS = ["fixed", "naflex", "multilingual"]


def checkpoint(kind: str, tmp_path_factory):
    return {"fixed": siglip2_fixed, "naflex": siglip2_naflex, "multilingual": multilingual_siglip}[kind](tmp_path_factory)


def reference(kind: str, folder, reference_factory):
    return reference_factory(folder) if kind == "multilingual" else reference2(folder)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Wide 3:1, tall 1:3, tiny and square PNG files."""
    folder = tmp_path_factory.mktemp("siglip2-images")
    paths = []
    for index, size in enumerate([(96, 32), (30, 90), (3, 2), (41, 41)]):
        path = folder / f"{index}.png"
        random_image(20 + index, size).save(path)
        paths.append(path)
    return paths


def load(paths):
    from PIL import Image

    out = []
    for path in paths:
        with Image.open(path) as image:
            out.append(image.convert("RGB"))
    return out


@pytest.fixture()
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGLIP_CACHE_DIR", str(tmp_path / "cache"))

    def invoke(*args):
        """The reference's numbers: --exact (fp32, exact decoding), and fp32 rows for bench."""
        args = [str(a) for a in args]
        if args[0] in ("classify", "embed", "similarity") and "--attn" not in args:
            args.append("--exact")
        if args[0] == "bench" and "--dtype" not in args:
            args += ["--dtype", "fp32"]
        return CliRunner().invoke(app, args)

    return invoke


@pytest.mark.parametrize("kind", KINDS)
def test_classify_equals_the_zero_shot_pipeline(run, pictures, tmp_path_factory, reference_factory, kind):
    folder = checkpoint(kind, tmp_path_factory)
    result = run("classify", *pictures, "--model", folder, "--json", *(a for label in LABELS for a in ("--label", label)))
    assert result.exit_code == 0, result.stderr
    pipeline = reference(kind, folder, reference_factory).pipeline()
    for path, record in zip(pictures, json.loads(result.stdout)):
        expected = {d["label"]: d["score"] for d in pipeline(str(path), candidate_labels=LABELS)}
        got = {item["label"]: item["score"] for item in record["labels"]}
        assert got == pytest.approx(expected, abs=1e-5)
    # the over-long label: one note for the run, naming it and its length
    notes = [line for line in result.stderr.splitlines() if "longer than the model's 64 tokens" in line]
    assert len(notes) == 1 and "an airplane flying" in notes[0] and "tokens)" in notes[0]


def test_naflex_max_patches_on_every_command(run, pictures, tmp_path_factory, tmp_path):
    folder = siglip2_naflex(tmp_path_factory)
    ref = reference2(folder)
    images = load(pictures)
    labels = ["a cat", "a dog"]
    expected = 1 / (1 + np.exp(-ref.logits(images, [f"This is a photo of {x}." for x in labels], max_num_patches=7)))

    classify = run("classify", *pictures, "--model", folder, "--labels", ",".join(labels), "--json", "--max-patches", 7)
    assert classify.exit_code == 0, classify.stderr
    for row, record in zip(expected, json.loads(classify.stdout)):
        assert {i["label"]: i["score"] for i in record["labels"]} == pytest.approx(dict(zip(labels, row)), abs=1e-5)

    out = tmp_path / "vecs.npz"
    embed = run("embed", *pictures, "--model", folder, "--out", out, "--max-patches", 7, "--text", "A Cat")
    assert embed.exit_code == 0, embed.stderr
    store = open_store(out)
    np.testing.assert_allclose(store.rows[:4], ref.image_embeds(images, 7), atol=1e-5, rtol=0)
    np.testing.assert_allclose(store.rows[4:], ref.text_embeds(["A Cat"]), atol=1e-5, rtol=0)
    assert store.meta["max_patches"] == 7
    # --update keeps the budget the file was made with; another one is refused
    again = run("embed", *pictures, "--model", folder, "--out", out, "--update=mtime", "--text", "A Cat")
    assert again.exit_code == 0, again.stderr
    other = run("embed", *pictures, "--model", folder, "--out", out, "--update=mtime", "--max-patches", 9)
    assert other.exit_code == 2 and "max_patches 7 -> 9" in other.stderr

    similarity = run("similarity", "-i", pictures[0], "--text", "a cat", "--rows", "images", "--cols", "texts",
                     "--model", folder, "--max-patches", 7, "--format", "jsonl")
    assert similarity.exit_code == 0, similarity.stderr
    (cell,) = [json.loads(line) for line in similarity.stdout.splitlines()]
    cosine = float(ref.image_embeds(images[:1], 7)[0] @ ref.text_embeds(["a cat"])[0])
    assert cell["cosine"] == pytest.approx(cosine, abs=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_embed_rows_equal_the_reference(run, pictures, tmp_path_factory, reference_factory, tmp_path, kind):
    folder = checkpoint(kind, tmp_path_factory)
    ref = reference(kind, folder, reference_factory)
    out = tmp_path / "vecs.npy"
    texts = ["This is a photo of 2 CATS.", "Ceci est une photo de deux chats."]
    result = run("embed", *pictures, "--model", folder, "--out", out, *(a for t in texts for a in ("--text", t)))
    assert result.exit_code == 0, result.stderr
    rows = np.load(out)
    np.testing.assert_allclose(rows[:4], ref.image_embeds(load(pictures)), atol=1e-5, rtol=0)
    np.testing.assert_allclose(rows[4:], ref.text_embeds(texts), atol=1e-5, rtol=0)
    meta = json.loads((tmp_path / "vecs.npy.meta.json").read_text())
    assert meta.get("max_patches") == (24 if kind == "naflex" else None)


@pytest.mark.parametrize("kind", KINDS)
def test_similarity_probabilities_equal_the_reference(run, pictures, tmp_path_factory, reference_factory, kind):
    folder = checkpoint(kind, tmp_path_factory)
    ref = reference(kind, folder, reference_factory)
    texts = ["A photo of 2 CATS", "猫の写真"]
    result = run("similarity", *(a for p in pictures[:2] for a in ("-i", p)), *(a for t in texts for a in ("--text", t)),
                 "--rows", "images", "--cols", "texts", "--model", folder, "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    cells = [json.loads(line) for line in result.stdout.splitlines()]
    expected = 1 / (1 + np.exp(-ref.logits(load(pictures[:2]), texts)))
    got = {(c["row"], c["col"]): c["probability"] for c in cells}
    for i, path in enumerate(pictures[:2]):
        for j, text in enumerate(texts):
            assert got[(str(path), text)] == pytest.approx(float(expected[i, j]), abs=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_bench_runs_the_checkpoint_and_compares_with_transformers(run, tmp_path_factory, kind):
    folder = checkpoint(kind, tmp_path_factory)
    extra = ["--max-patches", 10] if kind == "naflex" else []
    result = run("bench", "--model", folder, "--format", "json", "--seconds", "0.05", "--batch-sizes", "2",
                 "--device", "cpu", "--compare", "transformers", *extra)
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    for row in rows:
        assert row["max_patches"] == (10 if kind == "naflex" else None)
        if row["attn"] == "flash":
            assert row["status"] == "unavailable"
            assert ("padding mask" if kind == "naflex" else "CUDA") in row["reason"]
        elif row["tower"] != "classify":
            assert row["status"] == "ok" and row["max_abs_diff_vs_eager"] < 1e-4, row
    assert {r["attn"] for r in rows if r["tower"] == "vision"} >= {"eager", "sdpa", "transformers"}


@pytest.mark.parametrize("name,budget", [("google/siglip2-base-patch16-naflex", "16"),
                                         ("google/siglip2-base-patch16-224", None)])
def test_bench_builds_siglip2_architectures_from_the_table(run, tmp_path, monkeypatch, name, budget):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    extra = ["--max-patches", budget] if budget else []
    result = run("bench", "--model", name, "--format", "json", "--towers", "vision", "--batch-sizes", "1",
                 "--seconds", "0.05", "--repeats", "1", "--attn", "sdpa", "--device", "cpu", *extra)
    assert result.exit_code == 0, result.stderr
    assert "random weights" in result.stderr
    (row,) = json.loads(result.stdout)
    assert row["weights"] == "random" and row["status"] == "ok" and row["max_patches"] == (int(budget) if budget else None)


def test_max_patches_on_a_fixed_resolution_model_is_a_usage_error(run, pictures, tmp_path_factory):
    result = run("classify", pictures[0], "--labels", "a", "--model", siglip2_fixed(tmp_path_factory), "--max-patches", 64)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "fixed-resolution checkpoint" in result.stderr and "Traceback" not in result.stderr
    bench = run("bench", "--model", "google/siglip2-base-patch16-224", "--max-patches", 64, "--device", "cpu")
    assert bench.exit_code == 2 and "fixed-resolution" in bench.stderr


def test_flash_on_naflex_is_one_line_exit_4(run, pictures, tmp_path_factory):
    result = run("classify", pictures[0], "--labels", "a", "--model", siglip2_naflex(tmp_path_factory), "--attn", "flash")
    assert result.exit_code == 4 and "padding mask" in result.stderr and result.stderr.count("\n") == 1


def test_missing_tokenizer_json_names_the_file(run, pictures, tmp_path_factory, tmp_path):
    folder = shutil.copytree(siglip2_naflex(tmp_path_factory), tmp_path / "ckpt")
    (folder / "tokenizer.json").unlink()
    result = run("classify", pictures[0], "--labels", "a", "--model", folder)
    assert result.exit_code == 3 and result.stderr.count("\n") == 1
    assert "missing tokenizer.json" in result.stderr and "Traceback" not in result.stderr
