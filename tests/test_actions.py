"""The journaled actions module: moves, copies and links into a folder, their manifest, and undo.

Every test works on real files and compares SHA-256 digests of whole trees before and after.
Crashes are real: a child process is killed with SIGKILL at a chosen point of a run."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path, PurePosixPath

import pytest

from siglip_cli.actions import SORT_MANIFEST, Journal, numbered, read_manifest, undo
from siglip_cli.core.errors import OutputError, UsageError

ROOT = Path(__file__).resolve().parents[1]


def tree(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Every entry under `folder`: file -> sha256, symlink -> 'link:target', folder -> 'dir'."""
    found = {}
    for path in sorted(folder.rglob("*")):
        relative = str(path.relative_to(folder))
        if any(relative == s or relative.startswith(s + "/") for s in skip):
            continue
        if path.is_symlink():
            found[relative] = "link:" + os.readlink(path)
        elif path.is_dir():
            found[relative] = "dir"
        else:
            found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def make_inputs(folder: Path, count: int = 5, size: int = 3000) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img{i}.jpg"
        path.write_bytes(os.urandom(size) + bytes([i]))
        paths.append(path)
    return paths


def stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / SORT_MANIFEST).read_text().splitlines() if line.strip()]


def only_manifest(folder: Path) -> bool:
    return {p.name for p in folder.iterdir()} <= {SORT_MANIFEST, f".{SORT_MANIFEST}.lock"}


# ----------------------------------------------------------------------------- each action
def test_copy_writes_same_bytes_and_records_before_and_after(tmp_path):
    [source] = make_inputs(tmp_path / "in", 1)
    before = source.read_bytes()
    with Journal(tmp_path / "out") as journal:
        outcome = journal.copy(source, "cat/img0.jpg", expected=stamp(source))
    assert outcome.done and outcome.method == "copy"
    assert outcome.destination == tmp_path / "out" / "cat" / "img0.jpg"
    assert outcome.destination.read_bytes() == before == source.read_bytes()
    assert outcome.destination.stat().st_mtime_ns == source.stat().st_mtime_ns  # kept, like cp -p
    begin, done = [r for r in records(tmp_path / "out") if r["event"] in ("begin", "done")]
    assert begin["op"] == "copy" and begin["source"] == str(source) and begin["destination"] == "cat/img0.jpg"
    assert begin["size"] == len(before) and begin["sha256"] == hashlib.sha256(before).hexdigest()
    assert done == {**done, "event": "done", "step": begin["step"], "method": "copy"}
    assert not [p for p in (tmp_path / "out" / "cat").iterdir() if p.name.endswith(".siglip-tmp")]


def test_move_on_one_file_system_renames(tmp_path):
    [source] = make_inputs(tmp_path / "in", 1)
    data, inode = source.read_bytes(), source.stat().st_ino
    with Journal(tmp_path / "out") as journal:
        outcome = journal.move(source, "dog/img0.jpg", expected=stamp(source))
    assert outcome.method == "rename" and not source.exists()
    assert outcome.destination.read_bytes() == data and outcome.destination.stat().st_ino == inode
    assert outcome.destination.stat().st_nlink == 1


def test_link_makes_a_hard_link(tmp_path):
    [source] = make_inputs(tmp_path / "in", 1)
    with Journal(tmp_path / "out") as journal:
        outcome = journal.link(source, "x/img0.jpg")
    assert outcome.method == "hardlink"
    assert outcome.destination.stat().st_ino == source.stat().st_ino


def test_collisions_get_numbered_names_and_never_overwrite(tmp_path):
    sources = make_inputs(tmp_path / "in", 3)
    out = tmp_path / "out"
    (out / "cat").mkdir(parents=True)
    (out / "cat" / "photo.jpg").write_bytes(b"someone else's")
    with Journal(out) as journal:
        outcomes = [journal.copy(s, "cat/photo.jpg") for s in sources]
    assert [o.destination.name for o in outcomes] == ["photo (2).jpg", "photo (3).jpg", "photo (4).jpg"]
    assert (out / "cat" / "photo.jpg").read_bytes() == b"someone else's"
    for source, outcome in zip(sources, outcomes):
        assert outcome.destination.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("name, number, expected", [
    ("photo.jpg", 2, "photo (2).jpg"), ("photo.jpg", 1, "photo.jpg"), ("README", 3, "README (3)"),
    (".hidden", 2, ".hidden (2)"), ("a.tar.gz", 2, "a.tar (2).gz"),
])
def test_numbered_names(name, number, expected):
    assert numbered(name, number) == expected


def test_a_source_changed_or_gone_since_listing_is_skipped(tmp_path):
    changed, gone = make_inputs(tmp_path / "in", 2)
    listed = stamp(changed), stamp(gone)
    changed.write_bytes(b"new content, new size")
    gone.unlink()
    with Journal(tmp_path / "out") as journal:
        first = journal.move(changed, "a/changed.jpg", expected=listed[0])
        second = journal.copy(gone, "a/gone.jpg", expected=listed[1])
    assert "changed since it was listed" in first.skipped and changed.read_bytes() == b"new content, new size"
    assert "vanished" in second.skipped
    assert not (tmp_path / "out" / "a" / "changed.jpg").exists()


@contextlib.contextmanager
def read_only_folder(folder: Path, fill):
    """`folder`, filled by `fill(folder)`, then made read-only: a tmpfs remounted read-only when
    we are root (root ignores permission bits, not a read-only mount), else chmod 555."""
    folder.mkdir(parents=True)
    if os.geteuid() != 0:
        fill(folder)
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to make a read-only folder: {made.stderr.strip()}")
    try:
        fill(folder)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_source_in_a_read_only_folder_is_not_moved(tmp_path):
    with read_only_folder(tmp_path / "in", lambda f: make_inputs(f, 1)) as folder:
        source = folder / "img0.jpg"
        with Journal(tmp_path / "out") as journal:
            outcome = journal.move(source, "a/img0.jpg")
        assert "read-only" in outcome.skipped and source.exists()
        assert not (tmp_path / "out" / "a" / "img0.jpg").exists()


# ----------------------------------------------------------------------------- undo
def test_undo_restores_the_tree_byte_for_byte(tmp_path):
    sources = make_inputs(tmp_path / "in", 6)
    before = tree(tmp_path / "in")
    out = tmp_path / "out"
    with Journal(out) as journal:
        journal.start_run()
        for i, source in enumerate(sources):
            op = ("move", "copy", "link")[i % 3]
            getattr(journal, op)(source, f"label{i % 2}/{source.name}", expected=stamp(source))
    assert tree(tmp_path / "in") != before  # the moves happened
    outcomes = undo(out)
    assert sorted(o.result for o in outcomes) == ["removed"] * 4 + ["restored"] * 2
    assert tree(tmp_path / "in") == before
    assert only_manifest(out)  # emptied label folders are gone, the manifest stays
    assert undo(out) == []  # idempotent
    assert tree(tmp_path / "in") == before


def test_undo_keeps_a_copy_changed_since(tmp_path):
    [source] = make_inputs(tmp_path / "in", 1)
    out = tmp_path / "out"
    with Journal(out) as journal:
        outcome = journal.copy(source, "a/img0.jpg")
    outcome.destination.write_bytes(b"edited by the user")
    [result] = undo(out)
    assert result.result == "kept" and "changed" in result.note
    assert outcome.destination.read_bytes() == b"edited by the user"


def test_undo_puts_back_a_moved_file_edited_since_and_says_so(tmp_path):
    [source] = make_inputs(tmp_path / "in", 1)
    out = tmp_path / "out"
    with Journal(out) as journal:
        outcome = journal.move(source, "a/img0.jpg")
    outcome.destination.write_bytes(b"edited")
    [result] = undo(out)
    assert result.result == "restored" and "changed since" in result.note
    assert source.read_bytes() == b"edited"


def test_undo_never_overwrites_a_file_back_at_the_source(tmp_path):
    [source] = make_inputs(tmp_path / "in", 1)
    out = tmp_path / "out"
    with Journal(out) as journal:
        outcome = journal.move(source, "a/img0.jpg")
    moved = outcome.destination.read_bytes()
    source.write_bytes(b"a new file with the old name")
    [result] = undo(out)
    assert result.result == "kept"
    assert source.read_bytes() == b"a new file with the old name" and outcome.destination.read_bytes() == moved


def test_undo_of_a_folder_without_a_manifest_is_refused(tmp_path):
    with pytest.raises(UsageError, match="nothing to undo"):
        undo(tmp_path)


# ----------------------------------------------------------------------------- planted symlinks
def test_a_planted_symlink_folder_is_never_written_through(tmp_path):
    [source] = make_inputs(tmp_path / "in", 1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "cat").symlink_to(elsewhere)
    with Journal(out) as journal, pytest.raises(OutputError, match="symbolic link"):
        journal.copy(source, "cat/img0.jpg")
    assert list(elsewhere.iterdir()) == []


def test_a_planted_symlink_at_the_destination_name_is_left_alone(tmp_path):
    [source] = make_inputs(tmp_path / "in", 1)
    target = tmp_path / "target.jpg"
    target.write_bytes(b"precious")
    (tmp_path / "out" / "cat").mkdir(parents=True)
    (tmp_path / "out" / "cat" / "img0.jpg").symlink_to(target)
    with Journal(tmp_path / "out") as journal:
        outcome = journal.copy(source, "cat/img0.jpg")
    assert outcome.destination.name == "img0 (2).jpg"
    assert target.read_bytes() == b"precious"


def test_a_planted_symlink_manifest_is_refused(tmp_path):
    target = tmp_path / "target"
    target.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / SORT_MANIFEST).symlink_to(target)
    with pytest.raises(OutputError, match="symbolic link"):
        Journal(out).open()
    assert target.read_text() == "precious\n"


# ----------------------------------------------------------------------------- edited manifests
@pytest.mark.parametrize("edit, message", [
    (lambda lines: lines[:2] + ["{not json"] + lines[2:], "line 3: not JSON"),
    (lambda lines: [line.replace('"a/img0.jpg"', '"../../escape.jpg"') for line in lines], "not a path inside"),
    (lambda lines: [line.replace('"a/img0.jpg"', '"/etc/img0.jpg"') for line in lines], "not a path inside"),
    (lambda lines: lines + ['{"event": "done", "step": 99}'], "never begun"),
    (lambda lines: lines + ['[1, 2]'], "not a siglip manifest record"),
])
def test_an_edited_manifest_is_refused_and_nothing_is_touched(tmp_path, edit, message):
    sources = make_inputs(tmp_path / "in", 2)
    out = tmp_path / "out"
    with Journal(out) as journal:
        journal.start_run()
        journal.move(sources[0], "a/img0.jpg")
        journal.copy(sources[1], "a/img1.jpg")
    manifest = out / SORT_MANIFEST
    manifest.write_text("\n".join(edit(manifest.read_text().splitlines())) + "\n")
    before_in, before_out = tree(tmp_path / "in"), tree(out, skip=(SORT_MANIFEST,))
    with pytest.raises(OutputError, match=message):
        undo(out)
    assert tree(tmp_path / "in") == before_in and tree(out, skip=(SORT_MANIFEST,)) == before_out


def test_a_torn_last_line_is_a_step_that_never_began(tmp_path):
    [source] = make_inputs(tmp_path / "in", 1)
    out = tmp_path / "out"
    with Journal(out) as journal:
        journal.copy(source, "a/img0.jpg")
    with open(out / SORT_MANIFEST, "a") as fh:
        fh.write('{"event": "begin", "step": 2, "op": "mo')  # SIGKILL while writing
    assert len(read_manifest(out / SORT_MANIFEST)) == 1
    with Journal(out) as journal:  # a later run ends the torn line and carries on
        journal.copy(source, "a/img0.jpg")
    assert [step.number for step in read_manifest(out / SORT_MANIFEST)] == [1, 2]
    assert sorted(o.result for o in undo(out)) == ["removed", "removed"]


# ----------------------------------------------------------------------------- locking
def test_two_runs_never_share_a_manifest(tmp_path):
    with Journal(tmp_path / "out"):
        with pytest.raises(UsageError, match="another siglip run"):
            Journal(tmp_path / "out").open()
    with Journal(tmp_path / "out"):  # free again afterwards
        pass


# ----------------------------------------------------------------------------- SIGKILL mid-run
# The start of a child script: `counting(real)` wraps an os function so that the process kills
# itself with SIGKILL just before the `kill_at`-th call of any wrapped one (the script sets
# kill_at; `calls` counts).
KILL_AT_CALL = textwrap.dedent("""
    import os, signal, sys
    calls = 0
    def counting(real):
        def wrapper(*args, **kwargs):
            global calls
            calls += 1
            if calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return wrapper
""")

CHILD = KILL_AT_CALL + textwrap.dedent("""
    from pathlib import Path
    from siglip_cli.actions import Journal

    out, op, kill_at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    sources = [Path(p) for p in sys.argv[4:]]
    # every change on disk is one of these calls: the child dies just before the kill_at-th one
    for name in ("link", "unlink", "rename", "write", "fsync", "symlink", "mkdir"):
        setattr(os, name, counting(getattr(os, name)))
    with Journal(out) as journal:
        for i, source in enumerate(sources):
            getattr(journal, op)(source, f"label{i % 2}/{source.name}")
    print("finished", calls)
""")


def run_child(out: Path, op: str, kill_at: int, sources: list[Path]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", CHILD, str(out), op, str(kill_at), *map(str, sources)],
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("op", ["move", "copy", "link"])
def test_undo_after_sigkill_at_every_point_restores_the_tree(tmp_path, op):
    """Kill the run before each successive change on disk, then undo: the inputs come back
    byte for byte and the destination holds only the manifest."""
    probe = make_inputs(tmp_path / "probe", 3, size=500)
    finished = run_child(tmp_path / "probe-out", op, 10**9, probe)
    total = int(finished.stdout.split()[-1])
    assert total > 6
    for kill_at in range(1, total + 1):
        case = tmp_path / f"k{kill_at}"
        sources = make_inputs(case / "in", 3, size=500)
        before = tree(case / "in")
        result = run_child(case / "out", op, kill_at, sources)
        assert result.returncode == -signal.SIGKILL, (kill_at, result.stderr)
        if (case / "out" / SORT_MANIFEST).exists():
            undo(case / "out")
            assert only_manifest(case / "out"), (kill_at, tree(case / "out"))
        assert tree(case / "in") == before, kill_at
        assert undo(case / "out") == [] if (case / "out" / SORT_MANIFEST).exists() else True


# ----------------------------------------------------------------------------- other file systems
@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs mounted under tmp_path: another file system (and one that fills up)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the cross-device paths run in CI as root)")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_move_across_file_systems_copies_verifies_and_deletes(tmp_path, tmpfs):
    sources = make_inputs(tmp_path / "in", 3)
    before = tree(tmp_path / "in")
    with Journal(tmpfs / "out") as journal:
        outcomes = [journal.move(s, f"a/{s.name}", expected=stamp(s)) for s in sources]
    assert [o.method for o in outcomes] == ["copy+delete"] * 3
    assert not any(s.exists() for s in sources)
    assert {o.destination.name: hashlib.sha256(o.destination.read_bytes()).hexdigest() for o in outcomes} == before
    assert [o.result for o in undo(tmpfs / "out")] == ["restored"] * 3
    assert tree(tmp_path / "in") == before and only_manifest(tmpfs / "out")


def test_link_across_file_systems_falls_back_to_a_symlink(tmp_path, tmpfs):
    [source] = make_inputs(tmp_path / "in", 1)
    with Journal(tmpfs / "out") as journal:
        outcome = journal.link(source, "a/img0.jpg")
    assert outcome.method == "symlink" and os.readlink(outcome.destination) == str(source)
    assert [o.result for o in undo(tmpfs / "out")] == ["removed"]
    assert source.exists() and not outcome.destination.exists()


@pytest.mark.parametrize("op", ["move", "copy"])
def test_sigkill_mid_cross_device_move_then_undo(tmp_path, tmpfs, op):
    for kill_at in range(1, 40, 3):
        case = tmp_path / f"k{kill_at}"
        sources = make_inputs(case / "in", 2, size=2000)
        before = tree(case / "in")
        out = tmpfs / f"k{kill_at}"
        result = run_child(out, op, kill_at, sources)
        if (out / SORT_MANIFEST).exists():
            undo(out)
            assert only_manifest(out), (kill_at, tree(out))
        assert tree(case / "in") == before, (kill_at, result.stderr)


def test_a_full_disk_mid_copy_loses_nothing(tmp_path, tmpfs):
    small, big = tmp_path / "small.jpg", tmp_path / "big.jpg"
    small.write_bytes(os.urandom(10_000))
    big.write_bytes(os.urandom(600_000))  # more than the 256k tmpfs holds
    with Journal(tmpfs / "out") as journal:
        assert journal.copy(small, "a/small.jpg").done
        with pytest.raises(OutputError, match="no space left"):
            journal.move(big, "a/big.jpg")
    assert big.stat().st_size == 600_000  # the source of the failed move is whole
    assert sorted(p.name for p in (tmpfs / "out" / "a").iterdir()) == ["small.jpg"]  # no half file
    events = [r["event"] for r in records(tmpfs / "out")]
    assert events[-2:] == ["begin", "failed"]
    assert [o.result for o in undo(tmpfs / "out")] == ["nothing", "removed"]
