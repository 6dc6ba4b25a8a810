"""`siglip embed`: rows, sidecars, formats, skips, atomic files, interrupt and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import siglip_cli
from siglip_cli.cli.app import app

from .conftest import random_image


@pytest.fixture()
def run(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("SIGLIP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SIGLIP_MODEL", str(tiny_checkpoint))

    def invoke(*args, stdin=None):
        return CliRunner().invoke(app, [str(a) for a in args], input=stdin)

    return invoke


@pytest.fixture()
def mixed_folder(tmp_path, image_dir, bad_files) -> Path:
    """Good images with bad ones in the middle of the sorted order."""
    import shutil

    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(image_dir / "a.jpg", folder / "01.jpg")
    shutil.copy(bad_files["truncated"], folder / "02.jpg")
    shutil.copy(image_dir / "b.png", folder / "03.png")
    shutil.copy(bad_files["not_image"], folder / "04.jpg")
    (folder / "sub").mkdir()
    shutil.copy(image_dir / "c.webp", folder / "sub" / "05.webp")
    return folder


def test_rows_equal_the_api_and_the_reference(run, image_dir, tmp_path, tiny_checkpoint, reference_factory):
    out = tmp_path / "vecs.npy"
    result = run("embed", image_dir, "--out", out, "--exact")
    assert result.exit_code == 0, result.stderr
    rows = np.load(out)
    paths = (tmp_path / "vecs.npy.paths.txt").read_text().splitlines()
    assert [Path(p).relative_to(image_dir).as_posix() for p in paths] == ["a.jpg", "b.png", "c.webp", "d.gif", "sub/e.jpg"]
    assert rows.dtype == np.float32 and rows.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-6)

    api = siglip_cli.load(tiny_checkpoint, exact=True).embed_images(paths)
    np.testing.assert_allclose(rows, api, atol=1e-6)

    from PIL import Image

    ref = reference_factory(tiny_checkpoint)
    pictures = []
    for p in paths:
        with Image.open(p) as image:
            pictures.append(image.convert("RGB"))
    expected = ref.image_embeds(pictures)
    assert (np.sum(rows * expected, axis=1) > 0.99999).all()

    meta = json.loads((tmp_path / "vecs.npy.meta.json").read_text())
    assert meta["count"] == 5 and meta["dim"] == 32 and meta["dtype"] == "float32" and meta["normalized"] is True
    assert meta["model"] == str(tiny_checkpoint) and meta["revision"].startswith("local-") and meta["skipped"] == []
    assert meta["model_dtype"] == "fp32" and meta["decode"] == "exact"  # --exact: transformers' numbers


def test_bad_files_in_the_middle_keep_sidecars_aligned(run, mixed_folder, tmp_path, tiny_checkpoint):
    out = tmp_path / "vecs.npy"
    result = run("embed", mixed_folder, "--out", out)
    assert result.exit_code == 1
    rows = np.load(out)
    paths = (tmp_path / "vecs.npy.paths.txt").read_text().splitlines()
    assert [Path(p).name for p in paths] == ["01.jpg", "03.png", "05.webp"]
    api = siglip_cli.load(tiny_checkpoint).embed_images(paths)
    np.testing.assert_allclose(rows, api, atol=1e-6)
    meta = json.loads((tmp_path / "vecs.npy.meta.json").read_text())
    skipped = {Path(s["path"]).name: s["error"] for s in meta["skipped"]}
    assert set(skipped) == {"02.jpg", "04.jpg"} and "truncated" in skipped["02.jpg"] and "not an image" in skipped["04.jpg"]
    assert meta["skipped_count"] == 2 and meta["count"] == 3
    lines = [line for line in result.stderr.splitlines() if "skipped" in line and ".jpg" in line]
    assert len(lines) == 2 and "Traceback" not in result.stderr


def test_strict_stops_at_the_first_bad_file(run, mixed_folder, tmp_path):
    out = tmp_path / "vecs.npy"
    result = run("embed", mixed_folder, "--out", out, "--strict")
    assert result.exit_code == 1 and "02.jpg" in result.stderr and "--strict" in result.stderr
    assert not out.exists()


def test_texts_and_templates(run, image_dir, tmp_path, tiny_checkpoint):
    texts = tmp_path / "texts.txt"
    texts.write_text("a dog\n\nan airplane\n")
    out = tmp_path / "vecs.npy"
    result = run("embed", image_dir / "a.jpg", "--text", "a cat", "--texts-file", texts, "--template", "a photo of {}.", "--out", out)
    assert result.exit_code == 0, result.stderr
    paths = (tmp_path / "vecs.npy.paths.txt").read_text().splitlines()
    assert paths[1:] == ["a cat", "a dog", "an airplane"]
    model = siglip_cli.load(tiny_checkpoint)
    np.testing.assert_allclose(np.load(out)[1:], model.embed_texts(["a cat", "a dog", "an airplane"], "a photo of {}."), atol=1e-6)
    meta = json.loads((tmp_path / "vecs.npy.meta.json").read_text())
    assert meta["images"] == 1 and meta["texts"] == 3 and meta["templates"] == ["a photo of {}."]
    assert meta["image_rows"] == 1 and meta["text_rows"] == 3  # rows image_rows.. are texts


def test_every_output_format_loads(run, image_dir, tmp_path):
    npy = tmp_path / "v.npy"
    run("embed", image_dir, "--out", npy)
    reference = np.load(npy)
    paths = (tmp_path / "v.npy.paths.txt").read_text().splitlines()

    npz = tmp_path / "v.npz"
    assert run("embed", image_dir, "--out", npz).exit_code == 0
    with np.load(npz) as archive:
        np.testing.assert_allclose(archive["embeddings"], reference, atol=1e-7)
        assert archive["paths"].tolist() == paths and set(archive["kinds"].tolist()) == {"image"}
        assert json.loads(str(archive["meta"]))["count"] == len(paths)

    jsonl = tmp_path / "v.jsonl"
    assert run("embed", image_dir, "--out", jsonl).exit_code == 0
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["path"] for r in records] == paths and {r["kind"] for r in records} == {"image"}
    np.testing.assert_allclose(np.array([r["embedding"] for r in records]), reference, atol=1e-6)

    stdout = run("embed", image_dir, "--format", "jsonl", "--text", "a cat")
    lines = [json.loads(line) for line in stdout.stdout.splitlines()]
    assert [l.get("path") for l in lines[:-1]] == paths and lines[-1]["text"] == "a cat" and lines[-1]["kind"] == "text"

    parquet = tmp_path / "v.parquet"
    assert run("embed", image_dir, "--out", parquet).exit_code == 0
    import pyarrow.parquet as pq

    table = pq.read_table(parquet)
    assert table.column("path").to_pylist() == paths and set(table.column("kind").to_pylist()) == {"image"}
    np.testing.assert_allclose(np.array(table.column("embedding").to_pylist()), reference, atol=1e-7)
    assert json.loads(table.schema.metadata[b"siglip"])["count"] == len(paths)

    half = tmp_path / "h.npy"
    run("embed", image_dir, "--out", half, "--out-dtype", "float16")
    assert np.load(half).dtype == np.float16
    np.testing.assert_allclose(np.load(half), reference, atol=1e-3)
    assert half.stat().st_size < npy.stat().st_size * 0.6

    raw = tmp_path / "raw.npy"
    run("embed", image_dir, "--out", raw, "--no-normalize")
    assert not np.allclose(np.linalg.norm(np.load(raw), axis=1), 1)
    np.testing.assert_allclose(np.load(raw) / np.linalg.norm(np.load(raw), axis=1, keepdims=True), reference, atol=1e-6)


def test_usage_errors(run, image_dir, tmp_path):
    assert run("embed", image_dir).exit_code == 2  # no --out, no --format jsonl
    bad_suffix = run("embed", image_dir, "--out", tmp_path / "v.txt")
    assert bad_suffix.exit_code == 2 and ".npy, .npz, .jsonl or .parquet" in bad_suffix.stderr
    no_folder = run("embed", image_dir, "--out", tmp_path / "nope" / "v.npy")
    assert no_folder.exit_code == 2 and "does not exist" in no_folder.stderr


def test_output_files_have_normal_permissions(run, image_dir, tmp_path):
    out = tmp_path / "v.npy"
    run("embed", image_dir / "a.jpg", "--out", out)
    umask = os.umask(0)
    os.umask(umask)
    for path in (out, tmp_path / "v.npy.paths.txt", tmp_path / "v.npy.meta.json", tmp_path / "v.npy.stamps.npy"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".partial", ".lock"))]


# ------------------------------------------------------------------------- interrupt + resume
@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """Enough large JPEGs that a run takes a few seconds, so a test can interrupt it."""
    folder = tmp_path_factory.mktemp("many")
    for i in range(120):
        random_image(i, (900, 700)).save(folder / f"{i:04d}.jpg", quality=90)
    return folder


def _embed_process(folder: Path, out: Path, checkpoint: Path, cache: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "SIGLIP_MODEL": str(checkpoint), "SIGLIP_CACHE_DIR": str(cache)}
    return subprocess.Popen(
        [sys.executable, "-m", "siglip_cli", "embed", str(folder), "--out", str(out), "--batch-size", "4", "--workers", "1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def test_sigint_keeps_finished_rows_and_resume_equals_a_clean_run(many_images, tmp_path, tiny_checkpoint):
    clean = tmp_path / "clean.npy"
    done = _embed_process(many_images, clean, tiny_checkpoint, tmp_path / "cache")
    assert done.wait(timeout=300) == 0, done.stderr.read()

    out = tmp_path / "vecs.npy"
    proc = _embed_process(many_images, out, tiny_checkpoint, tmp_path / "cache")
    names = out.with_name("vecs.npy.partial") / "rows.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not names.exists() or names.read_text().count("\n") < 12):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=60)
    stderr = proc.stderr.read()
    assert code == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    assert not out.exists(), "an interrupted run must not leave a finished-looking file"
    kept = names.read_text().count("\n")
    assert 12 <= kept < 120

    again = _embed_process(many_images, out, tiny_checkpoint, tmp_path / "cache")
    assert again.wait(timeout=60) == 2 and "--resume" in again.stderr.read()  # refuses to clobber the partial run

    resumed = _embed_process(many_images, out, tiny_checkpoint, tmp_path / "cache", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert f"resuming: {kept} rows already done" in resumed.stderr.read()
    assert (tmp_path / "vecs.npy.paths.txt").read_text() == (tmp_path / "clean.npy.paths.txt").read_text()
    np.testing.assert_allclose(np.load(out), np.load(clean), atol=1e-6)
    assert not out.with_name("vecs.npy.partial").exists()


def test_resume_trims_a_half_written_row(run, image_dir, tmp_path, tiny_checkpoint):
    """A crash can stop between writing a row and its name: resume keeps only whole pairs."""
    from siglip_cli.embedding import EmbedPlan, EmbedRun, stamp_of
    from siglip_cli.sources import expand

    out = tmp_path / "v.npy"
    model = siglip_cli.load(tiny_checkpoint)
    listing = expand([str(image_dir)])
    run_ = EmbedRun(model, EmbedPlan(listing.sources), out, "float32", True, None)
    vectors = model.embed_images([image_dir / "a.jpg", image_dir / "b.png"])
    run_.partial.add("image", listing.sources[0].name, stamp_of(listing.sources[0], False), vectors[0])
    run_.partial.commit()
    run_.partial._rows.write(vectors[1].tobytes()[:50])  # a torn row without its index line
    run_.partial._index.write(b'{"kind": "image", "na')  # and a torn index line
    run_.partial.commit()
    run_.close()
    result = run("embed", image_dir, "--out", out, "--resume", "--no-recursive")
    assert result.exit_code == 0, result.stderr
    clean = tmp_path / "clean.npy"
    run("embed", image_dir, "--out", clean, "--no-recursive")
    np.testing.assert_allclose(np.load(out), np.load(clean), atol=1e-6)


def test_resume_refuses_other_settings(run, image_dir, tmp_path):
    out = tmp_path / "v.npy"
    partial = out.with_name("v.npy.partial")
    partial.mkdir()
    (partial / "state.json").write_text(json.dumps({"model": "something else"}))
    result = run("embed", image_dir, "--out", out, "--resume")
    assert result.exit_code == 2 and "different settings" in result.stderr


def test_a_failed_final_write_keeps_the_previous_set_whole(run, image_dir, tmp_path, monkeypatch):
    """Disk full while writing the new vecs.npy: the old vecs.npy, paths and meta stay as they
    were (never new sidecars beside old rows), no temporary file is left, one error line."""
    import errno

    from siglip_cli import store

    out = tmp_path / "v.npy"
    assert run("embed", image_dir / "a.jpg", "--out", out).exit_code == 0
    files = [out, tmp_path / "v.npy.paths.txt", tmp_path / "v.npy.meta.json", tmp_path / "v.npy.stamps.npy"]
    before = [f.read_bytes() for f in files]

    def full_disk(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store, "_write_npy_rows", full_disk)
    result = run("embed", image_dir, "--out", out)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"siglip: error: {out}: no space left on the device") and len([l for l in lines if "error" in l]) == 1
    assert [f.read_bytes() for f in files] == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".v.")) == []


def test_options_are_checked_before_the_model_loads(run, image_dir, tmp_path):
    out = tmp_path / "v.npy"
    missing_model = ["--model", tmp_path / "no-such-model"]  # loading it would exit 3
    result = run("embed", image_dir, "--text", "a", "--template", "no placeholder", "--out", out, *missing_model)
    assert result.exit_code == 2 and "has no {}" in result.stderr
    result = run("embed", image_dir, "-t", "a {}", "-t", "b {}", "--no-normalize", "--out", out, *missing_model)
    assert result.exit_code == 2 and "--no-normalize needs a single template" in result.stderr
    (tmp_path / "d.npy").mkdir()
    result = run("embed", image_dir, "--out", tmp_path / "d.npy")
    assert result.exit_code == 2 and "is a folder" in result.stderr
    notes = tmp_path / "notes.jsonl"
    notes.write_text("a cat\n")
    result = run("embed", "--texts-file", notes, "--out", notes)
    assert result.exit_code == 2 and "would overwrite the texts file" in result.stderr
    assert notes.read_text() == "a cat\n"
    result = run("embed", image_dir / "a.jpg", "--out", tmp_path / "a.npy", "--format", "jsonl")
    assert result.exit_code == 2
    assert not list(tmp_path.glob("*.partial"))


def test_out_may_not_overwrite_an_input(run, tmp_path, image_dir):
    import shutil

    target = tmp_path / "x.npy"
    shutil.copy(image_dir / "a.jpg", target)
    result = run("embed", target, "--out", target)
    assert result.exit_code == 2 and "would overwrite the input" in result.stderr
    assert target.read_bytes() == (image_dir / "a.jpg").read_bytes()


def test_resume_after_the_inputs_changed_keeps_unchanged_rows_and_accepts_the_model_by_another_path(run, image_dir, tmp_path, tiny_checkpoint, monkeypatch):
    """A file removed since the interrupted run (issue 17: one that vanished mid-run) leaves a
    folder that --resume still continues, with a note: rows are kept by name and stamp."""
    import shutil

    folder = tmp_path / "imgs"
    shutil.copytree(image_dir, folder)
    out = tmp_path / "v.npy"
    (folder / "c.webp").write_bytes(b"not an image")
    assert run("embed", folder, "--out", out, "--strict").exit_code == 1  # stops, keeps a.jpg, b.png
    assert (tmp_path / "v.npy.partial").is_dir()
    (folder / "b.png").unlink()
    shutil.copy(image_dir / "c.webp", folder / "c.webp")  # the bad file fixed
    monkeypatch.chdir(tiny_checkpoint.parent)
    result = run("embed", folder, "--out", out, "--resume", "--model", tiny_checkpoint.name)
    assert result.exit_code == 0, result.stderr
    assert "the inputs changed since it was made" in result.stderr and "2 rows already done" in result.stderr
    assert not (tmp_path / "v.npy.partial").exists()
    clean = tmp_path / "clean.npy"
    assert run("embed", folder, "--out", clean).exit_code == 0
    np.testing.assert_allclose(np.load(out), np.load(clean), atol=1e-6)
    assert (tmp_path / "v.npy.paths.txt").read_text() == (tmp_path / "clean.npy.paths.txt").read_text()


def test_texts_only_and_stdout_runs(run, tmp_path):
    out = tmp_path / "t.npy"
    result = run("embed", "--text", "a cat", "--text", "a dog", "--out", out)
    assert result.exit_code == 0 and np.load(out).shape == (2, 32)
    assert "images/s" not in result.stderr and "wrote 2 texts" in result.stderr
    resume = run("embed", "--text", "a cat", "--format", "jsonl", "--resume")
    assert resume.exit_code == 2 and "work on an --out file" in resume.stderr
