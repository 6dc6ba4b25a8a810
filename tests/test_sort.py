"""`siglip classify --sort-into DIR` and `--undo DIR` end to end, through the CLI, on real files.

Where each image must go is read from the same run's JSON scores (best label, or every label at
or above --threshold with --multi), so a sort that ignored the scores would fail."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from siglip_cli.actions import SORT_MANIFEST
from siglip_cli.cli.app import app
from siglip_cli.cli.classify import folder_name, label_folders
from siglip_cli.core.errors import UsageError

from .conftest import random_image
from .test_actions import only_manifest, tree

LABELS = "2 cats,a dog,an airplane"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def photos(tmp_path) -> Path:
    """Eight images, two of them sharing a file name in different folders."""
    folder = tmp_path / "photos"
    (folder / "trip").mkdir(parents=True)
    for i in range(6):
        random_image(100 + i, (40 + i, 36)).save(folder / f"p{i}.jpg", quality=90)
    random_image(200, (50, 40)).save(folder / "trip" / "p0.jpg", quality=90)
    random_image(201, (30, 40)).save(folder / "trip" / "q.png")
    return folder


def scored(result) -> list[dict]:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def best_folder(record: dict) -> str:
    return folder_name(record["labels"][0]["label"]) if record["labels"] else "_unsorted"


def placed(out: Path) -> dict[str, list[str]]:
    """label folder -> sorted file names in it."""
    return {p.name: sorted(f.name for f in p.iterdir()) for p in sorted(out.iterdir()) if p.is_dir()}


# ----------------------------------------------------------------------------- each action
def kill_after_done(child: subprocess.Popen, manifest: Path, steps: int) -> None:
    """SIGKILL `child` once its journal `manifest` records `steps` finished steps."""
    deadline = time.time() + 120
    while time.time() < deadline:
        if manifest.exists() and manifest.read_text().count('"event": "done"') >= steps:
            break
        if child.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {child.stderr.read().decode()}")
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()


def test_copy_sorts_by_the_best_label_and_undo_removes_the_copies(run, photos, tmp_path):
    before = tree(photos)
    out = tmp_path / "sorted"
    records = scored(run("classify", photos, "--recursive", "-l", LABELS, "--json", "--sort-into", out))
    assert tree(photos) == before  # copies: the originals are untouched
    for record in records:
        [action] = record["actions"]
        assert action["action"] == "copy" and action["method"] == "copy"
        destination = Path(action["destination"])
        assert destination.parent == out / best_folder(record)
        assert destination.read_bytes() == Path(record["path"]).read_bytes()
    names = [Path(r["actions"][0]["destination"]).name for r in records]
    assert sum(1 for n in names if n.startswith("p0")) == 2  # the two p0.jpg: one got "p0 (2).jpg" if they met
    assert (out / SORT_MANIFEST).exists()
    undone = run("classify", "--undo", out)
    assert undone.exit_code == 0, undone.stderr
    assert "8 copies or links removed" in undone.stderr
    assert only_manifest(out) and tree(photos) == before
    again = run("classify", "--undo", out)
    assert again.exit_code == 0 and "nothing to undo" in again.stderr


def test_move_then_undo_restores_the_tree_byte_for_byte(run, photos, tmp_path):
    before = tree(photos)
    mtimes = {p: p.stat().st_mtime_ns for p in photos.rglob("*") if p.is_file()}
    out = tmp_path / "sorted"
    records = scored(run("classify", photos, "--recursive", "-l", LABELS, "--json", "--sort-into", out, "--action", "move"))
    assert not [p for p in photos.rglob("*") if p.is_file()]  # every image moved
    assert sum(len(files) for files in placed(out).values()) == 8
    for record in records:
        assert Path(record["actions"][0]["destination"]).parent.name == best_folder(record)
        assert record["actions"][0]["method"] == "rename"
    undone = run("classify", "--undo", out)
    assert undone.exit_code == 0 and "8 moved back" in undone.stderr
    assert tree(photos) == before
    assert {p: p.stat().st_mtime_ns for p in photos.rglob("*") if p.is_file()} == mtimes
    assert only_manifest(out)


def test_link_makes_hard_links(run, photos, tmp_path):
    out = tmp_path / "sorted"
    records = scored(run("classify", photos, "-l", LABELS, "--json", "--sort-into", out, "--action", "link"))
    for record in records:
        [action] = record["actions"]
        assert action["method"] == "hardlink"
        assert os.stat(action["destination"]).st_ino == os.stat(record["path"]).st_ino


def test_multi_puts_an_image_under_every_passing_label(run, photos, tmp_path):
    threshold = 0.5
    out = tmp_path / "sorted"
    all_scores = scored(run("classify", photos, "-l", LABELS, "--json"))
    threshold = sorted(l["score"] for r in all_scores for l in r["labels"])[len(all_scores) * 3 // 2]  # about half pass
    records = scored(run("classify", photos, "-l", LABELS, "--json", "--sort-into", out, "--multi", "--threshold", threshold))
    expected: dict[str, list[str]] = {}
    for record in records:
        folders = [folder_name(l["label"]) for l in record["labels"] if l["score"] >= threshold] or ["_unsorted"]
        assert sorted(Path(a["destination"]).parent.name for a in record["actions"]) == sorted(folders)
        for name in folders:
            expected.setdefault(name, []).append(Path(record["path"]).name)
    assert placed(out) == {k: sorted(v) for k, v in expected.items()}
    assert len({len(r["actions"]) for r in records}) > 1  # the threshold made a difference


def test_a_threshold_nobody_passes_sends_everything_to_unsorted(run, photos, tmp_path):
    out = tmp_path / "sorted"
    scored(run("classify", photos, "-l", LABELS, "--json", "--sort-into", out, "--threshold", "1.0"))
    assert list(placed(out)) == ["_unsorted"] and len(placed(out)["_unsorted"]) == 6


def test_dry_run_prints_the_plan_and_changes_nothing(run, photos, tmp_path):
    out = tmp_path / "sorted"
    result = run("classify", photos, "--recursive", "-l", LABELS, "--json", "--sort-into", out, "--dry-run", "--action", "move")
    records = scored(result)
    assert not out.exists() and len([p for p in photos.rglob("*") if p.is_file()]) == 8
    destinations = [r["actions"][0]["destination"] for r in records]
    assert all(r["actions"][0]["planned"] for r in records)
    assert len(set(destinations)) == 8  # the same-named files get distinct names in the plan too
    assert "dry run" in result.stderr and "nothing was changed" in result.stderr
    # the plan is what a real run then does
    real = scored(run("classify", photos, "--recursive", "-l", LABELS, "--json", "--sort-into", out, "--action", "move"))
    assert [r["actions"][0]["destination"] for r in real] == destinations


def test_the_table_lists_the_actions(run, photos, tmp_path):
    out = tmp_path / "sorted"
    result = run("classify", photos / "p1.jpg", "-l", LABELS, "--format", "table", "--sort-into", out)
    assert result.exit_code == 0, result.stderr
    assert "files written" in result.stdout and "copy" in result.stdout
    [written] = [p for p in out.rglob("p1.jpg")]
    assert written.parent.name in result.stdout


def test_csv_lists_what_was_done_on_each_label_row(run, photos, tmp_path):
    """--format csv gains sorted_to, planned and xmp: each label's row names the copy in that
    label's folder (the label-less row of an image no label passed: its _unsorted copy), every
    row the sidecar; checked against the files on disk and against the same run's JSON."""
    out, threshold = tmp_path / "sorted", None
    every = scored(run("classify", photos, "-l", LABELS, "--json"))
    threshold = sorted(l["score"] for r in every for l in r["labels"])[len(every) * 2]  # some pass, some images none
    result = run("classify", photos, "-l", LABELS, "--format", "csv", "--threshold", threshold,
                 "--sort-into", out, "--multi", "--write-xmp")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == ["path", "rank", "label", "score", "logit", "error", "sorted_to", "planned", "xmp"]
    for row in rows:
        copy = Path(row["sorted_to"])
        assert copy.parent == out / (folder_name(row["label"]) if row["label"] else "_unsorted")
        assert copy.read_bytes() == Path(row["path"]).read_bytes() and row["planned"] == ""
        assert row["xmp"] == row["path"] + ".xmp" and Path(row["xmp"]).exists()
    assert {r["label"] == "" for r in rows} == {True, False}  # the threshold sent some to _unsorted
    assert sorted(r["sorted_to"] for r in rows) == sorted(str(p) for p in out.rglob("*.jpg"))  # every copy, once
    # the JSON of the same plan says the same
    plan = scored(run("classify", photos, "-l", LABELS, "--json", "--threshold", threshold, "--sort-into", tmp_path / "plan",
                      "--multi", "--dry-run"))
    planned = run("classify", photos, "-l", LABELS, "--format", "csv", "--threshold", threshold, "--sort-into", tmp_path / "plan",
                  "--multi", "--dry-run")
    from_csv = sorted((r["path"], r["label"], r["sorted_to"], r["planned"], r["xmp"]) for r in csv.DictReader(io.StringIO(planned.stdout)))
    from_json = sorted((r["path"], a.get("label", ""), a["destination"], "yes", "") for r in plan for a in r["actions"])
    assert from_csv == from_json


def test_csv_without_actions_keeps_its_columns(run, photos):
    result = run("classify", photos / "p1.jpg", "-l", LABELS, "--format", "csv")
    assert result.stdout.splitlines()[0] == "path,rank,label,score,logit,error"


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("labels, message", [
    ("cat,..", "cannot be a folder name"),
    ("a/b,a-b", "would share the folder"),
    ("Cat,cat ", "would share the folder"),
    ("_unsorted,dog", "would share the folder"),
])
def test_unsafe_labels_are_refused_before_anything(run, photos, tmp_path, labels, message):
    out = tmp_path / "sorted"
    result = run("classify", photos, "-l", labels, "--sort-into", out)
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not out.exists()


def test_folder_names_are_made_safe():
    assert folder_name("../../etc/passwd") == "-..-etc-passwd"
    assert folder_name("cat\x07\x1b[31m") == "cat[31m"
    assert folder_name("a:b?c") == "a-b-c"
    assert folder_name(" .hidden. ") == "hidden"
    long = folder_name("é" * 300)
    assert len(long.encode()) <= 100 and long == "é" * 50
    assert label_folders(["2 cats", "a dog"]) == {"2 cats": "2 cats", "a dog": "a dog"}
    with pytest.raises(UsageError):
        label_folders(["\x00\x01"])


def test_a_folder_inside_the_inputs_is_refused(run, photos):
    result = run("classify", photos, "-l", LABELS, "--sort-into", photos / "sorted")
    assert result.exit_code == 2 and "inside the input folder" in result.stderr
    assert not (photos / "sorted").exists()


def test_inputs_inside_the_folder_are_refused(run, photos, tmp_path):
    result = run("classify", photos / "p1.jpg", "-l", LABELS, "--sort-into", photos)
    assert result.exit_code == 2 and "already inside it" in result.stderr


def test_a_file_as_the_folder_is_refused(run, photos, tmp_path):
    (tmp_path / "file").write_text("x")
    result = run("classify", photos, "-l", LABELS, "--sort-into", tmp_path / "file")
    assert result.exit_code == 2 and "is a file" in result.stderr


def test_an_unwritable_folder_is_refused(run, photos, tmp_path):
    from .test_actions import read_only_folder

    with read_only_folder(tmp_path / "locked", lambda folder: None) as locked:
        result = run("classify", photos, "-l", LABELS, "--sort-into", locked / "sorted")
        assert result.exit_code == 2 and "not writable" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_moving_out_of_a_read_only_image_folder_is_one_line_per_image(run, tmp_path):
    from .test_actions import read_only_folder

    def fill(folder):
        for i in range(2):
            random_image(600 + i, (32, 32)).save(folder / f"r{i}.jpg")

    out = tmp_path / "sorted"
    with read_only_folder(tmp_path / "ro", fill) as folder:
        before = tree(folder)
        result = run("classify", folder, "-l", LABELS, "--sort-into", out, "--action", "move")
        assert result.exit_code == 1
        errors = [line for line in result.stderr.splitlines() if "error" in line]
        assert len(errors) == 2 and all("read-only" in line for line in errors), result.stderr
        assert tree(folder) == before
    assert not [p for p in out.rglob("*.jpg")]


@pytest.mark.parametrize("args, message", [
    (["--multi"], "--multi goes with --sort-into"),
    (["--dry-run"], "--dry-run goes with --sort-into"),
    (["--action", "move"], "--action goes with --sort-into"),
    (["--sort-into", "X", "--multi"], "--multi needs --threshold"),
    (["--sort-into", "X", "--multi", "--threshold", "0.1", "--action", "move"], "cannot --action move"),
])
def test_option_mistakes_are_refused(run, photos, tmp_path, args, message):
    args = [str(tmp_path / "X") if a == "X" else a for a in args]
    result = run("classify", photos, "-l", LABELS, *args)
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "X").exists()


def test_undo_of_a_folder_never_sorted_into(run, tmp_path):
    result = run("classify", "--undo", tmp_path)
    assert result.exit_code == 2 and "nothing to undo" in result.stderr


def test_undo_with_images_is_refused(run, photos, tmp_path):
    result = run("classify", photos, "--undo", tmp_path)
    assert result.exit_code == 2 and "works alone" in result.stderr


def test_an_image_that_fails_to_decode_is_reported_and_the_rest_sorted(run, photos, tmp_path):
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "sorted"
    result = run("classify", photos, "-l", LABELS, "--json", "--sort-into", out, "--action", "move")
    assert result.exit_code == 1 and "broken.jpg" in result.stderr
    assert (photos / "broken.jpg").exists()  # not moved
    assert sum(len(files) for files in placed(out).values()) == 6


def test_a_hand_edited_manifest_is_refused_by_undo(run, photos, tmp_path):
    out = tmp_path / "sorted"
    scored(run("classify", photos, "-l", LABELS, "--json", "--sort-into", out, "--action", "move"))
    manifest = out / SORT_MANIFEST
    manifest.write_text(manifest.read_text().replace('"destination": "', '"destination": "../', 1))
    before = tree(out, skip=(SORT_MANIFEST,))
    result = run("classify", "--undo", out)
    assert result.exit_code == 1 and "edited or damaged" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert tree(out, skip=(SORT_MANIFEST,)) == before


# ----------------------------------------------------------------------------- SIGKILL mid-run
SLOW_CHILD = textwrap.dedent("""
    import sys, time
    import siglip_cli.actions as actions
    real = actions.Journal.record
    def slow(self, **fields):  # slow the run down so the test can kill it half-way
        real(self, **fields)
        time.sleep(0.05)
    actions.Journal.record = slow
    from siglip_cli.cli import main
    sys.argv = ["siglip"] + sys.argv[1:]
    main()
""")


def test_sigkill_mid_sort_then_undo_restores_everything(tiny_checkpoint, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(24):
        random_image(300 + i, (32, 32)).save(photos / f"img{i:02d}.png")
    before = tree(photos)
    out = tmp_path / "sorted"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SIGLIP_MODEL": str(tiny_checkpoint),
           "SIGLIP_CACHE_DIR": str(tmp_path / "cache")}
    child = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, "classify", str(photos), "-l", LABELS,
                              "--sort-into", str(out), "--action", "move", "--format", "jsonl"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_after_done(child, out / SORT_MANIFEST, 5)
    moved = sum(1 for p in out.rglob("*.png"))
    assert 5 <= moved < 24  # killed half-way
    assert len(list(photos.iterdir())) + moved == 24  # each file in its old place or its new one
    result = CliRunner().invoke(app, ["classify", "--undo", str(out)])
    assert result.exit_code == 0, result.stderr
    assert tree(photos) == before and only_manifest(out)


def test_a_file_name_with_an_escape_sequence_is_shown_escaped(run, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    random_image(7, (32, 32)).save(photos / "evil\x1b[2J.png")
    out = tmp_path / "sorted"
    result = run("classify", photos, "-l", LABELS, "--format", "table", "--sort-into", out)
    assert result.exit_code == 0, result.stderr
    written = result.stdout[result.stdout.index("files written"):]  # the scores table is render's own
    assert "\x1b" not in written and "\x1b" not in result.stderr
    assert "evil\\x1b[2J.png" in written
    json_result = run("classify", photos, "-l", LABELS, "--json", "--sort-into", tmp_path / "again")
    assert json.loads(json_result.stdout)[0]["actions"][0]["destination"].endswith("evil\x1b[2J.png")  # JSON stays exact


def test_a_full_disk_mid_sort_is_one_line_and_every_copy_is_whole(run, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    import numpy as np
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):  # noise compresses badly: ~30 kB each, 240 kB in all
        Image.fromarray(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)).save(photos / f"n{i}.png")
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)], check=True)
    try:
        out = disk / "sorted"
        result = run("classify", photos, "-l", LABELS, "--sort-into", out)
        assert result.exit_code == 1
        errors = [line for line in result.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and "no space left" in errors[0] and "Traceback" not in result.stderr
        copies = [p for p in out.rglob("*") if p.is_file() and p.parent != out]
        assert 0 < len(copies) < 8
        for copy in copies:  # whole copies only, no temporaries
            assert copy.read_bytes() == (photos / copy.name).read_bytes()
        assert len(list(photos.iterdir())) == 8
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
