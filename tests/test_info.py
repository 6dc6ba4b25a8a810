"""`siglip info INDEX` (issue 18, item 11): what an index holds, from the store as it reads
back and its files on disk, as a table or JSON; never the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from siglip_cli.store import Entry, open_store, output_files, write_store

from .search_fixtures import ROOT, cli, make_photos, one_error_line
from .test_paths import _COMPUTED, _write_old_store

FORMATS = [".npy", ".npz", ".parquet", ".jsonl"]


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_checkpoint):
    """One index per format: 3 photos, a file that is no image (skipped) and a text row."""
    root = tmp_path_factory.mktemp("info")
    folder = root / "photos"
    make_photos(folder, 3)
    (folder / "broken.png").write_bytes(b"not a picture")
    env = {"SIGLIP_CACHE_DIR": str(root / "cache"), "SIGLIP_MODEL": str(tiny_checkpoint)}
    outs = {}
    for suffix in FORMATS:
        out = root / f"vecs{suffix}"
        result = cli("embed", folder, "--out", out, "--text", "a red square", "--template", "a photo of {}.", env=env)
        assert result.exit_code == 1, result.stderr  # (one input skipped)
        outs[suffix] = out
    return {"root": root, "folder": folder, "env": env, "outs": outs}


def _info(made, *args):
    return cli("info", *args, env=made["env"])


@pytest.mark.parametrize("suffix", FORMATS)
def test_info_json_describes_the_index_as_it_reads_back(made, suffix):
    out = made["outs"][suffix]
    result = _info(made, out, "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    store = open_store(out)
    meta = store.meta
    for key in ("model", "revision", "model_dtype", "decode", "normalized", "templates", "dim", "dtype", "created"):
        assert info[key] == meta[key], key
    assert info["templates"] == ["a photo of {}."]
    assert info["rows"] == {"image": 3, "text": 1} and info["format"] == suffix[1:]
    assert info["max_patches"] is None  # not a NaFlex model
    assert info["skipped"] == meta["skipped"] and Path(info["skipped"][0]["path"]).name == "broken.png"
    files = {f["path"]: f["bytes"] for f in info["files"]}
    assert files == {str(p): p.stat().st_size for p in output_files(out)}
    assert info["bytes"] == sum(files.values())
    assert info["paths"] == "absolute" and info["partial"] is None


def test_info_table_shows_the_same_facts(made):
    out = made["outs"][".npy"]
    result = _info(made, out, "--format", "table")
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    meta = open_store(out).meta
    for fragment in (meta["model"], meta["revision"], "3 images, 1 text", f"{meta['dim']}-d float32, L2-normalised",
                     "'a photo of {}.'", "absolute", "1 input", meta["created"], "in 4 files", "broken.png"):
        assert fragment in text, fragment
    for path in output_files(out):
        assert f"{path.stat().st_size:,}" in text and path.name in text
    piped = _info(made, out)  # piped: one JSON line
    assert piped.exit_code == 0 and json.loads(piped.stdout)["rows"]["image"] == 3
    assert len(piped.stdout.splitlines()) == 1


def test_info_names_an_older_store_with_relative_paths_and_a_patch_budget(made, tmp_path):
    out = made["outs"][".npz"]
    old = tmp_path / "old.npz"
    _write_old_store(out, old, made["root"])
    info = json.loads(_info(made, old, "--json").stdout)
    assert info["paths"] == "relative" and info["model"] == os.path.relpath(open_store(out).meta["model"], made["root"])
    table = _info(made, old, "--format", "table").stdout
    assert "relative to the folder embed ran in" in table

    store = open_store(out)  # the same rows with a NaFlex patch budget recorded
    rows = np.ascontiguousarray(store.rows)
    meta = {**{k: v for k, v in store.meta.items() if k not in _COMPUTED}, "max_patches": 256}
    entries = [Entry(store.kind(i), n, tuple(store.stamps[i].tolist()), rows, i) for i, n in enumerate(store.names)]
    write_store(tmp_path / "naflex.npz", entries, store.dim, store.meta["dtype"], meta)
    assert json.loads(_info(made, tmp_path / "naflex.npz", "--json").stdout)["max_patches"] == 256
    assert "256 patches per image" in _info(made, tmp_path / "naflex.npz", "--format", "table").stdout


def test_info_on_a_missing_or_damaged_index_is_one_line(made, tmp_path):
    missing = _info(made, tmp_path / "nothing.npy")
    assert missing.exit_code == 2 and one_error_line(missing.stderr, "nothing.npy", "no such file")
    damaged = tmp_path / "damaged.npy"
    for path in output_files(made["outs"][".npy"]):
        (tmp_path / path.name.replace("vecs", "damaged")).write_bytes(path.read_bytes())
    with open(damaged, "r+b") as fh:
        fh.truncate(os.path.getsize(damaged) - 8)
    result = _info(made, damaged)
    assert result.exit_code == 1 and result.stdout == ""
    one_error_line(result.stderr, "damaged.npy", "truncated")


def test_info_mentions_an_interrupted_run(made, tmp_path):
    out = made["outs"][".parquet"]
    partial = out.with_name(out.name + ".partial")
    partial.mkdir()
    try:
        info = json.loads(_info(made, out, "--json").stdout)
        assert info["partial"] == str(partial)
        assert "--resume" in _info(made, out, "--format", "table").stdout
    finally:
        partial.rmdir()


def test_info_never_imports_torch(made):
    code = ("import sys\nsys.argv = ['siglip', 'info', sys.argv[1], '--json']\nfrom siglip_cli.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'\n")
    result = subprocess.run([sys.executable, "-c", code, str(made["outs"][".npy"])], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rows"] == {"image": 3, "text": 1}
