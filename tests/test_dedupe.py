"""`siglip dedupe`: levels, groups around the kept image (no chains), keep rules, outputs, the
histogram, both neighbour methods, and --index brought up to date as `embed --update` does.

Random-weight checkpoints say nothing about real SigLIP geometry: end-to-end runs check what
they can (exact copies; re-encoded, resized and cropped copies at `near`; distinct pictures in
no group; cosines equal to transformers' own), and the levels are checked exactly on embeddings
planted in a store written by the store's own writer (`write_store`) beside real image files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from siglip_cli.duplicates import NEAR_THRESHOLD
from siglip_cli.store import Entry, open_store, write_store

from .search_fixtures import cli, one_error_line, reference_image_embeddings
from .test_actions import KILL_AT_CALL

DIM = 16


@pytest.fixture()
def env(tmp_path, tiny_checkpoint):
    return {"SIGLIP_CACHE_DIR": str(tmp_path / "cache"), "SIGLIP_MODEL": str(tiny_checkpoint)}


def _scene(seed: int) -> Image.Image:
    """A smooth picture (a random 9x7 grid, bicubic-upscaled) twice the size of a view."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)).resize((384, 288), Image.BICUBIC)


def _view(big: Image.Image, dx: int = 0, dy: int = 0) -> Image.Image:
    return big.crop((96 + dx, 72 + dy, 96 + dx + 192, 72 + dy + 144))


def build_corpus(folder: Path) -> dict[str, str]:
    """Distinct photos d0..d5, and copies of d0: exact, JPEG q60, 50% resize, 5% crop,
    brightened, and a burst of shifted views. Returns name -> what it is."""
    folder.mkdir(parents=True, exist_ok=True)
    kinds = {}
    for i in range(6):
        _view(_scene(1000 + i)).save(folder / f"d{i}.png")
        kinds[f"d{i}.png"] = "distinct"
    original = _view(_scene(1000))
    shutil.copyfile(folder / "d0.png", folder / "d0_copy.png")
    original.save(folder / "d0_q60.jpg", quality=60)
    original.resize((96, 72), Image.LANCZOS).save(folder / "d0_half.png")
    w, h = original.size
    original.crop((round(w * 0.025), round(h * 0.025), w - round(w * 0.025), h - round(h * 0.025))).save(folder / "d0_crop.png")
    ImageEnhance.Brightness(original).enhance(1.15).save(folder / "d0_bright.png")
    for j, dx in enumerate((30, 60)):
        _view(_scene(1000), dx, dx // 3).save(folder / f"d0_burst{j}.png")
    kinds.update({"d0_copy.png": "exact", "d0_q60.jpg": "jpeg", "d0_half.png": "half", "d0_crop.png": "crop",
                  "d0_bright.png": "bright", "d0_burst0.png": "burst", "d0_burst1.png": "burst"})
    return kinds


def _groups(stdout: str) -> list[dict]:
    return json.loads(stdout)


def _members(groups: list[dict]) -> dict[str, tuple[str, str]]:
    """duplicate name -> (kept name, level)"""
    return {Path(d["path"]).name: (Path(g["keep"]).name, d["level"]) for g in groups for d in g["duplicates"]}


# ============================================================================ end to end
def test_exact_and_near_copies_are_found_and_distinct_photos_join_no_group(env, tmp_path, reference_factory, tiny_checkpoint):
    folder = tmp_path / "photos"
    kinds = build_corpus(folder)
    result = cli("dedupe", folder, "--json", "--exact", env=env)
    assert result.exit_code == 0, result.stderr
    groups = _groups(result.stdout)
    members = _members(groups)
    assert len(groups) == 1 and Path(groups[0]["keep"]).name == "d0.png"  # largest: the full-size original
    assert members["d0_copy.png"] == ("d0.png", "exact")
    for name in ("d0_q60.jpg", "d0_half.png", "d0_crop.png"):
        assert members[name] == ("d0.png", "near"), name
    grouped = {Path(groups[0]["keep"]).name, *members}
    assert not grouped & {n for n, kind in kinds.items() if kind == "distinct" and n != "d0.png"}
    # the cosines are transformers' own, kept image against each duplicate
    reference = reference_factory(tiny_checkpoint)
    names = ["d0.png", *[Path(d["path"]).name for d in groups[0]["duplicates"]]]
    vectors = reference_image_embeddings(reference, [folder / n for n in names])
    for duplicate, vector in zip(groups[0]["duplicates"], vectors[1:]):
        assert duplicate["cosine"] == pytest.approx(float(vectors[0] @ vector), abs=1e-4)
    assert "1 group, 4 duplicates taking" in result.stderr


def test_the_summary_counts_the_bytes_the_duplicates_take(env, tmp_path):
    folder = tmp_path / "photos"
    build_corpus(folder)
    result = cli("dedupe", folder, "--format", "csv", "--exact", env=env)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "group,keep,path,level,cosine,move_to,planned"
    paths = [line.split(",")[2] for line in lines[1:]]
    total = sum(os.path.getsize(p) for p in paths)
    summary = [line for line in result.stderr.splitlines() if "duplicates taking" in line][0]
    assert summary.endswith(f"taking {total / 1000:.1f} kB")


def test_a_bad_file_is_skipped_and_reported_and_the_rest_still_grouped(env, tmp_path):
    folder = tmp_path / "photos"
    build_corpus(folder)
    (folder / "broken.png").write_bytes(b"not a png at all")
    result = cli("dedupe", folder, "--json", "--exact", env=env)
    assert result.exit_code == 1
    assert "broken.png" in result.stderr and "Traceback" not in result.stderr
    assert _members(_groups(result.stdout))["d0_copy.png"][1] == "exact"


def test_index_is_made_then_only_changes_are_embedded(env, tmp_path):
    folder = tmp_path / "photos"
    build_corpus(folder)
    index = tmp_path / "vecs.npy"
    first = cli("dedupe", folder, "--index", index, "--json", env=env)
    assert first.exit_code == 0, first.stderr
    assert "13 embedded, 0 kept from before" in first.stderr
    shutil.copyfile(folder / "d3.png", folder / "d3_again.png")
    second = cli("dedupe", folder, "--index", index, "--json", env=env)
    assert second.exit_code == 0, second.stderr
    assert "--update: 1 new (or skipped before), 0 changed, 13 unchanged, 0 gone" in second.stderr
    assert "1 embedded, 13 kept from before" in second.stderr
    assert _members(_groups(second.stdout))["d3_again.png"] == ("d3.png", "exact")
    assert open_store(index).image_count == 14
    # --index alone: the store as it is, the same groups
    alone = cli("dedupe", "--index", index, "--json", "--neighbours", "exact", env=env)
    assert alone.exit_code == 0, alone.stderr
    assert _groups(alone.stdout) == _groups(second.stdout)
    pytest.importorskip("faiss", reason="the approximate index needs faiss: pip install 'siglip-cli[ann]'")
    for _ in range(2):  # built and saved beside the store, then reused: the same groups
        approximate = cli("dedupe", "--index", index, "--json", "--neighbours", "approximate", env=env)
        assert approximate.exit_code == 0, approximate.stderr
        assert _groups(approximate.stdout) == _groups(second.stdout)
    assert "building the approximate neighbour index" not in approximate.stderr and "reusing" in approximate.stderr
    assert (tmp_path / "vecs.npy.faiss").is_file()


def test_usage_errors_are_one_line(env, tmp_path):
    assert cli("dedupe", env=env).exit_code == 0  # alone: the help, as every command
    result = cli("dedupe", "--json", env=env)
    assert result.exit_code == 2
    one_error_line(result.stderr, "nothing to compare")
    result = cli("dedupe", "--index", tmp_path / "missing.npy", env=env)
    assert result.exit_code == 2
    one_error_line(result.stderr, "missing.npy", "no such file")
    result = cli("dedupe", "--index", tmp_path / "missing.npy", "--level", "exact", "--threshold", "0.9", env=env)
    assert result.exit_code == 2
    one_error_line(result.stderr, "--threshold")


# ============================================================================ planted embeddings
def _unit(*components: float) -> np.ndarray:
    vector = np.zeros(DIM, np.float32)
    vector[: len(components)] = components
    return vector / np.linalg.norm(vector)


def _at_cosine(base: np.ndarray, cosine: float, axis: int) -> np.ndarray:
    """A unit vector at exactly `cosine` from the unit vector `base` (turned towards `axis`)."""
    other = np.zeros(DIM, np.float32)
    other[axis] = 1.0
    other -= (other @ base) * base
    other /= np.linalg.norm(other)
    return (cosine * base + np.sqrt(1 - cosine**2) * other).astype(np.float32)


def plant(folder: Path, vectors: dict[str, np.ndarray], sizes: dict[str, tuple[int, int]] | None = None) -> Path:
    """Real image files (distinct bytes) named as the keys, and a store holding the given
    embeddings for them, written by the store's own writer. Returns the store."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(vectors)
    for i, name in enumerate(names):
        size = (sizes or {}).get(name, (32, 24))
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
    rows = np.stack([vectors[n] for n in names]).astype(np.float32)
    out = folder.parent / "planted.npy"
    entries = [Entry("image", str(folder / n), (os.path.getsize(folder / n), 0, b""), rows, i) for i, n in enumerate(names)]
    write_store(out, entries, DIM, "float32", {"model": "planted", "revision": "r", "normalized": True})
    return out


def _planted_levels(tmp_path: Path) -> Path:
    keep = _unit(1.0)
    return plant(tmp_path / "planted", {
        "keep.png": keep,
        "recompressed.png": _at_cosine(keep, 0.999, 1),
        "resized.png": _at_cosine(keep, 0.995, 2),
        "brightened.png": _at_cosine(keep, 0.985, 3),
        "burst1.png": _at_cosine(keep, 0.95, 4),
        "burst2.png": _at_cosine(keep, 0.92, 5),
        "other_scene.png": _at_cosine(keep, 0.80, 6),
        "unrelated.png": _unit(0, 0, 0, 0, 0, 0, 0, 1.0),
    }, sizes={"keep.png": (64, 48)})


@pytest.mark.parametrize("neighbours", ["exact", "approximate"])
def test_each_planted_level_lands_where_it_should(tmp_path, neighbours):
    if neighbours == "approximate":
        pytest.importorskip("faiss", reason="the approximate index needs faiss: pip install 'siglip-cli[ann]'")
    index = _planted_levels(tmp_path)
    near = cli("dedupe", "--index", index, "--json", "--neighbours", neighbours)
    assert near.exit_code == 0, near.stderr
    assert _members(_groups(near.stdout)) == {n: ("keep.png", "near") for n in ("recompressed.png", "resized.png", "brightened.png")}
    similar = cli("dedupe", "--index", index, "--json", "--level", "similar", "--neighbours", neighbours)
    members = _members(_groups(similar.stdout))
    assert members == {**{n: ("keep.png", "near") for n in ("recompressed.png", "resized.png", "brightened.png")},
                       **{n: ("keep.png", "similar") for n in ("burst1.png", "burst2.png")}}
    cosines = {Path(d["path"]).name: d["cosine"] for g in _groups(similar.stdout) for d in g["duplicates"]}
    assert cosines["brightened.png"] == pytest.approx(0.985, abs=1e-6)
    assert cosines["burst2.png"] == pytest.approx(0.92, abs=1e-6)
    # --threshold moves the chosen level's line
    strict = cli("dedupe", "--index", index, "--json", "--threshold", "0.99", "--neighbours", neighbours)
    assert set(_members(_groups(strict.stdout))) == {"recompressed.png", "resized.png"}
    loose = cli("dedupe", "--index", index, "--json", "--level", "similar", "--threshold", "0.79", "--neighbours", neighbours)
    assert _members(_groups(loose.stdout))["other_scene.png"] == ("keep.png", "similar")
    assert "unrelated.png" not in _members(_groups(loose.stdout))


def test_chains_do_not_glue_groups(tmp_path):
    """A~B (0.985), B~C (0.985), A!~C (cos 2θ = 0.9404): with A kept, B joins A and C stays out;
    with B kept (largest), both A and C are within B and join it."""
    a = _unit(1.0)
    b = _at_cosine(a, 0.985, 1)
    theta = np.arccos(0.985)
    c = _unit(np.cos(2 * theta), np.sin(2 * theta))
    assert float(a @ c) < NEAR_THRESHOLD
    index = plant(tmp_path / "chain", {"a.png": a, "b.png": b, "c.png": c})
    result = cli("dedupe", "--index", index, "--json", "--keep", "first")
    groups = _groups(result.stdout)
    assert [(Path(g["keep"]).name, sorted(Path(d["path"]).name for d in g["duplicates"])) for g in groups] == [("a.png", ["b.png"])]
    # the middle image kept: both ends are within it
    index = plant(tmp_path / "chain2", {"a.png": a, "b.png": b, "c.png": c}, sizes={"b.png": (64, 48)})
    groups = _groups(cli("dedupe", "--index", index, "--json").stdout)
    assert [(Path(g["keep"]).name, sorted(Path(d["path"]).name for d in g["duplicates"])) for g in groups] == [("b.png", ["a.png", "c.png"])]


def _set_exif_date(path: Path, when: str) -> None:
    with Image.open(path) as image:
        exif = image.getexif()
        exif.get_ifd(0x8769)[36867] = when
        image.convert("RGB").save(path.with_suffix(".jpg"), exif=exif, quality=90)
    path.unlink()


@pytest.mark.parametrize("rule, expected", [("largest", "b.jpg"), ("oldest", "b.jpg"), ("newest", "c.png"), ("first", "a.png")])
def test_every_keep_rule_picks_the_right_file(tmp_path, rule, expected):
    """a: small, mtime 2010. b: largest, EXIF DateTimeOriginal 2001 but mtime 2030 (EXIF wins).
    c: small, mtime 2020."""
    same = _unit(1.0)
    folder = tmp_path / "keep"
    index = plant(folder, {"a.png": same, "b.png": same, "c.png": same}, sizes={"b.png": (96, 72)})
    _set_exif_date(folder / "b.png", "2001:02:03 04:05:06")
    store = open_store(index)
    names = [n.replace("b.png", "b.jpg") for n in store.names]
    rows = np.array(store.rows)
    entries = [Entry("image", n, (os.path.getsize(n), 0, b""), rows, i) for i, n in enumerate(names)]
    write_store(index, entries, DIM, "float32", {"model": "planted", "revision": "r", "normalized": True})
    for name, year in (("a.png", 2010), ("b.jpg", 2030), ("c.png", 2020)):
        stamp = __import__("datetime").datetime(year, 6, 1).timestamp()
        os.utime(folder / name, (stamp, stamp))
    result = cli("dedupe", "--index", index, "--json", "--keep", rule)
    assert result.exit_code == 0, result.stderr
    groups = _groups(result.stdout)
    assert len(groups) == 1 and Path(groups[0]["keep"]).name == expected
    assert {Path(d["path"]).name for d in groups[0]["duplicates"]} == {"a.png", "b.jpg", "c.png"} - {expected}


def test_largest_compares_pixels_then_bytes(tmp_path):
    same = _unit(1.0)
    folder = tmp_path / "sizes"
    index = plant(folder, {"small.png": same, "plain.png": same, "busy.png": same},
                  sizes={"small.png": (16, 12), "plain.png": (40, 30), "busy.png": (40, 30)})
    Image.new("RGB", (40, 30), (10, 20, 30)).save(folder / "plain.png")  # same pixels, far fewer bytes
    assert os.path.getsize(folder / "plain.png") < os.path.getsize(folder / "busy.png")
    groups = _groups(cli("dedupe", "--index", index, "--json").stdout)
    assert Path(groups[0]["keep"]).name == "busy.png"


def test_a_file_gone_since_it_was_embedded_is_left_out_with_a_note(tmp_path):
    index = _planted_levels(tmp_path)
    (tmp_path / "planted" / "resized.png").unlink()
    result = cli("dedupe", "--index", index, "--json")
    assert result.exit_code == 0, result.stderr
    assert "resized.png" in result.stderr and "left out" in result.stderr
    assert "resized.png" not in _members(_groups(result.stdout))


def test_formats_share_one_record_shape(tmp_path):
    index = _planted_levels(tmp_path)
    as_json = _groups(cli("dedupe", "--index", index, "--json").stdout)
    lines = [json.loads(line) for line in cli("dedupe", "--index", index, "--format", "jsonl").stdout.splitlines()]
    assert lines == as_json
    assert set(as_json[0]) == {"group", "keep", "duplicates"} and set(as_json[0]["duplicates"][0]) == {"path", "level", "cosine"}
    table = cli("dedupe", "--index", index, "--format", "table").stdout
    lines = [line for line in table.splitlines() if line.strip()]
    keep_line = next(i for i, line in enumerate(lines) if "keep.png" in line)
    assert "keep" in lines[keep_line] and "0.9990" in lines[keep_line + 1] and "recompressed.png" in lines[keep_line + 1]


def test_histogram_counts_every_image_and_marks_the_thresholds(tmp_path):
    index = _planted_levels(tmp_path)
    result = cli("dedupe", "--index", index, "--json", "--level", "similar", "--histogram")
    assert result.exit_code == 0, result.stderr
    json.loads(result.stdout)  # the histogram never mixes into JSON on stdout
    assert "near threshold 0.980" in result.stderr and "similar threshold 0.900" in result.stderr
    bars = [line.split() for line in result.stderr.splitlines() if "–" in line and "threshold" not in line]
    assert sum(int(parts[1]) for parts in bars) == 8
    # nearest cosines: 0.999 (keep, recompressed), 0.995, 0.985, 0.95, 0.92, 0.80, and 0 for the
    # unrelated image, alone in the lowest bin; the top bin (0.95-1) holds at least the first four
    assert bars[0][0].startswith("0.000") and int(bars[0][1]) == 1
    assert bars[-1][0].endswith("1.000") and int(bars[-1][1]) >= 4
    table = cli("dedupe", "--index", index, "--format", "table", "--histogram")
    assert "near threshold" in table.stdout


# ============================================================================ --move-to, --undo
def _tree(folder: Path) -> dict[str, str]:
    """relative path -> SHA-256 of every file under `folder`."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _planted_tree(tmp_path: Path) -> tuple[Path, Path]:
    """photos/a/keep.png (largest) with near copies in photos/b/ and photos/b/deep/, and a second
    group in photos/c/. Returns (photos folder, store)."""
    photos = tmp_path / "photos"
    one, two = _unit(1.0), _unit(0, 1.0)
    vectors = {"a/keep.png": one, "b/copy1.png": _at_cosine(one, 0.995, 3), "b/deep/copy2.png": _at_cosine(one, 0.99, 4),
               "c/keep2.png": two, "c/copy3.png": _at_cosine(two, 0.999, 5), "a/alone.png": _unit(0, 0, 1.0)}
    for name in vectors:
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
    index = plant(photos, vectors, sizes={"a/keep.png": (64, 48), "c/keep2.png": (64, 48)})
    return photos, index


def test_move_to_then_undo_restores_the_tree_byte_for_byte(tmp_path):
    photos, index = _planted_tree(tmp_path)
    before = _tree(photos)
    dest = tmp_path / "duplicates"
    dry = cli("dedupe", "--index", index, "--move-to", dest, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.stderr
    assert _tree(photos) == before and not dest.exists()
    planned = {d["path"]: d["would_move_to"] for g in _groups(dry.stdout) for d in g["duplicates"]}
    assert planned == {str(photos / "b/copy1.png"): str(dest.resolve() / "b/copy1.png"),
                       str(photos / "b/deep/copy2.png"): str(dest.resolve() / "b/deep/copy2.png"),
                       str(photos / "c/copy3.png"): str(dest.resolve() / "c/copy3.png")}
    moved = cli("dedupe", "--index", index, "--move-to", dest, "--json")
    assert moved.exit_code == 0, moved.stderr
    assert "moved 3 duplicates" in moved.stderr and "siglip dedupe --undo" in moved.stderr
    after = _tree(photos)
    assert set(after) == {"a/keep.png", "a/alone.png", "c/keep2.png"}  # kept images never move
    assert {k: v for k, v in _tree(dest).items() if not k.startswith("siglip-dedupe") and not k.startswith(".")} == \
        {k: before[k] for k in ("b/copy1.png", "b/deep/copy2.png", "c/copy3.png")}
    undone = cli("dedupe", "--undo", dest)
    assert undone.exit_code == 0, undone.stderr
    assert "3 moved back" in undone.stderr
    assert _tree(photos) == before
    again = cli("dedupe", "--undo", dest)  # a second undo does nothing
    assert again.exit_code == 0 and _tree(photos) == before


def test_move_never_overwrites_what_is_in_the_folder(tmp_path):
    photos, index = _planted_tree(tmp_path)
    dest = tmp_path / "duplicates"
    (dest / "b").mkdir(parents=True)
    (dest / "b" / "copy1.png").write_bytes(b"someone else's file")
    result = cli("dedupe", "--index", index, "--move-to", dest, "--json")
    assert result.exit_code == 0, result.stderr
    assert (dest / "b" / "copy1.png").read_bytes() == b"someone else's file"
    moved_to = {Path(d["path"]).name: d["moved_to"] for g in _groups(result.stdout) for d in g["duplicates"]}
    assert Path(moved_to["copy1.png"]).name == "copy1 (2).png"


def test_a_destination_inside_the_inputs_is_refused_and_nothing_moves(tmp_path, env):
    photos, index = _planted_tree(tmp_path)
    before = _tree(photos)
    result = cli("dedupe", "--index", index, "--move-to", photos / "dups", "--json")
    assert result.exit_code == 2
    one_error_line(result.stderr, "--move-to", "inside the input folder")
    assert _tree(photos) == before
    result = cli("dedupe", photos, "--move-to", photos / "a" / "x", env=env)
    assert result.exit_code == 2
    one_error_line(result.stderr, "inside the input folder")


def test_a_file_changed_after_the_scan_is_skipped_not_moved(tmp_path, monkeypatch):
    import siglip_cli.duplicates as duplicates

    photos, index = _planted_tree(tmp_path)
    real = duplicates.file_facts

    def then_changed(path):
        facts = real(path)
        if path.endswith("copy1.png"):
            with open(path, "ab") as fh:
                fh.write(b"edited after the scan")
        return facts

    monkeypatch.setattr(duplicates, "file_facts", then_changed)
    monkeypatch.setattr("siglip_cli.cli.dedupe.file_facts", then_changed)
    result = cli("dedupe", "--index", index, "--move-to", tmp_path / "dups", "--json")
    assert result.exit_code == 1
    assert (photos / "b" / "copy1.png").read_bytes().endswith(b"edited after the scan")
    assert "copy1.png" in result.stderr and "1 skipped" in result.stderr
    assert not (tmp_path / "dups" / "b" / "copy1.png").exists()
    assert (tmp_path / "dups" / "c" / "copy3.png").exists()


def test_an_edited_manifest_is_refused_in_one_line_and_nothing_moves_back(tmp_path):
    photos, index = _planted_tree(tmp_path)
    dest = tmp_path / "duplicates"
    assert cli("dedupe", "--index", index, "--move-to", dest).exit_code == 0
    moved = _tree(dest)
    with open(dest / "siglip-dedupe.jsonl", "a") as fh:
        fh.write("this is not json\n")
    result = cli("dedupe", "--undo", dest)
    assert result.exit_code == 1
    one_error_line(result.stderr, "siglip-dedupe.jsonl", "edited or damaged")
    assert {k: v for k, v in _tree(dest).items() if k != "siglip-dedupe.jsonl"} == {k: v for k, v in moved.items() if k != "siglip-dedupe.jsonl"}


KILLED_CHILD = KILL_AT_CALL + """
kill_at = int(sys.argv[1])
import siglip_cli.cli.dedupe, siglip_cli.actions  # imported before the count starts
from siglip_cli.cli.app import run
for name in ("link", "unlink", "rename", "replace", "write", "fsync", "mkdir", "open"):
    setattr(os, name, counting(getattr(os, name)))
try:
    run(sys.argv[2:])
finally:
    sys.stderr.write(f"calls {calls}\\n")
"""


def test_undo_after_sigkill_in_the_middle_of_the_moves_restores_everything(tmp_path):
    import signal
    import subprocess
    import sys

    from .search_fixtures import ROOT

    photos, index = _planted_tree(tmp_path)
    before = _tree(photos)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def child(kill_at: int, dest: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", KILLED_CHILD, str(kill_at), "dedupe", "--index", str(index), "--move-to", str(dest),
                               "--format", "json"], env=env, capture_output=True, text=True, timeout=120)

    total = int(child(10**9, tmp_path / "count").stderr.rsplit("calls ", 1)[1])
    assert cli("dedupe", "--undo", tmp_path / "count").exit_code == 0 and _tree(photos) == before
    killed = 0
    for kill_at in range(1, total + 1, max(1, total // 12)):
        dest = tmp_path / f"k{kill_at}"
        result = child(kill_at, dest)
        if result.returncode != -signal.SIGKILL:
            continue
        killed += 1
        if (dest / "siglip-dedupe.jsonl").exists():
            undone = cli("dedupe", "--undo", dest)
            assert undone.exit_code == 0, (kill_at, undone.stderr)
        assert _tree(photos) == before, kill_at
    assert killed >= 6


def test_level_exact_reports_only_the_same_bytes(tmp_path):
    one = _unit(1.0)
    folder = tmp_path / "bytes"
    index = plant(folder, {"a.png": one, "b.png": one, "c.png": _at_cosine(one, 0.999, 2)})
    shutil.copyfile(folder / "a.png", folder / "b.png")  # b: a's bytes; c: only its embedding is close
    exact = _groups(cli("dedupe", "--index", index, "--json", "--level", "exact").stdout)
    assert _members(exact) == {"b.png": ("a.png", "exact")}
    near = _groups(cli("dedupe", "--index", index, "--json").stdout)
    assert _members(near) == {"b.png": ("a.png", "exact"), "c.png": ("a.png", "near")}


from .test_actions import tmpfs  # noqa: E402,F401  (a small tmpfs: another file system that fills up)


def test_a_full_disk_during_moves_is_one_line_and_undo_restores_everything(tmp_path, tmpfs):  # noqa: F811
    """The duplicates move across file systems into a 256 kB tmpfs: the first fits, the next
    does not. One line, exit 1, every file in its old place or its new one; undo restores."""
    one = _unit(1.0)
    photos = tmp_path / "photos"
    big = (300, 220)  # random pixels: ~200 kB as PNG
    index = plant(photos, {"keep.png": one, "copy1.png": _at_cosine(one, 0.999, 2), "copy2.png": _at_cosine(one, 0.998, 3)},
                  sizes={"copy1.png": big, "copy2.png": big})
    before = _tree(photos)
    result = cli("dedupe", "--index", index, "--keep", "first", "--move-to", tmpfs / "dups", "--json")
    assert result.exit_code == 1, result.stderr
    one_error_line(result.stderr, "no space left")
    import hashlib

    for name in ("copy1.png", "copy2.png"):  # each in exactly one place, whole
        here, there = photos / name, tmpfs / "dups" / name
        assert here.exists() != there.exists(), name
        assert hashlib.sha256((there if there.exists() else here).read_bytes()).hexdigest() == before[name]
    assert cli("dedupe", "--undo", tmpfs / "dups").exit_code == 0
    assert _tree(photos) == before


def test_a_relative_folder_updates_its_index_from_the_same_place(env, tmp_path, monkeypatch):
    """Typed as a user does (`siglip dedupe photos --index vecs.npy` inside the folder): the
    index names files by absolute path, as embed does, so the second run keeps every row."""
    build_corpus(tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    first = cli("dedupe", "photos", "--index", "vecs.npy", "--json", env=env)
    assert first.exit_code == 0, first.stderr
    second = cli("dedupe", "photos", "--index", "vecs.npy", "--json", env=env)
    assert second.exit_code == 0, second.stderr
    assert "0 embedded, 13 kept from before" in second.stderr
    assert all(os.path.isabs(name) for name in open_store(tmp_path / "vecs.npy").names)
    assert _groups(second.stdout) == _groups(first.stdout)


def test_an_unreadable_video_is_one_line_and_the_images_are_still_grouped(env, tmp_path):
    """Videos are compared too (tests/test_dedupe_video.py); one that cannot be read is
    reported like a bad photo, and the rest go on."""
    folder = tmp_path / "photos"
    build_corpus(folder)
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    result = cli("dedupe", folder, tmp_path / "clip.mp4", "--json", env=env)
    assert result.exit_code == 1
    assert f"{tmp_path / 'clip.mp4'}: " in result.stderr and "Traceback" not in result.stderr
    assert _members(_groups(result.stdout))  # the photos were still compared


def test_a_near_copy_never_shows_a_cosine_of_one_in_the_table():
    from siglip_cli.cli.render import _cosine_cell

    assert _cosine_cell(0.9999617) == "0.999962"  # not "1.0000": that would read as a byte copy
    assert _cosine_cell(0.99999999) == "0.999999"
    assert _cosine_cell(1.0) == "1.0000" and _cosine_cell(0.98123) == "0.9812"
