"""`siglip search`: rankings against transformers' embeddings, the index's model, damaged indexes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from siglip_cli.store import sample_positions

from .search_fixtures import (
    brute_force,
    cli,
    make_photos,
    one_error_line,
    process,
    records,
    reference_image_embeddings,
    sigmoid,
)

QUERIES = ["a cat", "an airplane flying over the mountains"]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_checkpoint):
    """12 photos (one in a sub-folder) and two texts, embedded once into vecs.npy."""
    root = tmp_path_factory.mktemp("search")
    photos = make_photos(root / "photos", 11)
    photos += make_photos(root / "photos" / "sub", 1, start=11)
    env = {"SIGLIP_CACHE_DIR": str(root / "cache"), "SIGLIP_MODEL": str(tiny_checkpoint)}
    out = root / "vecs.npy"
    result = cli("embed", root / "photos", "--out", out, "--text", "a cat", "--text", "a red car", "--exact", env=env)
    assert result.exit_code == 0, result.stderr
    return {"root": root, "photos": photos, "out": out, "env": env}


def _search(indexed, *args):
    return cli("search", indexed["out"], *args, env=indexed["env"])


def _assert_same_ranking(found: list[dict], expected: list[dict]) -> None:
    """The same hits in the same order, cosines equal to float32 noise (a text embedded in
    another batch differs in the last bits)."""
    assert [[h["path"] for h in r["results"]] for r in found] == [[h["path"] for h in r["results"]] for r in expected]
    for mine, theirs in zip(found, expected):
        np.testing.assert_allclose([h["cosine"] for h in mine["results"]], [h["cosine"] for h in theirs["results"]], atol=1e-6)


def _assert_no_near_ties(cosines: np.ndarray, count: int) -> None:
    """The reference ranking is only a fair test where it is not decided by float noise."""
    ranked = np.sort(cosines)[::-1][: count + 1]
    assert np.min(-np.diff(ranked)) > 1e-5


@pytest.mark.parametrize(
    "options, prompts",
    [
        ([], lambda q: ["This is a photo of " + q + "."]),
        (["--no-template"], lambda q: [q]),
        (["-t", "a photo of {}.", "-t", "a drawing of {}."], lambda q: ["a photo of " + q + ".", "a drawing of " + q + "."]),
    ],
    ids=["default-template", "no-template", "ensemble"],
)
def test_text_search_ranks_equal_the_reference(indexed, tiny_checkpoint, reference_factory, options, prompts):
    result = _search(indexed, *QUERIES, "--top-k", 12, "--json", *options)
    assert result.exit_code == 0, result.stderr
    found = records(result.stdout)
    assert [r["query"] for r in found] == QUERIES

    reference = reference_factory(tiny_checkpoint)
    images = reference_image_embeddings(reference, indexed["photos"])
    scale, bias = float(reference.model.logit_scale.detach().exp()), float(reference.model.logit_bias.detach())
    for record, query in zip(found, QUERIES):
        texts = reference.text_embeds(prompts(query))
        text = texts.mean(axis=0)
        text /= np.linalg.norm(text)
        order, cosines = brute_force(images, text)
        _assert_no_near_ties(cosines, 12)
        hits = record["results"]
        assert [h["path"] for h in hits] == [str(indexed["photos"][i]) for i in order]
        assert [h["rank"] for h in hits] == list(range(1, 13)) and {h["kind"] for h in hits} == {"image"}
        np.testing.assert_allclose([h["cosine"] for h in hits], cosines[order], atol=1e-5)
        np.testing.assert_allclose([h["score"] for h in hits], sigmoid(scale * cosines[order] + bias), atol=1e-5)


def test_image_search_ranks_equal_the_reference(indexed, tiny_checkpoint, reference_factory):
    photos = indexed["photos"]
    result = _search(indexed, "--image", photos[3], "--image", photos[11], "-k", 5, "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    found = records(result.stdout)
    assert [r["query"] for r in found] == [str(photos[3]), str(photos[11])]
    images = reference_image_embeddings(reference_factory(tiny_checkpoint), photos)
    for record, index in zip(found, (3, 11)):
        order, cosines = brute_force(images, images[index])
        _assert_no_near_ties(cosines, 5)
        hits = record["results"]
        assert [h["path"] for h in hits] == [str(photos[i]) for i in order[:5]]
        assert hits[0]["path"] == str(photos[index]) and abs(hits[0]["cosine"] - 1) < 1e-5
        np.testing.assert_allclose([h["cosine"] for h in hits], cosines[order[:5]], atol=1e-5)
        assert all(h["score"] is None for h in hits)  # SigLIP gives two images no probability


def test_texts_top_k_threshold_and_table(indexed):
    default = records(_search(indexed, "a cat", "--json").stdout)[0]["results"]
    assert len(default) == 10 and {h["kind"] for h in default} == {"image"}

    with_texts = records(_search(indexed, "a red car", "--texts", "-k", 14, "--json").stdout)[0]["results"]
    assert len(with_texts) == 14
    text_hits = [h for h in with_texts if h["kind"] == "text"]
    assert sorted(h["path"] for h in text_hits) == ["a cat", "a red car"] and all(h["score"] is None for h in text_hits)
    cosines = [h["cosine"] for h in with_texts]
    assert cosines == sorted(cosines, reverse=True)

    everything = records(_search(indexed, "a cat", "-k", 12, "--json").stdout)[0]["results"]
    cut = everything[4]["score"]
    kept = records(_search(indexed, "a cat", "-k", 12, "--threshold", cut, "--json").stdout)[0]["results"]
    assert kept == everything[:5]  # ranks stay those of the whole ranking

    table = _search(indexed, "a cat", "-k", 3, "--format", "table")
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert any("rank" in line and "score" in line and "path" in line for line in lines)
    assert sum(1 for line in lines if line.strip()[:1] in "123" and "%" in line) == 3
    csv = _search(indexed, "a cat", "-k", 2, "--format", "csv").stdout.splitlines()
    assert csv[0] == "query,rank,path,kind,score,cosine,error" and len(csv) == 3


def test_usage_errors_need_no_model(indexed, tmp_path):
    assert one_error_line(_search(indexed).stderr, "nothing to search for")
    assert _search(indexed, "").exit_code == 2
    texts_only = tmp_path / "t.npy"
    assert cli("embed", "--text", "a cat", "--out", texts_only, env=indexed["env"]).exit_code == 0
    result = cli("search", texts_only, "a dog", env=indexed["env"])
    assert result.exit_code == 2 and one_error_line(result.stderr, "only text rows", "--texts")
    assert records(cli("search", texts_only, "a dog", "--texts", "--json", env=indexed["env"]).stdout)[0]["results"][0]["path"] == "a cat"
    missing = cli("search", tmp_path / "nope.npy", "a dog", env=indexed["env"])
    assert missing.exit_code == 2 and one_error_line(missing.stderr, "nope.npy", "no such file")


def test_a_bad_image_query_is_reported_and_the_others_answered(indexed, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    result = _search(indexed, "a cat", "--image", broken, "--json")
    assert result.exit_code == 1
    found = records(result.stdout)
    assert len(found[0]["results"]) == 10 and found[1]["query"] == str(broken) and "error" in found[1]
    one_error_line(result.stderr, str(broken))


@pytest.mark.parametrize("suffix", [".npz", ".parquet", ".jsonl"])
def test_every_format_gives_the_same_ranking(indexed, tmp_path, suffix):
    out = tmp_path / f"vecs{suffix}"
    result = cli("embed", indexed["root"] / "photos", "--out", out, "--text", "a cat", "--text", "a red car", "--exact",
                 env=indexed["env"])
    assert result.exit_code == 0, result.stderr
    args = ("a cat", "--image", indexed["photos"][2], "--texts", "-k", 14, "--json")
    expected = records(_search(indexed, *args).stdout)
    found = records(cli("search", out, *args, env=indexed["env"]).stdout)
    _assert_same_ranking(found, expected)


def test_a_float16_index_ranks_like_its_float32_rows(indexed, tmp_path):
    out = tmp_path / "half.npy"
    assert cli("embed", indexed["root"] / "photos", "--out", out, "--out-dtype", "float16", env=indexed["env"]).exit_code == 0
    found = records(cli("search", out, "a cat", "-k", 12, "--json", env=indexed["env"]).stdout)[0]["results"]
    rows = np.load(out).astype(np.float32)
    query = records(cli("embed", "--text", "a cat", "-t", "This is a photo of {}.", "--format", "jsonl", env=indexed["env"]).stdout)[0]
    order, cosines = brute_force(rows, np.array(query["embedding"], np.float32))
    names = (tmp_path / "half.npy.paths.txt").read_text().splitlines()
    assert [h["path"] for h in found] == [names[i] for i in order[:12]]
    np.testing.assert_allclose([h["cosine"] for h in found], cosines[order[:12]], atol=1e-5)


# ------------------------------------------------------------------------- the index's model
def test_a_cached_query_reads_no_model_and_imports_no_torch(tmp_path, tiny_checkpoint):
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    make_photos(tmp_path / "photos", 4)
    env = {"SIGLIP_CACHE_DIR": str(tmp_path / "cache"), "SIGLIP_MODEL": ""}
    out = tmp_path / "vecs.npy"
    assert process("embed", tmp_path / "photos", "--out", out, "--model", model, env=env).returncode == 0
    first = process("search", out, "a cat", "--json", env=env)
    assert first.returncode == 0, first.stderr

    model.rename(tmp_path / "moved")  # no weights, no tokenizer, no config: only the cache can answer
    again = process("search", out, "a cat", "--json", env=env, python_options=["-X", "importtime"])
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == json.loads(first.stdout)
    imported = {line.split("|")[-1].strip() for line in again.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "siglip_cli.engine" not in imported and "siglip_cli.topk" in imported

    uncached = process("search", out, "a dog", env=env)
    assert uncached.returncode == 3
    one_error_line(uncached.stderr, str(model), "which is not here", "--model")
    found = process("search", out, "a dog", "--json", "--model", tmp_path / "moved", env=env)  # the same weights, moved
    assert found.returncode == 0, found.stderr


def test_another_model_is_refused_in_one_line(indexed, checkpoint_factory, tmp_path, monkeypatch, tiny_checkpoint):
    other = checkpoint_factory("other-seed", seed=7)
    meta = json.loads(Path(str(indexed["out"]) + ".meta.json").read_text())
    result = _search(indexed, "a cat", "--model", other)
    assert result.exit_code == 2 and result.stdout == ""
    one_error_line(result.stderr, f"--model {other}", f"made with {tiny_checkpoint} (revision {meta['revision']})")
    image_query = _search(indexed, "--image", indexed["photos"][0], "--model", other)
    assert image_query.exit_code == 2

    monkeypatch.chdir(tiny_checkpoint.parent)  # the same checkpoint named by another path is fine
    same = _search(indexed, "a cat", "--model", tiny_checkpoint.name, "--json", "--no-cache")
    assert same.exit_code == 0, same.stderr
    _assert_same_ranking(records(same.stdout), records(_search(indexed, "a cat", "--json").stdout))


# ------------------------------------------------------------------------- damaged indexes
def _copy_index(indexed, folder: Path) -> Path:
    for path in indexed["root"].iterdir():
        if path.name.startswith("vecs.npy"):
            shutil.copy(path, folder / path.name)
    return folder / "vecs.npy"


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _other_run(indexed, folder: Path) -> Path:
    """An index of as many other photos, with the same texts: its parts fit ours in shape."""
    other = folder / "other"
    make_photos(other / "photos", 12, start=50)
    out = other / "vecs.npy"
    assert cli("embed", other / "photos", "--out", out, "--text", "a cat", "--text", "a red car", env=indexed["env"]).exit_code == 0
    return out


def _nan_row(out: Path) -> None:
    """Rewritten as 100 rows (more than the meta fingerprints), one of them NaN where no
    fingerprint looks: only the search itself can notice."""
    from siglip_cli.store import Entry, open_store, write_store

    store = open_store(out)
    rows = np.random.default_rng(0).standard_normal((100, store.dim)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    row = next(i for i in range(100) if i not in sample_positions(100))
    rows[row, 3] = np.nan
    meta = {k: v for k, v in store.meta.items() if k not in ("digests", "count", "image_rows", "text_rows")}
    write_store(out, [Entry("image", f"img{i}.png", (1, 1, b""), rows, i) for i in range(100)], store.dim, "float32", meta)


DAMAGE = {
    "truncated rows": (lambda out, _: _truncate(out, 0.7), "vecs.npy", "bytes"),
    "garbage header": (lambda out, _: out.write_bytes(b"\x00" * 64 + out.read_bytes()[64:]), "vecs.npy", "unreadable rows"),
    "names missing a line": (lambda out, _: Path(f"{out}.paths.txt").write_text("".join(Path(f"{out}.paths.txt").read_text().splitlines(True)[:-1])), "vecs.npy", "names 13 rows, holds 14"),
    "names of another run": (lambda out, other: shutil.copy(f"{other}.paths.txt", f"{out}.paths.txt"), "vecs.npy.paths.txt", "not those of the rows"),
    "rows of another run": (lambda out, other: shutil.copy(other, out), "vecs.npy", "rows are not those"),
    "unreadable meta": (lambda out, _: Path(f"{out}.meta.json").write_text("{"), "vecs.npy.meta.json", "unreadable meta"),
    "meta of the wrong shape": (lambda out, _: Path(f"{out}.meta.json").write_text(Path(f"{out}.meta.json").read_text().replace('"dim": 32', '"dim": 16')), "vecs.npy", "meta says"),
    "no meta": (lambda out, _: Path(f"{out}.meta.json").unlink(), "vecs.npy", "no vecs.npy.meta.json"),
    "a row of NaN": (lambda out, _: _nan_row(out), "vecs.npy", "holds values that are not numbers"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_index_gets_one_line_and_exit_1(indexed, tmp_path, damage):
    out = _copy_index(indexed, tmp_path)
    change, where, cause = DAMAGE[damage]
    change(out, _other_run(indexed, tmp_path) if "another run" in damage else None)
    result = cli("search", out, "a cat", "--texts", "--json", env=indexed["env"])
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert result.stdout == ""  # no wrong answer
    line = one_error_line(result.stderr, cause)
    assert f"{tmp_path}/{where}" in line


@pytest.mark.parametrize("suffix, damage", [(".npz", 0.6), (".parquet", 0.6), (".parquet", 0.98), (".jsonl", 0.5)])
def test_damaged_single_file_formats(indexed, tmp_path, suffix, damage):
    out = tmp_path / f"vecs{suffix}"
    assert cli("embed", indexed["root"] / "photos", "--out", out, env=indexed["env"]).exit_code == 0
    _truncate(out, damage)
    result = cli("search", out, "a cat", "--json", env=indexed["env"])
    assert result.exit_code == 1 and result.stdout == ""
    one_error_line(result.stderr, str(out))


def test_the_photo_search_example_runs(tmp_path, tiny_checkpoint):
    """examples/embed_and_search.sh as a user runs it, on the model SIGLIP_MODEL names."""
    import os
    import subprocess
    import sys

    make_photos(tmp_path / "photos", 6)
    env = {**os.environ, "SIGLIP_MODEL": str(tiny_checkpoint), "SIGLIP_CACHE_DIR": str(tmp_path / "cache"),
           "INDEX": str(tmp_path / "photos.npy"), "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    script = Path(__file__).resolve().parent.parent / "examples" / "embed_and_search.sh"
    result = subprocess.run(["bash", str(script), str(tmp_path / "photos")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sum(1 for line in result.stdout.splitlines() if "p00" in line and "%" in line) == 5
    assert "--update: 0 new (or skipped before), 0 changed, 6 unchanged, 0 gone" in result.stderr


