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
