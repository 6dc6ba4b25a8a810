"""`--write-xmp` is journaled and `classify --undo` puts every sidecar back byte for byte: merged
sidecars get their old bytes (and permissions) back, new ones are removed, one edited since is
kept and named, a second undo does nothing, and a SIGKILL mid-run loses nothing."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from siglip_cli.actions import SAVED_FOLDER, SORT_MANIFEST, XMP_MANIFEST
from siglip_cli.cli.app import app

from .conftest import random_image
from .test_actions import read_only_folder, tree
from .test_sort import ROOT, SLOW_CHILD, kill_after_done
from .test_xmp import THEIRS

LABELS = "2 cats,a dog,an airplane"
OTHER = """<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="1"/>
 </rdf:RDF>
</x:xmpmeta>
"""


@pytest.fixture()
def photos(tmp_path) -> Path:
    """Four images: two with sidecars of their own (one read-only to others), two without."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(4):
        random_image(600 + i, (36, 32)).save(folder / f"p{i}.jpg", quality=90)
    (folder / "p0.jpg.xmp").write_text(THEIRS)
    (folder / "p0.jpg.xmp").chmod(0o640)
    (folder / "p1.jpg.xmp").write_text(OTHER)
    return folder


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def journal_of(result) -> Path:
    """The journal folder the run names on stderr, in its undo hint."""
    found = re.search(r"undo with: siglip classify --undo (\S+)", result.stderr)
    assert found, result.stderr
    return Path(found.group(1))


def records(journal: Path) -> list[dict]:
    return [json.loads(line) for line in (journal / XMP_MANIFEST).read_text().splitlines()]


def test_undo_restores_every_sidecar_byte_for_byte(run, photos, tmp_path):
    before = tree(photos)
    modes = {p.name: p.stat().st_mode & 0o777 for p in photos.iterdir()}
    result = run("classify", photos, "-l", LABELS, "--top-k", "2", "--write-xmp")
    assert result.exit_code == 0, result.stderr
    journal = journal_of(result)
    assert journal.parent == tmp_path / "state" / "xmp"  # $SIGLIP_STATE_DIR/xmp/<UTC time>-<pid>
    assert re.fullmatch(r"\d{8}T\d{6}Z-\d+", journal.name)
    after = tree(photos)
    assert {name for name in after if name.endswith(".xmp")} == {f"p{i}.jpg.xmp" for i in range(4)}
    assert all(after[f"p{i}.jpg.xmp"] != before.get(f"p{i}.jpg.xmp") for i in range(4))
    assert {n: h for n, h in after.items() if n.endswith(".jpg")} == {n: h for n, h in before.items() if n.endswith(".jpg")}

    # the journal: a begin record before each write with what was there, a verified copy, done after
    begun = {Path(r["path"]).name: r for r in records(journal) if r["event"] == "begin"}
    done = {r["step"]: r for r in records(journal) if r["event"] == "done"}
    for name, record in begun.items():
        assert done[record["step"]]["sha256"] == record["sha256"] == after[name]
        if name in before:
            assert record["existed"] and record["previous_sha256"] == before[name]
            assert sha(journal / SAVED_FOLDER / before[name]) == before[name]
        else:
            assert record["existed"] is False and "previous_sha256" not in record

    undone = run("classify", "--undo", journal)
    assert undone.exit_code == 0, undone.stderr
    assert "2 sidecars given back what they held before, 2 that siglip created removed, 0 changed since" in undone.stderr
    assert tree(photos) == before
    assert {p.name: p.stat().st_mode & 0o777 for p in photos.iterdir()} == modes

    again = run("classify", "--undo", journal)  # the journal stays, marked undone
    assert again.exit_code == 0 and "nothing to undo" in again.stderr
    assert tree(photos) == before


def test_a_sidecar_edited_since_is_kept_and_named(run, photos):
    before = tree(photos)
    result = run("classify", photos, "-l", LABELS, "--top-k", "1", "--write-xmp")
    assert result.exit_code == 0, result.stderr
    edited = {name: (photos / name).read_bytes().replace(b"</rdf:RDF>", b"<!-- mine --></rdf:RDF>") for name in ("p0.jpg.xmp", "p3.jpg.xmp")}
    for name, data in edited.items():
        (photos / name).write_bytes(data)
    undone = run("classify", "--undo", journal_of(result))
    assert undone.exit_code == 0, undone.stderr
    for name in edited:
        assert f"kept {photos / name}: changed since siglip wrote it" in undone.stderr
        assert (photos / name).read_bytes() == edited[name]
    assert "1 sidecars given back what they held before, 1 that siglip created removed, 2 changed since" in undone.stderr
    assert tree(photos) == {**before, **{name: hashlib.sha256(data).hexdigest() for name, data in edited.items()}}


def test_two_runs_into_one_journal_are_undone_newest_first(run, photos, tmp_path):
    before = tree(photos)
    journal = tmp_path / "my-journal"
    for labels in (LABELS, "a bird,a tree"):
        result = run("classify", photos, "-l", labels, "--top-k", "1", "--write-xmp", "--journal", journal)
        assert result.exit_code == 0, result.stderr
        assert journal_of(result) == journal
    assert len([r for r in records(journal) if r["event"] == "done"]) == 8
    undone = run("classify", "--undo", journal)
    assert undone.exit_code == 0, undone.stderr
    assert tree(photos) == before


def test_sort_into_keeps_the_xmp_journal_so_one_undo_undoes_both(run, photos, tmp_path):
    before = tree(photos)
    out = tmp_path / "sorted"
    result = run("classify", photos, "-l", LABELS, "--top-k", "1", "--write-xmp", "--sort-into", out)
    assert result.exit_code == 0, result.stderr
    assert journal_of(result) == out and (out / XMP_MANIFEST).exists() and (out / SORT_MANIFEST).exists()
    assert len(list(out.rglob("*.jpg"))) == 4
    undone = run("classify", "--undo", out)
    assert undone.exit_code == 0, undone.stderr
    assert tree(photos) == before and not list(out.rglob("*.jpg"))


def test_an_unwritable_journal_folder_is_one_line_and_no_sidecar_is_written(run, photos, tmp_path):
    before = tree(photos)
    with read_only_folder(tmp_path / "ro", lambda folder: None) as folder:
        result = run("classify", photos, "-l", LABELS, "--top-k", "1", "--write-xmp", "--journal", folder / "journal")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(folder / "journal") in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert tree(photos) == before


def test_journal_goes_with_write_xmp(run, photos, tmp_path):
    result = run("classify", photos, "-l", LABELS, "--journal", tmp_path / "j")
    assert result.exit_code == 2 and "--journal DIR goes with --write-xmp" in result.stderr
    assert not (tmp_path / "j").exists()


def test_a_hand_edited_journal_is_refused_and_nothing_is_touched(run, photos, tmp_path):
    result = run("classify", photos, "-l", LABELS, "--top-k", "1", "--write-xmp")
    journal = journal_of(result)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    manifest = journal / XMP_MANIFEST
    text = manifest.read_text()
    manifest.write_text(text.replace(f'"path": "{photos / "p3.jpg.xmp"}"', f'"path": "{victim}"', 1))
    after = tree(photos)
    undone = run("classify", "--undo", journal)
    assert undone.exit_code == 1 and "edited or damaged" in undone.stderr
    assert len(undone.stderr.strip().splitlines()) == 1
    assert tree(photos) == after and victim.read_text() == "precious\n"


def test_undo_of_a_folder_without_a_journal(run, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run("classify", "--undo", tmp_path / "empty")
    assert result.exit_code == 2 and "nothing to undo" in result.stderr


# ----------------------------------------------------------------------------- SIGKILL mid-run
def test_sigkill_mid_run_then_undo_restores_every_sidecar(tiny_checkpoint, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(24):
        random_image(700 + i, (32, 32)).save(photos / f"img{i:02d}.png")
        if i % 2 == 0:
            (photos / f"img{i:02d}.png.xmp").write_text(THEIRS.replace("holiday", f"holiday {i}"))
    before = tree(photos)
    journal = tmp_path / "journal"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SIGLIP_MODEL": str(tiny_checkpoint),
           "SIGLIP_CACHE_DIR": str(tmp_path / "cache"), "SIGLIP_STATE_DIR": str(tmp_path / "state")}
    child = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, "classify", str(photos), "-l", LABELS, "--top-k", "2",
                              "--write-xmp", "--journal", str(journal), "--format", "jsonl"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_after_done(child, journal / XMP_MANIFEST, 5)
    changed = [name for name, digest in tree(photos).items() if before.get(name) != digest]
    assert 5 <= len(changed) < 24  # killed half-way
    result = CliRunner().invoke(app, ["classify", "--undo", str(journal)])
    assert result.exit_code == 0, result.stderr
    assert tree(photos) == before  # every sidecar as it was, the new ones gone, no temporary left
