"""`siglip dedupe` on videos: each video one item, its vector the L2-normalised mean of its
sampled frames' embeddings, compared only with other videos.

Videos are generated with PyAV (tests/video_fixtures.py), 64x48 and 4 s, and embedded with the
tiny random-weight checkpoint: a shared black intro must not make two videos a group (their
first frames are identical, which is what fooled one-thumbnail-per-video tools), a re-encoded
copy is `near`, a byte copy `exact`. Cosines are checked against the mean of the frame rows
that `siglip embed --video` writes for the same files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av", reason="video inputs need PyAV: pip install 'siglip-cli[video]'")

from siglip_cli.store import Entry, open_store, write_store  # noqa: E402

from .search_fixtures import cli, make_photos, one_error_line, records  # noqa: E402
from .video_fixtures import make_video, reencode  # noqa: E402

EVERY = ["--every", "1"]  # 4 frames of a 4 s video


@pytest.fixture()
def env(tmp_path, tiny_checkpoint):
    return {"SIGLIP_CACHE_DIR": str(tmp_path / "cache"), "SIGLIP_MODEL": str(tiny_checkpoint)}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """intro_a and intro_b: the same 2 s black intro, then different scenes. copy: intro_a's
    bytes. reencoded: intro_a decoded and written again as MPEG-4 Part 2 in Matroska, at 48x36
    and a low bit rate. other: a third scene, no intro."""
    folder = tmp_path_factory.mktemp("clips")
    made = {
        "intro_a": make_video(folder / "intro_a.mp4", seconds=4, intro=2, scene=10),
        "intro_b": make_video(folder / "intro_b.mp4", seconds=4, intro=2, scene=20),
        "other": make_video(folder / "other.mp4", seconds=4, scene=30),
    }
    made["copy"] = Path(shutil.copyfile(made["intro_a"], folder / "intro_a_copy.mp4"))
    made["reencoded"] = reencode(made["intro_a"], folder / "intro_a_small.mkv", codec="mpeg4", size=(48, 36), bit_rate=50_000)
    return made


def _library(folder: Path, clips: dict[str, Path], photos: int = 2) -> Path:
    """The clips, and a few photos (one of them with a byte copy), in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in clips.values():
        shutil.copyfile(path, folder / path.name)
    make_photos(folder, photos)
    shutil.copyfile(folder / "p000.png", folder / "p000_copy.png")
    return folder


def _members(groups: list[dict]) -> dict[str, tuple[str, str]]:
    """duplicate name -> (kept name, level)"""
    return {Path(d["path"]).name: (Path(g["keep"]).name, d["level"]) for g in groups for d in g["duplicates"]}


def _frame_means(env, paths: list[Path]) -> dict[str, np.ndarray]:
    """Each video's mean frame vector, from the rows `siglip embed --video` prints (the reference)."""
    result = cli("embed", *paths, *EVERY, "--exact", "--format", "jsonl", env=env)
    assert result.exit_code == 0, result.stderr
    frames: dict[str, list] = {}
    for record in records(result.stdout):
        frames.setdefault(Path(record["path"].rpartition("#t=")[0]).name, []).append(np.asarray(record["embedding"], np.float32))
    means = {}
    for name, rows in frames.items():
        rows = np.stack(rows)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        mean = rows.mean(axis=0)
        means[name] = mean / np.linalg.norm(mean)
    return means, frames


# ============================================================================ end to end
def test_a_shared_black_intro_is_no_group_and_copies_are(env, tmp_path, clips):
    folder = _library(tmp_path / "library", clips)
    result = cli("dedupe", folder, "--video", *EVERY, "--exact", "--json", env=env)
    assert result.exit_code == 0, result.stderr
    groups = json.loads(result.stdout)
    members = _members(groups)
    assert members == {"intro_a_copy.mp4": ("intro_a.mp4", "exact"), "intro_a_small.mkv": ("intro_a.mp4", "near"),
                       "p000_copy.png": ("p000.png", "exact")}
    video_groups = [g for g in groups if g["keep"].endswith(".mp4")]
    assert len(video_groups) == 1  # intro_b and other join nothing
    assert {Path(d["path"]).name for d in video_groups[0]["duplicates"]} == {"intro_a_copy.mp4", "intro_a_small.mkv"}
    assert not any("#t=" in g["keep"] or any("#t=" in d["path"] for d in g["duplicates"]) for g in groups)  # files, never frames
    # the reference: embed's own frame rows, averaged. The intros' first frames are the same
    # picture (a one-thumbnail tool sees cosine 1), yet their means are far apart.
    means, frames = _frame_means(env, [folder / "intro_a.mp4", folder / "intro_b.mp4", folder / "intro_a_small.mkv"])
    assert len(frames["intro_a.mp4"]) == 4
    assert float(frames["intro_a.mp4"][0] @ frames["intro_b.mp4"][0]) == pytest.approx(1.0, abs=1e-5)
    assert float(means["intro_a.mp4"] @ means["intro_b.mp4"]) < 0.9
    reported = {Path(d["path"]).name: d["cosine"] for d in video_groups[0]["duplicates"]}
    assert reported["intro_a_small.mkv"] == pytest.approx(float(means["intro_a.mp4"] @ means["intro_a_small.mkv"]), abs=1e-4)
    assert reported["intro_a_small.mkv"] >= 0.98


def test_stills_are_grouped_as_before_beside_videos(env, tmp_path, clips):
    folder = _library(tmp_path / "library", clips)
    result = cli("dedupe", folder, "--video", *EVERY, "--exact", "--json", env=env)
    assert result.exit_code == 0, result.stderr
    groups = json.loads(result.stdout)
    assert [g["group"] for g in groups] == [1, 2]  # stills' groups first, then videos', numbered on
    assert Path(groups[0]["keep"]).suffix == ".png" and _members(groups[:1]) == {"p000_copy.png": ("p000.png", "exact")}


def test_folders_give_videos_only_with_video(env, tmp_path, clips):
    folder = _library(tmp_path / "library", clips)
    result = cli("dedupe", folder, "--exact", "--json", env=env)
    assert result.exit_code == 0, result.stderr
    assert _members(json.loads(result.stdout)) == {"p000_copy.png": ("p000.png", "exact")}
    # a video named as a file is always read, as embed reads it
    named = cli("dedupe", folder / "intro_a.mp4", folder / "intro_a_copy.mp4", *EVERY, "--json", env=env)
    assert named.exit_code == 0, named.stderr
    assert _members(json.loads(named.stdout)) == {"intro_a_copy.mp4": ("intro_a.mp4", "exact")}


def test_index_made_by_embed_video_gives_the_same_groups(env, tmp_path, clips):
    folder = _library(tmp_path / "library", clips)
    in_memory = cli("dedupe", folder, "--video", *EVERY, "--json", env=env)
    assert in_memory.exit_code == 0, in_memory.stderr
    store = tmp_path / "vecs.npz"
    made = cli("embed", folder, "--video", *EVERY, "--out", store, env=env)
    assert made.exit_code == 0, made.stderr
    assert (open_store(store).times >= 0).sum() == 5 * 4  # the store holds frames, 4 per video
    alone = cli("dedupe", "--index", store, "--json", env=env)
    assert alone.exit_code == 0, alone.stderr
    assert _members(json.loads(alone.stdout)) == _members(json.loads(in_memory.stdout))
    # PATHS with --index: brought up to date as embed --update does; nothing changed, nothing embedded
    again = cli("dedupe", folder, "--video", *EVERY, "--index", store, "--json", env=env)
    assert again.exit_code == 0, again.stderr
    assert "0 embedded" in again.stderr
    assert _members(json.loads(again.stdout)) == _members(json.loads(in_memory.stdout))
    # other sampling than the store's is refused as embed --update refuses it, before any change
    other = cli("dedupe", folder, "--video", "--every", "2", "--index", store, "--json", env=env)
    assert other.exit_code == 2
    one_error_line(other.stderr, "--update", "every")


# ============================================================================ planted frames
DIM = 16


def _unit(vector) -> np.ndarray:
    vector = np.asarray(vector, np.float32)
    return vector / np.linalg.norm(vector)


def _plant(folder: Path, stills: dict[str, np.ndarray], videos: dict[str, list[np.ndarray]], made: dict | None = None) -> Path:
    """A store written by the store's own writer: still rows, and frame rows (name#t=k, time k)
    for real generated videos (distinct bytes; `made`: make_video's arguments per video)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names, vectors, times = [], [], []
    for i, (name, vector) in enumerate(stills.items()):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(folder / name)
        names.append(str(folder / name)), vectors.append(vector), times.append(-1.0)
    for i, (name, frames) in enumerate(videos.items()):
        make_video(folder / name, **{"seconds": len(frames), "fps": 2, "scene": 40 + i, **(made or {}).get(name, {})})
        for k, vector in enumerate(frames):
            names.append(f"{folder / name}#t={k}"), vectors.append(vector), times.append(float(k))
    rows = np.stack(vectors).astype(np.float32)
    out = folder.parent / "planted.npy"
    entries = [Entry("image", n, (os.path.getsize(n.rpartition("#t=")[0] if "#t=" in n else n), 0, b""), rows, i, t)
               for i, (n, t) in enumerate(zip(names, times))]
    write_store(out, entries, DIM, "float32", {"model": "planted", "revision": "r", "normalized": True})
    return out


def test_stills_and_videos_are_never_compared_with_each_other(tmp_path):
    """still.png's row IS the mean of v1.mp4's frames (cosine 1), and a frame of v2.mp4 is
    still.png's row: neither still nor video is grouped with the other kind. v1 and v3 have the
    same frames in another order: the same mean, a group (v2~v1 is 1/sqrt 3 = 0.577, below 0.7)."""
    e = np.eye(DIM, dtype=np.float32)
    frames = [e[0], e[1], e[2]]
    mean = _unit(e[0] + e[1] + e[2])
    store = _plant(tmp_path / "mixed", {"still.png": mean, "other.png": e[5]},
                   {"v1.mp4": frames, "v2.mp4": [mean, e[7], e[8]], "v3.mp4": frames[::-1]})
    result = cli("dedupe", "--index", store, "--json", "--level", "similar", "--threshold", "0.7", "--keep", "first")
    assert result.exit_code == 0, result.stderr
    groups = json.loads(result.stdout)
    assert [(Path(g["keep"]).name, _members([g])) for g in groups] == [("v1.mp4", {"v3.mp4": ("v1.mp4", "near")})]
    assert groups[0]["duplicates"][0]["cosine"] == pytest.approx(1.0, abs=1e-6)
    # --histogram counts each still and each video once, its nearest of its own kind
    shown = cli("dedupe", "--index", store, "--json", "--histogram")
    bars = [line.split() for line in shown.stderr.splitlines() if "–" in line and "threshold" not in line]
    assert sum(int(parts[1]) for parts in bars) == 5
    assert int(bars[-1][1]) == 2  # v1 and v3 at cosine 1; still.png's nearest (other.png) is at 0


def test_a_video_vector_is_the_normalised_mean_of_its_frames(tmp_path):
    """v1: frames e0, e1 (mean along e0+e1); v2: frames e0, e0, e2 (mean along 2e0+e2): cosine
    (2)/(sqrt 2 * sqrt 5) = 0.6325, found at --threshold 0.63 and not at 0.64."""
    e = np.eye(DIM, dtype=np.float32)
    store = _plant(tmp_path / "mean", {}, {"v1.mp4": [e[0], e[1]], "v2.mp4": [e[0], e[0], e[2]]})
    expected = 2 / np.sqrt(2) / np.sqrt(5)
    found = cli("dedupe", "--index", store, "--json", "--level", "similar", "--threshold", "0.63")
    assert found.exit_code == 0, found.stderr
    groups = json.loads(found.stdout)
    assert len(groups) == 1 and groups[0]["duplicates"][0]["cosine"] == pytest.approx(expected, abs=1e-6)
    missed = cli("dedupe", "--index", store, "--json", "--level", "similar", "--threshold", "0.64")
    assert json.loads(missed.stdout) == []


@pytest.mark.parametrize("rule, expected", [("largest", "big_long.mp4"), ("oldest", "big.mp4"), ("newest", "small.mp4"), ("first", "small.mp4")])
def test_every_keep_rule_picks_the_right_video(tmp_path, rule, expected):
    """largest: pixels of a frame, then bytes (small.mp4 has the most bytes but the fewest
    pixels); oldest/newest: the modification time; first: input (store) order."""
    same = [np.eye(DIM, dtype=np.float32)[0]] * 2
    folder = tmp_path / "keep"
    store = _plant(folder, {}, {"small.mp4": same, "big.mp4": same, "big_long.mp4": same},
                   made={"small.mp4": {"size": (32, 24), "seconds": 30, "fps": 10}, "big.mp4": {"seconds": 1},
                         "big_long.mp4": {"seconds": 3}})
    sizes = {name: os.path.getsize(folder / name) for name in ("small.mp4", "big.mp4", "big_long.mp4")}
    assert sizes["small.mp4"] > sizes["big_long.mp4"] > sizes["big.mp4"]  # bytes alone would keep small.mp4
    for name, year in (("small.mp4", 2020), ("big.mp4", 2005), ("big_long.mp4", 2010)):
        stamp = __import__("datetime").datetime(year, 6, 1).timestamp()
        os.utime(folder / name, (stamp, stamp))
    result = cli("dedupe", "--index", store, "--json", "--keep", rule)
    assert result.exit_code == 0, result.stderr
    groups = json.loads(result.stdout)
    assert len(groups) == 1 and Path(groups[0]["keep"]).name == expected
    assert {Path(d["path"]).name for d in groups[0]["duplicates"]} == set(sizes) - {expected}


# ============================================================================ moves
def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_move_to_then_undo_moves_video_files_and_restores_them(env, tmp_path, clips):
    folder = _library(tmp_path / "library", clips)
    before = _tree(folder)
    dest = tmp_path / "duplicates"
    moved = cli("dedupe", folder, "--video", *EVERY, "--move-to", dest, "--json", env=env)
    assert moved.exit_code == 0, moved.stderr
    assert "moved 3 duplicates" in moved.stderr
    targets = {Path(d["path"]).name: d["moved_to"] for g in json.loads(moved.stdout) for d in g["duplicates"]}
    assert targets == {name: str(dest.resolve() / name) for name in ("p000_copy.png", "intro_a_copy.mp4", "intro_a_small.mkv")}
    assert set(_tree(folder)) == set(before) - set(targets)  # kept files never move
    assert {k: v for k, v in _tree(dest).items() if k in targets} == {k: before[k] for k in targets}
    entries = [json.loads(line) for line in (dest / "siglip-dedupe.jsonl").read_text().splitlines()]
    assert any(str(folder / "intro_a_small.mkv") in json.dumps(e) for e in entries)  # the journal names the file
    undone = cli("dedupe", "--undo", dest)
    assert undone.exit_code == 0, undone.stderr
    assert _tree(folder) == before


# ============================================================================ bad videos
def test_a_video_cut_short_is_reported_and_left_out(env, tmp_path):
    """A video that did not decode to its end: its mean would stand for a part of it, so it is
    left out, in memory and from a store that kept its first frames. --threshold -1 (every pair)
    shows it would otherwise be grouped."""
    folder = tmp_path / "cut"
    folder.mkdir()
    whole = make_video(folder / "long.mkv", codec="mpeg4", seconds=20, scene=50).read_bytes()
    (folder / "cut-short.mkv").write_bytes(whole[: len(whole) // 3])
    make_video(folder / "another.mp4", seconds=4, scene=60)
    everything = ["--level", "similar", "--threshold", "-1", "--json"]
    result = cli("dedupe", folder, "--video", *everything, env=env)
    assert result.exit_code == 1
    line = next(line for line in result.stderr.splitlines() if "cut-short.mkv" in line)
    assert "truncated?" in line and "left out of the groups" in line and "frames before are kept" not in line
    assert "Traceback" not in result.stderr
    grouped = {Path(g["keep"]).name for g in json.loads(result.stdout)} | set(_members(json.loads(result.stdout)))
    assert grouped == {"long.mkv", "another.mp4"}
    store = tmp_path / "vecs.npy"
    assert cli("embed", folder, "--video", "--out", store, env=env).exit_code == 1
    assert any(name.startswith(str(folder / "cut-short.mkv")) for name in open_store(store).names)  # its first frames kept
    alone = cli("dedupe", "--index", store, *everything, env=env)
    assert alone.exit_code == 0, alone.stderr
    assert "cut-short.mkv: was not sampled to its end when embedded; left out of the groups" in alone.stderr
    grouped = {Path(g["keep"]).name for g in json.loads(alone.stdout)} | set(_members(json.loads(alone.stdout)))
    assert grouped == {"long.mkv", "another.mp4"}
    # kept out run after run: an update that keeps the video's rows (unchanged file) still knows
    for _ in range(2):
        updated = cli("dedupe", folder, "--video", "--index", store, *everything, env=env)
        grouped = {Path(g["keep"]).name for g in json.loads(updated.stdout)} | set(_members(json.loads(updated.stdout)))
        assert grouped == {"long.mkv", "another.mp4"}, updated.stderr


def test_without_pyav_a_video_is_one_line_naming_the_extra(env, tmp_path, clips, monkeypatch):
    import siglip_cli.core.video as video

    monkeypatch.setattr(video, "_av", lambda: None)  # PyAV not installed
    folder = _library(tmp_path / "library", {"intro_a": clips["intro_a"]})
    result = cli("dedupe", folder, "--video", "--json", env=env)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if "intro_a.mp4" in line]
    assert len(errors) == 1 and "pip install 'siglip-cli[video]'" in errors[0] and "Traceback" not in result.stderr
    assert _members(json.loads(result.stdout)) == {"p000_copy.png": ("p000.png", "exact")}
