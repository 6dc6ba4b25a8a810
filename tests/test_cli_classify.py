"""`siglip classify` and `siglip similarity` end to end, through Typer's CliRunner."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import siglip_cli
from siglip_cli.cli.app import app

from .test_images import server  # noqa: F401  (a fixture: images served on 127.0.0.1)


@pytest.fixture()
def run(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("SIGLIP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SIGLIP_MODEL", str(tiny_checkpoint))

    def invoke(*args, stdin: str | None = None):
        return CliRunner().invoke(app, [str(a) for a in args], input=stdin)

    return invoke


def scores(records: list[dict]) -> dict[tuple[str, str], float]:
    return {(r["path"], l["label"]): l["score"] for r in records if "labels" in r for l in r["labels"]}


LABELS = "2 cats,a dog,an airplane"


def test_json_scores_equal_the_api_and_the_transformers_pipeline(run, image_dir, tiny_checkpoint, reference_factory):
    files = [image_dir / "a.jpg", image_dir / "b.png", image_dir / "c.webp"]
    result = run("classify", *files, "--labels", LABELS, "--json", "--exact")
    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)
    assert [r["path"] for r in records] == [str(f) for f in files]
    ours = scores(records)

    labels = LABELS.split(",")
    api = siglip_cli.load(tiny_checkpoint, use_cache=False, exact=True).classify(files, labels)
    pipeline = reference_factory(tiny_checkpoint).pipeline()
    for i, f in enumerate(files):
        expected = {d["label"]: d["score"] for d in pipeline(str(f), candidate_labels=labels)}
        for j, label in enumerate(labels):
            assert ours[(str(f), label)] == pytest.approx(api[i, j], abs=1e-5)
            assert ours[(str(f), label)] == pytest.approx(expected[label], abs=1e-5)
        # labels sorted by score, best first, each with its logit
        got = [l["score"] for l in records[i]["labels"]]
        assert got == sorted(got, reverse=True)
        assert all(set(l) == {"label", "score", "logit"} for l in records[i]["labels"])


def test_scores_are_sigmoids_of_the_logits(run, image_dir):
    records = json.loads(run("classify", image_dir / "a.jpg", "--labels", LABELS, "--json").stdout)
    for item in records[0]["labels"]:
        assert item["score"] == pytest.approx(1 / (1 + np.exp(-item["logit"])), abs=1e-6)


def test_every_input_kind(run, image_dir, server):  # noqa: F811
    folder = run("classify", image_dir, "--labels", LABELS, "-f", "jsonl")
    assert folder.exit_code == 0, folder.stderr
    top = [json.loads(line)["path"] for line in folder.stdout.splitlines()]
    assert [Path(p).name for p in top] == ["a.jpg", "b.png", "c.webp", "d.gif"]  # sorted, no sub-folder

    recursive = run("classify", image_dir, "--recursive", "--labels", LABELS, "-f", "jsonl")
    assert [Path(json.loads(l)["path"]).name for l in recursive.stdout.splitlines()][-1] == "e.jpg"

    pattern = run("classify", str(image_dir / "*.jp*g"), "--labels", LABELS, "-f", "jsonl")
    assert [Path(json.loads(l)["path"]).name for l in pattern.stdout.splitlines()] == ["a.jpg"]

    stdin = run("classify", "-", "--labels", LABELS, "-f", "jsonl", stdin=f"{image_dir / 'b.png'}\n\n{image_dir / 'a.jpg'}\n")
    assert [Path(json.loads(l)["path"]).name for l in stdin.stdout.splitlines()] == ["b.png", "a.jpg"]

    url = f"{server}/cat.png"
    web = run("classify", url, "--labels", LABELS, "--json")
    assert web.exit_code == 0 and json.loads(web.stdout)[0]["path"] == url


def test_animated_gif_scores_its_first_frame(run, image_dir, tmp_path):
    from PIL import Image

    with Image.open(image_dir / "d.gif") as gif:
        gif.convert("RGB").save(tmp_path / "first.png")
    records = json.loads(run("classify", image_dir / "d.gif", tmp_path / "first.png", "--labels", LABELS, "--json").stdout)
    gif, png = ({l["label"]: l["score"] for l in r["labels"]} for r in records)
    assert gif == pytest.approx(png, abs=1e-6)


def test_every_output_format_parses(run, image_dir):
    files = [image_dir / "a.jpg", image_dir / "b.png"]
    as_json = json.loads(run("classify", *files, "--labels", LABELS, "--format", "json").stdout)
    as_jsonl = [json.loads(line) for line in run("classify", *files, "--labels", LABELS, "--format", "jsonl").stdout.splitlines()]
    assert as_json == as_jsonl
    rows = list(csv.DictReader(io.StringIO(run("classify", *files, "--labels", LABELS, "--format", "csv").stdout)))
    assert len(rows) == 6 and float(rows[0]["score"]) == as_json[0]["labels"][0]["score"]
    auto = run("classify", *files, "--labels", LABELS)  # stdout is not a terminal: JSON lines
    assert [json.loads(line) for line in auto.stdout.splitlines()] == as_json
    table = run("classify", *files, "--labels", LABELS, "--format", "table")
    assert table.exit_code == 0 and "★" in table.stdout and "2 cats" in table.stdout
    single = run("classify", files[0], "--labels", LABELS, "--format", "table")
    assert "do not sum to 100%" in single.stdout and str(files[0]) in single.stdout


def test_label_sources_and_cleaning(run, image_dir, tmp_path):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("a dog\n\n  an airplane  \n2 cats\n")
    result = run(
        "classify", image_dir / "a.jpg", "--labels", "2 cats, ,a dog", "--label", "red, green and blue",
        "--labels-file", labels_file, "--json",
    )
    assert result.exit_code == 0
    got = {l["label"] for l in json.loads(result.stdout)[0]["labels"]}
    assert got == {"2 cats", "a dog", "red, green and blue", "an airplane"}
    assert result.stderr.count("given more than once") == 2  # "a dog" and "2 cats", once each


def test_no_labels_is_a_usage_error(run, image_dir):
    result = run("classify", image_dir / "a.jpg", "--labels", " , ,")
    assert result.exit_code == 2 and "no labels given" in result.stderr and "Traceback" not in result.stderr


def test_templates_and_ensembles(run, image_dir, tiny_checkpoint):
    image = image_dir / "a.jpg"
    model = siglip_cli.load(tiny_checkpoint, use_cache=False)
    default = json.loads(run("classify", image, "--label", "cat", "--json").stdout)[0]["labels"][0]["score"]
    assert default == pytest.approx(model.classify([image], ["cat"], "This is a photo of {}.")[0, 0], abs=1e-6)

    raw = json.loads(run("classify", image, "--label", "cat", "--no-template", "--json").stdout)[0]["labels"][0]["score"]
    assert raw == pytest.approx(model.classify([image], ["cat"], None)[0, 0], abs=1e-6)

    templates = ["a photo of a {}.", "a drawing of a {}."]
    ensemble = json.loads(run("classify", image, "--label", "cat", "-t", templates[0], "-t", templates[1], "--json").stdout)
    text = model.embed_texts([t.format("cat") for t in templates])
    mean = text.mean(axis=0)
    mean /= np.linalg.norm(mean)
    expected = 1 / (1 + np.exp(-(model.embed_images([image]) @ mean * model.logit_scale + model.logit_bias)))
    assert ensemble[0]["labels"][0]["score"] == pytest.approx(float(expected[0]), abs=1e-6)

    bad = run("classify", image, "--label", "cat", "--template", "a photo")
    assert bad.exit_code == 2 and "has no {}" in bad.stderr


def test_softmax_topk_threshold(run, image_dir):
    image = image_dir / "a.jpg"
    soft = json.loads(run("classify", image, "--labels", LABELS, "--softmax", "--json").stdout)[0]["labels"]
    assert sum(l["score"] for l in soft) == pytest.approx(1.0, abs=1e-5)
    top = json.loads(run("classify", image, "--labels", LABELS, "--top-k", "2", "--json").stdout)[0]["labels"]
    full = json.loads(run("classify", image, "--labels", LABELS, "--json").stdout)[0]["labels"]
    assert top == full[:2]
    cut = (full[1]["score"] + full[2]["score"]) / 2  # between two scores: JSON rounds them to 7 digits
    kept = json.loads(run("classify", image, "--labels", LABELS, "--threshold", str(cut), "--json").stdout)[0]["labels"]
    assert kept == [l for l in full if l["score"] >= cut]


def test_label_embeddings_are_cached_on_disk(run, image_dir, tmp_path, tiny_checkpoint):
    cache = tmp_path / "cache"
    first = run("classify", image_dir / "a.jpg", "--labels", LABELS, "--json")
    files = list(cache.rglob("*.npy"))
    assert len(files) == 3
    second = run("classify", image_dir / "a.jpg", "--labels", LABELS, "--json")
    assert json.loads(second.stdout) == json.loads(first.stdout)
    # a cached run never loads the text tower
    model = siglip_cli.load(tiny_checkpoint, cache_dir=cache)
    model.classify([image_dir / "a.jpg"], LABELS.split(","))
    assert model._network.text_model is None
    # safe to delete, and --no-cache neither reads nor writes it
    for f in files:
        f.unlink()
    uncached = run("classify", image_dir / "a.jpg", "--labels", LABELS, "--no-cache", "--json")
    assert uncached.exit_code == 0 and json.loads(uncached.stdout) == json.loads(first.stdout)
    assert not list(cache.rglob("*.npy"))


def test_bad_inputs_one_line_each_and_the_good_ones_still_scored(run, image_dir, bad_files, tmp_path):
    missing = tmp_path / "missing.jpg"
    args = [image_dir / "a.jpg", missing, bad_files["not_image"], bad_files["truncated"], bad_files["bomb"], image_dir / "b.png"]
    result = run("classify", *args, "--labels", LABELS, "--json", "--max-pixels", "50000000")
    assert result.exit_code == 1
    records = json.loads(result.stdout)
    assert [r["path"] for r in records] == [str(a) for a in args]
    assert "labels" in records[0] and "labels" in records[-1]
    errors = [line for line in result.stderr.splitlines() if line.startswith("siglip: error:")]
    assert len(errors) == 4
    for path, cause in [(missing, "no such file"), (bad_files["not_image"], "not an image"),
                        (bad_files["truncated"], "truncated"), (bad_files["bomb"], "--max-pixels")]:
        assert any(str(path) in e and cause in e for e in errors)
        assert any(r["path"] == str(path) and cause in r["error"] for r in records)
    assert "Traceback" not in result.stderr


def test_empty_or_unreadable_folder(run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("classify", empty, "--labels", LABELS, "--json")
    assert result.exit_code == 1 and "holds no image files" in result.stderr
    pattern = run("classify", str(tmp_path / "*.png"), "--labels", LABELS, "--json")
    assert pattern.exit_code == 1 and "no files match" in pattern.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_unreadable_folder(run, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        result = run("classify", locked, "--labels", LABELS, "--json")
        assert result.exit_code == 1 and "cannot list folder" in result.stderr
    finally:
        locked.chmod(0o755)


def test_unknown_model_and_bad_options(run, image_dir, tmp_path):
    missing = run("classify", image_dir / "a.jpg", "--labels", LABELS, "--model", tmp_path / "nope")
    assert missing.exit_code == 3 and missing.stderr.count("\n") == 1 and "no such folder" in missing.stderr
    offline = run("classify", image_dir / "a.jpg", "--labels", LABELS, "--model", "google/siglip-not-cached", "--offline")
    assert offline.exit_code == 3 and "not in the local Hugging Face cache" in offline.stderr
    flash = run("classify", image_dir / "a.jpg", "--labels", LABELS, "--device", "cpu", "--attn", "flash")
    assert flash.exit_code == 4 and "needs a CUDA device" in flash.stderr
    both = run("classify", image_dir / "a.jpg", "--labels", LABELS, "--json", "--format", "csv")
    assert both.exit_code == 2


def test_backends_and_dtypes_are_selectable(run, image_dir):
    base = scores(json.loads(run("classify", image_dir / "a.jpg", "--labels", LABELS, "--json", "--attn", "eager", "--exact").stdout))
    sdpa = scores(json.loads(run("classify", image_dir / "a.jpg", "--labels", LABELS, "--json", "--attn", "sdpa", "--exact").stdout))
    bf16 = scores(json.loads(run("classify", image_dir / "a.jpg", "--labels", LABELS, "--json", "--dtype", "bf16").stdout))
    for key in base:
        assert sdpa[key] == pytest.approx(base[key], abs=1e-5)
        assert bf16[key] == pytest.approx(base[key], abs=0.05)


def test_similarity_matrix_and_pair_probabilities(run, image_dir, tiny_checkpoint, reference_factory):
    a, b = image_dir / "a.jpg", image_dir / "b.png"
    result = run("similarity", "--image", a, "--image", b, "--text", "a cat", "--text", "a dog", "--json", "--exact")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert [r["name"] for r in record["rows"]] == [str(a), str(b), "a cat", "a dog"]
    cosine = np.array(record["cosine"])
    assert cosine.shape == (4, 4) and np.allclose(np.diag(cosine), 1, atol=1e-5) and np.allclose(cosine, cosine.T, atol=1e-6)

    from PIL import Image

    ref = reference_factory(tiny_checkpoint)
    with Image.open(a) as ia, Image.open(b) as ib:
        logits = ref.logits([ia.convert("RGB"), ib.convert("RGB")], ["a cat", "a dog"])
    pairs = {(p["image"], p["text"]): p for p in record["pairs"]}
    for i, image in enumerate([a, b]):
        for j, text in enumerate(["a cat", "a dog"]):
            assert pairs[(str(image), text)]["logit"] == pytest.approx(float(logits[i, j]), abs=1e-5)
            assert pairs[(str(image), text)]["probability"] == pytest.approx(float(1 / (1 + np.exp(-logits[i, j]))), abs=1e-6)


def test_similarity_groups_and_formats(run, image_dir, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a cat\na dog\n")
    lines = run("similarity", "-i", image_dir, "--texts-file", texts, "--rows", "images", "--cols", "texts", "-f", "jsonl")
    cells = [json.loads(line) for line in lines.stdout.splitlines()]
    assert len(cells) == 4 * 2 and all(c["row_kind"] == "image" and c["col_kind"] == "text" for c in cells)
    assert all("probability" in c for c in cells)
    table = run("similarity", "-i", image_dir / "a.jpg", "--text", "a cat", "-f", "table")
    assert "cosine similarity" in table.stdout and "SigLIP probability" in table.stdout
    rows = list(csv.DictReader(io.StringIO(run("similarity", "--text", "x", "--text", "y", "-f", "csv").stdout)))
    assert len(rows) == 4 and rows[0]["probability"] == "" and rows[0]["error"] == ""
    bad = run("similarity", "--text", "x", "--rows", "cats")
    assert bad.exit_code == 2


def test_similarity_usage_errors_come_before_any_work(run, image_dir, tmp_path):
    # a group that has no inputs, a template without {}: exit 2 and nothing printed on stdout
    for args, message in [
        (["--image", image_dir, "--rows", "texts", "--cols", "texts"], "--rows texts: no text inputs"),
        (["--text", "x", "--rows", "images", "-f", "json"], "--rows images: no image inputs"),
        (["--image", image_dir / "missing.jpg", "--text", "x", "-t", "nope"], "has no {}"),
    ]:
        result = run("similarity", *args)
        assert result.exit_code == 2 and message in result.stderr and result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1


def test_similarity_template_short_flag_and_csv_errors(run, image_dir, tmp_path):
    def cosine(*args):
        return json.loads(run("similarity", *args, "--json").stdout)["cosine"][0][1]

    typed = cosine("--text", "a photo of cat", "--text", "a photo of dog")
    assert cosine("--text", "cat", "--text", "dog", "-t", "a photo of {}") == pytest.approx(typed, abs=1e-6)
    assert cosine("--text", "cat", "--text", "dog") != pytest.approx(typed, abs=1e-4)
    result = run("similarity", "--image", tmp_path / "missing.jpg", "--image", image_dir / "a.jpg", "--text", "x", "-f", "csv")
    assert result.exit_code == 1
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    failed = [r for r in rows if r["error"]]
    assert len(failed) == 1 and failed[0]["row"] == str(tmp_path / "missing.jpg") and "no such file" in failed[0]["error"]


def test_folder_that_cannot_be_listed_is_reported(run, tmp_path, monkeypatch, image_dir):
    """Root reads every folder, so the listing error is raised at the os.scandir level."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = run("classify", locked, image_dir / "a.jpg", "--labels", LABELS, "--json")
    assert result.exit_code == 1
    assert f"siglip: error: {locked}: cannot list folder (Permission denied)" in result.stderr
    assert "labels" in json.loads(result.stdout)[-1]
