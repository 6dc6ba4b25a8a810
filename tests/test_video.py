"""Video inputs: sampling, rotation, scenes, bad videos, and classify / embed / search /
similarity on videos end to end with the tiny checkpoint. Videos are generated with PyAV."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av", reason="video inputs need PyAV: pip install 'siglip-cli[video]'")

from siglip_cli.core.errors import InputError  # noqa: E402
from siglip_cli.core.video import (  # noqa: E402
    VideoSampling,
    frame_name,
    looks_like_video,
    sample_frames,
    sample_times,
    split_frame_name,
    time_code,
)

from .search_fixtures import cli, make_photos, one_error_line, records  # noqa: E402
from .video_fixtures import decoded_frames, make_video  # noqa: E402

CONTAINERS = [("libx264", "mp4"), ("mpeg4", "mkv"), ("libvpx-vp9", "webm"), ("mpeg4", "avi")]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("videos")
    made = {f"{codec}.{suffix}": make_video(folder / f"clip-{codec}.{suffix}", codec=codec) for codec, suffix in CONTAINERS}
    made["rotated"] = make_video(folder / "portrait.mp4", rotation=90)
    made["cut"] = make_video(folder / "cut.mp4", seconds=8, gop=30, cut_at=4.3)
    return made


def _times(path, **sampling) -> list[float]:
    return [frame.time for frame in sample_frames(str(path), str(path), VideoSampling(**sampling))]


# ============================================================================ names
def test_frame_names_use_the_media_fragment_time_syntax():
    assert frame_name("clip.mp4", 12.5) == "clip.mp4#t=12.5"
    assert frame_name("clip.mp4", 2.0) == "clip.mp4#t=2"
    assert frame_name("a b.mov", 1 / 3) == "a b.mov#t=0.333"
    assert split_frame_name("x#t=1.mp4#t=2.25") == ("x#t=1.mp4", 2.25)
    assert split_frame_name("photo.jpg") is None
    assert time_code(12.5) == "00:00:12.5" and time_code(3725) == "01:02:05" and time_code(0) == "00:00:00"


def test_sample_times_every_and_max_frames_spread_over_the_video():
    assert sample_times(10.0, VideoSampling(every=2)) == [0, 2, 4, 6, 8]
    assert sample_times(10.0, VideoSampling(every=2, max_frames=3)) == pytest.approx([0, 10 / 3, 20 / 3])
    assert sample_times(0.5, VideoSampling(every=2)) == [0]


# ============================================================================ sampling
@pytest.mark.parametrize("kind", [f"{c}.{s}" for c, s in CONTAINERS])
def test_sampled_frames_are_the_frames_decoded_at_those_times(videos, kind):
    """Seeking lands on the same pixels as decoding everything from the start, in every
    container and codec."""
    path = videos[kind]
    assert looks_like_video(str(path))
    reference = decoded_frames(path)
    sampled = list(sample_frames(str(path), path.name, VideoSampling(every=1.5)))
    assert [f.time for f in sampled] == pytest.approx([0, 1.5, 3, 4.5, 6, 7.5, 9])
    for frame in sampled:
        expected = next(pixels for seconds, pixels in reference if seconds >= frame.time - 1e-6)
        got = np.asarray(frame.image)
        assert got.shape == expected.shape
        assert np.abs(got.astype(int) - expected.astype(int)).max() == 0, frame.time


@pytest.mark.parametrize("every", [1.3, 0.4])
def test_frames_skipped_on_the_way_to_a_sample_never_change_it(tmp_path, every):
    """With B-frames, the frames nothing refers to are not decoded while the sample time is far;
    the sampled frames are still exactly those of a full decode."""
    path = make_video(tmp_path / "bframes.mp4", seconds=6, gop=30, preset="medium")
    assert "B" in decoded_frames(path, kinds=True)
    reference = decoded_frames(path)
    sampled = list(sample_frames(str(path), path.name, VideoSampling(every=every)))
    targets = sample_times(6.0, VideoSampling(every=every))
    assert len(sampled) == len(targets)
    for target, frame in zip(targets, sampled):
        seconds, expected = next((t, pixels) for t, pixels in reference if t >= target - 0.05)  # 10 fps: half a frame
        assert abs(seconds - frame.time) < 1e-6, (target, frame.time)
        assert np.array_equal(np.asarray(frame.image), expected), frame.time


def test_every_max_frames_and_sub_second_sampling(videos):
    path = videos["libx264.mp4"]
    assert _times(path) == [0, 2, 4, 6, 8]
    assert _times(path, every=0.5, max_frames=4) == pytest.approx([0, 2.5, 5, 7.5])
    assert _times(path, every=0.3)[:4] == pytest.approx([0, 0.3, 0.6, 0.9])


def test_rotation_metadata_turns_frames_upright(videos, tmp_path):
    """A portrait phone video: landscape frames stored with a 90 degree display matrix."""
    frames = list(sample_frames(str(videos["rotated"]), "portrait.mp4"))
    stored = decoded_frames(videos["rotated"])[0][1]  # 48 rows x 64 columns, as encoded
    image = np.asarray(frames[0].image)
    assert image.shape == (64, 48, 3)
    assert np.abs(image.astype(int) - np.rot90(stored, 1).astype(int)).max() == 0  # turned counter-clockwise


def test_scene_cut_is_found_within_one_sample(videos):
    times = _times(videos["cut"], scenes=True)
    assert times[0] == 0
    assert len(times) == 2 and abs(times[1] - 4.3) <= 0.1 + 1e-6  # 10 fps: one frame
    assert _times(videos["cut"], scenes=True, max_frames=1) == [0]


def test_scene_min_gap_suppresses_cuts_closer_than_it(tmp_path):
    path = make_video(tmp_path / "two.mp4", seconds=6, cut_at=0.5)
    assert len(_times(path, scenes=True, min_gap=0.3)) == 2
    assert _times(path, scenes=True, min_gap=1.0) == [0]


def test_variable_frame_rate_gives_real_frame_times_once_each(tmp_path):
    stamps = [0, 0.3, 0.35, 1.9, 2.1, 2.2, 5.0, 5.5, 7.9, 8.0]
    path = make_video(tmp_path / "vfr.mkv", times=stamps)
    times = _times(path)
    assert times[:3] == pytest.approx([0, 2.1, 5.0])
    assert all(any(abs(t - s) < 1e-6 for s in stamps) for t in times)
    assert times == sorted(set(times))


# ============================================================================ bad videos
def _fails(path, *fragments, sampling=VideoSampling(), max_pixels=None):
    frames = []
    with pytest.raises(InputError) as caught:
        for frame in sample_frames(str(path), Path(path).name, sampling, max_pixels):
            frames.append(frame)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(Path(path).name + ": ")
    for fragment in fragments:
        assert fragment in message, message
    return frames


@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory, videos) -> dict[str, Path]:
    from PIL import Image

    from .conftest import random_image

    folder = tmp_path_factory.mktemp("badvideo")
    data = videos["libx264.mp4"].read_bytes()
    (folder / "cut-short.mp4").write_bytes(data[: len(data) // 2])  # the index (moov) is at the end: lost
    mkv = make_video(folder / "long.mkv", codec="mpeg4", seconds=20).read_bytes()
    (folder / "cut-short.mkv").write_bytes(mkv[: len(mkv) // 3])  # frames up to the cut stay readable
    (folder / "empty.mp4").write_bytes(b"")
    random_image(3, (64, 48)).save(folder / "still.mp4", format="JPEG")
    with av.open(str(folder / "audio.mp4"), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    headers_only = mkv[: mkv.find(b"\x1f\x43\xb6\x75")]  # up to the first Cluster: a stream, no frames
    (folder / "no-frames.mkv").write_bytes(headers_only)
    unknown = bytearray(make_video(folder / "codec.mkv", codec="mpeg4").read_bytes())
    at = unknown.find(b"V_MPEG4/ISO/ASP")
    unknown[at : at + 15] = b"V_NOSUCH/CODEC!"
    (folder / "unknown-codec.mkv").write_bytes(bytes(unknown))
    Image.new("RGB", (4, 4)).save(folder / "x.png")
    return {p.stem: p for p in folder.iterdir()}


def test_bad_videos_are_one_line_each(bad_videos):
    _fails(bad_videos["cut-short"].with_suffix(".mp4"), "not a readable video")
    _fails(bad_videos["empty"], "not a readable video")
    _fails(bad_videos["audio"], "no video stream", "audio")
    _fails(bad_videos["still"], "still image")
    with pytest.raises(InputError, match="no-frames.mkv: (not a readable video|holds no decodable frames)"):
        list(sample_frames(str(bad_videos["no-frames"]), "no-frames.mkv"))
    _fails(bad_videos["unknown-codec"], "codec")


def test_a_truncated_video_keeps_the_frames_before_the_cut(bad_videos):
    frames = _fails(bad_videos["cut-short"].with_suffix(".mkv"), "truncated?", "frames before are kept")
    assert 1 <= len(frames) < 10 and [f.time for f in frames] == [2 * k for k in range(len(frames))]


def test_max_pixels_applies_to_each_frame(videos):
    _fails(videos["libx264.mp4"], "64x48", "--max-pixels", max_pixels=1000)


def test_a_video_ending_before_a_sample_gives_what_it_has(tmp_path):
    path = make_video(tmp_path / "short.mp4", seconds=0.5)
    assert _times(path, every=2) == [0]


# ============================================================================ listing
def test_folders_give_videos_only_with_video(tmp_path, videos):
    from siglip_cli.sources import expand

    folder = tmp_path / "mixed"
    make_photos(folder, 1)
    (folder / "clip.mp4").write_bytes(videos["libx264.mp4"].read_bytes())
    assert [Path(s.name).name for s in expand([str(folder)]).sources] == ["p000.png"]
    assert [Path(s.name).name for s in expand([str(folder)], videos=True).sources] == ["clip.mp4", "p000.png"]
    assert [Path(s.name).name for s in expand([str(folder / "clip.mp4")]).sources] == ["clip.mp4"]  # named: always
    only = tmp_path / "only"
    only.mkdir()
    (only / "clip.mp4").write_bytes(videos["libx264.mp4"].read_bytes())
    assert "add --video" in expand([str(only)]).failures[0].error


# ============================================================================ end to end
@pytest.fixture()
def env(tiny_checkpoint, tmp_path):
    return {"SIGLIP_CACHE_DIR": str(tmp_path / "cache"), "SIGLIP_MODEL": str(tiny_checkpoint)}


def test_classify_gives_frames_then_a_summary(env, videos, tiny_checkpoint):
    import siglip_cli

    path = videos["libx264.mp4"]
    result = cli("classify", path, "--labels", "a bar,a field", "--every", "2", "--threshold", "0", "--json", "--exact", env=env)
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    frames, summary = out[:-1], out[-1]
    assert [r["path"] for r in frames] == [f"{path}#t={t}" for t in (0, 2, 4, 6, 8)]
    assert [r["time"] for r in frames] == [0, 2, 4, 6, 8]
    # the frame's scores are those of the same frame given as an image
    engine = siglip_cli.load(str(tiny_checkpoint), device="cpu", dtype="fp32", use_cache=False)
    pictures = [f.image for f in sample_frames(str(path), "x")]
    expected = engine.classify(pictures, ["a bar", "a field"])
    got = np.array([[{l["label"]: l["score"] for l in r["labels"]}[k] for k in ("a bar", "a field")] for r in frames])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert summary["path"] == str(path) and summary["summary"] == "video" and summary["frames"] == 5
    for item in summary["labels"]:
        column = ["a bar", "a field"].index(item["label"])
        assert item["score"] == pytest.approx(expected[:, column].max(), rel=1e-5)
        assert item["time"] == 2 * int(expected[:, column].argmax())
        assert item["ranges"] == [[0, 8]]  # threshold 0: every frame is above


def test_summary_ranges_follow_the_threshold():
    from siglip_cli.cli.classify import summarize

    scores = np.array([[0.9, 0.1], [0.2, 0.1], [0.8, 0.3], [0.7, 0.2], [0.1, 0.1]])
    summary = summarize("v.mp4", [0, 2, 4, 6, 8], scores, ["a", "b"], None, 0.5)
    assert [item.label for item in summary.labels] == ["a"]  # b never reaches 0.5
    assert summary.labels[0].ranges == [(0, 0), (4, 6)] and summary.labels[0].time == 0
    assert summarize("v.mp4", [0, 2, 4, 6, 8], scores, ["a", "b"], 1, None).labels[0].ranges is None


def test_classify_table_shows_the_summary_and_frames_on_request(env, videos):
    path = videos["libx264.mp4"]
    table = cli("classify", path, "--labels", "a bar,a field", "--format", "table", "--threshold", "0", env=env)
    assert table.exit_code == 0, table.stderr
    assert "00:00:0" in table.stdout and "frames" in table.stdout and "#t=" not in table.stdout
    assert "00:00:00–00:00:08" in table.stdout
    frames = cli("classify", path, "--labels", "a bar,a field", "--format", "table", "--frames", env=env)
    assert "#t=8" in frames.stdout


def test_classify_reports_bad_videos_and_goes_on(env, videos, bad_videos):
    result = cli("classify", bad_videos["audio"], videos["libx264.mp4"], "--labels", "x", "--every", "4", "-f", "jsonl", env=env)
    assert result.exit_code == 1
    one_error_line(result.stderr, "audio.mp4", "no video stream")
    out = records(result.stdout)
    assert out[0]["error"] and [r.get("time") for r in out[1:-1]] == [0, 4, 8] and out[-1]["summary"] == "video"


def test_a_video_with_an_image_suffix_is_read_by_content(env, videos, tmp_path):
    liar = tmp_path / "clip.jpg"
    liar.write_bytes(videos["libx264.mp4"].read_bytes())
    result = cli("classify", liar, "--labels", "x", "--every", "5", "-f", "jsonl", env=env)
    assert result.exit_code == 0, result.stderr
    assert [r["path"] for r in records(result.stdout)] == [f"{liar}#t=0", f"{liar}#t=5", str(liar)]


def test_similarity_takes_frames_as_images(env, videos):
    result = cli("similarity", "--image", videos["libx264.mp4"], "--text", "x", "--every", "5", "--json", env=env)
    assert result.exit_code == 0, result.stderr
    assert [row["name"] for row in json.loads(result.stdout)["rows"][:2]] == [f"{videos['libx264.mp4']}#t={t}" for t in (0, 5)]


# ============================================================================ embed, update, search
@pytest.mark.parametrize("suffix", [".npy", ".npz", ".jsonl", ".parquet"])
def test_embed_writes_one_row_per_frame_with_its_time(env, videos, tmp_path, suffix, tiny_checkpoint):
    import siglip_cli
    from siglip_cli.store import open_store

    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    folder = tmp_path / "in"
    make_photos(folder, 2)
    (folder / "clip.mp4").write_bytes(videos["libx264.mp4"].read_bytes())
    out = tmp_path / f"vecs{suffix}"
    result = cli("embed", folder, "--video", "--every", "3", "--out", out, "--exact", env=env)
    assert result.exit_code == 0, result.stderr
    store = open_store(out)
    clip = str(folder / "clip.mp4")
    assert store.names == [f"{clip}#t={t}" for t in (0, 3, 6, 9)] + [str(folder / "p000.png"), str(folder / "p001.png")]
    assert store.times.tolist() == [0, 3, 6, 9, -1, -1]
    assert store.meta["video"] == {"every": 3.0, "max_frames": None}
    engine = siglip_cli.load(str(tiny_checkpoint), device="cpu", dtype="fp32", use_cache=False)
    pictures = [f.image for f in sample_frames(clip, "x", VideoSampling(every=3))]
    np.testing.assert_allclose(np.asarray(store.rows[:4], np.float32), engine.embed_images(pictures), atol=2e-5)


def test_an_image_only_store_keeps_its_old_layout(env, tmp_path):
    from siglip_cli.store import STAMP_DTYPE, open_store

    folder = tmp_path / "in"
    make_photos(folder, 1)
    out = tmp_path / "vecs.npy"
    assert cli("embed", folder, "--out", out, env=env).exit_code == 0
    assert np.load(str(out) + ".stamps.npy").dtype == STAMP_DTYPE and "video" not in open_store(out).meta
    assert open_store(out).times.tolist() == [-1]


def test_update_keeps_an_unchanged_video_and_redoes_a_changed_one(env, videos, tmp_path):
    import os

    from siglip_cli.store import open_store

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.mp4").write_bytes(videos["libx264.mp4"].read_bytes())
    (folder / "b.mkv").write_bytes(videos["mpeg4.mkv"].read_bytes())
    out = tmp_path / "vecs.parquet" if _has_pyarrow() else tmp_path / "vecs.npz"
    assert cli("embed", folder, "--video", "--out", out, env=env).exit_code == 0
    before = open_store(out)
    rows_before = {n: np.asarray(r).copy() for n, r in zip(before.names, before.rows)}
    make_video(folder / "b.mkv", codec="mpeg4", seconds=4)  # b changes: 4 s now
    later = os.stat(folder / "b.mkv").st_mtime_ns + 10**9
    os.utime(folder / "b.mkv", ns=(later, later))
    result = cli("embed", folder, "--video", "--out", out, "--update", env=env)
    assert result.exit_code == 0, result.stderr
    assert "1 changed, 1 unchanged" in result.stderr and "5 kept from before" in result.stderr
    after = open_store(out)
    a, b = str(folder / "a.mp4"), str(folder / "b.mkv")
    assert after.names == [f"{a}#t={t}" for t in (0, 2, 4, 6, 8)] + [f"{b}#t={t}" for t in (0, 2)]
    assert after.times.tolist() == [0, 2, 4, 6, 8, 0, 2]
    for name, row in zip(after.names[:5], after.rows[:5]):
        np.testing.assert_array_equal(np.asarray(row), rows_before[name])  # kept, not recomputed
    other = cli("embed", folder, "--video", "--every", "1", "--out", out, "--update", env=env)
    assert other.exit_code == 2 and "video" in other.stderr  # other sampling: refused by name


def _has_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def test_embed_jsonl_stdout_gives_frame_times(env, videos):
    result = cli("embed", videos["libx264.mp4"], "--every", "5", "--format", "jsonl", env=env)
    assert result.exit_code == 0, result.stderr
    assert [(r["path"].rpartition("#t=")[2], r["time"]) for r in records(result.stdout)] == [("0", 0), ("5", 5)]


def test_a_truncated_video_keeps_its_frames_in_the_store_and_is_listed_as_skipped(env, bad_videos, tmp_path):
    from siglip_cli.store import open_store

    out = tmp_path / "vecs.npz"
    result = cli("embed", bad_videos["cut-short"].with_suffix(".mkv"), "--out", out, env=env)
    assert result.exit_code == 1
    store = open_store(out)
    assert store.count >= 1 and (store.times >= 0).all()
    assert "truncated?" in store.meta["skipped"][0]["error"]
    # --update samples it again rather than keeping it as unchanged: the store still says it is cut short
    rows = store.count
    updated = cli("embed", bad_videos["cut-short"].with_suffix(".mkv"), "--out", out, "--update", env=env)
    assert updated.exit_code == 1, updated.stderr
    assert "--update: 1 new (or skipped before), 0 changed, 0 unchanged" in updated.stderr
    store = open_store(out)
    assert store.count == rows and "truncated?" in store.meta["skipped"][0]["error"]


@pytest.fixture()
def video_store(env, videos, tmp_path):
    folder = tmp_path / "in"
    make_photos(folder, 2)
    (folder / "a.mp4").write_bytes(videos["libx264.mp4"].read_bytes())
    (folder / "b.webm").write_bytes(videos["libvpx-vp9.webm"].read_bytes())
    out = tmp_path / "vecs.npz"
    result = cli("embed", folder, "--video", "--every", "1", "--out", out, env=env)
    assert result.exit_code == 0, result.stderr
    return out, folder


def test_search_returns_frames_with_their_times(env, video_store):
    from siglip_cli.store import open_store

    out, folder = video_store
    result = cli("search", out, "a bar", "--top-k", "30", "--json", env=env)
    assert result.exit_code == 0, result.stderr
    hits = json.loads(result.stdout)[0]["results"]
    assert len(hits) == 22  # 10 + 10 frames and 2 photos
    store = open_store(out)
    times = dict(zip(store.names, store.times.tolist()))
    for hit in hits:
        assert hit.get("time", -1) == times[hit["path"]]
    assert {h["path"] for h in hits if "time" not in h} == {str(folder / "p000.png"), str(folder / "p001.png")}


def test_search_per_video_caps_each_video_and_fills_with_the_next_best(env, video_store):
    out, folder = video_store
    full = json.loads(cli("search", out, "a bar", "--top-k", "30", "--json", env=env).stdout)[0]["results"]
    capped = json.loads(cli("search", out, "a bar", "--top-k", "5", "--per-video", "2", "--json", env=env).stdout)[0]["results"]
    expected, counts = [], {}
    for hit in full:  # the brute-force answer from the whole ranking
        video = hit["path"].rpartition("#t=")[0] if "time" in hit else None
        if video is not None and counts.get(video, 0) >= 2:
            continue
        counts[video] = counts.get(video, 0) + 1 if video is not None else 0
        expected.append((hit["path"], hit["rank"]))
    # 2 + 2 frames and 2 photos can be hits; 5 are asked for
    assert sum("time" in h for h in capped) <= 4 and len(capped) == 5 and [(h["path"], h["rank"]) for h in capped] == expected[:5]


def test_search_table_shows_time_codes(env, video_store):
    out, folder = video_store
    result = cli("search", out, "a bar", "--top-k", "30", "--format", "table", env=env)
    assert result.exit_code == 0, result.stderr
    assert "00:00:09" in result.stdout and "#t=" not in result.stdout and "time" in result.stdout


def test_preview_thumbnail_of_a_hit_is_the_frame_at_its_time(videos):
    from siglip_cli.cli.preview import thumbnail

    path = str(videos["rotated"])
    picture = thumbnail(f"{path}#t=4", lambda image, width: image, time=4.0)  # the renderer gets the picture
    expected = next(f.image for f in sample_frames(path, "x") if f.time == 4)
    assert np.array_equal(np.asarray(picture), np.asarray(expected)) and picture.size == (48, 64)
    assert thumbnail(f"{path}.gone#t=4", lambda image, width: image, time=4.0) is None


def test_without_pyav_a_video_is_one_line_naming_the_extra(env, videos, tmp_path):
    from .search_fixtures import process

    blocker = tmp_path / "noav"
    blocker.mkdir()
    (blocker / "av.py").write_text("raise ImportError('PyAV is not installed')\n")
    import os

    path = os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])
    result = process("classify", videos["libx264.mp4"], "--labels", "x", "-f", "jsonl", env={**env, "PYTHONPATH": path})
    assert result.returncode == 1
    one_error_line(result.stderr, "clip-libx264.mp4", "pip install 'siglip-cli[video]'")


@pytest.mark.parametrize("seconds", [0, 0.5, 2, 12.5, 59.999, 61.25, 3725, 1 / 3])
def test_the_renderer_writes_time_codes_as_core_does(seconds):
    from siglip_cli.cli.render import time_code as rendered

    assert rendered(seconds) == time_code(seconds)


def test_ray_engine_refuses_videos_by_name(env, videos, tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    result = cli("embed", videos["libx264.mp4"], "--out", tmp_path / "v.npy", "--engine", "ray", env=env)
    assert result.exit_code == 2
    one_error_line(result.stderr, "clip-libx264.mp4", "--engine ray")


def test_resume_redoes_a_video_the_interrupted_run_did_not_finish(tiny_checkpoint, videos, tmp_path):
    import siglip_cli
    from siglip_cli.embedding import EmbedPlan, EmbedRun
    from siglip_cli.sources import expand
    from siglip_cli.store import open_store

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.mp4").write_bytes(videos["libx264.mp4"].read_bytes())
    (folder / "b.mkv").write_bytes(videos["mpeg4.mkv"].read_bytes())
    engine = siglip_cli.load(str(tiny_checkpoint), device="cpu", dtype="fp32", use_cache=False)
    engine.batch_size = 2
    plan = EmbedPlan(expand([str(folder)], videos=True).sources)
    out = tmp_path / "vecs.npz"
    calls = []

    def stop_at_the_second_video(count):
        calls.append(count)
        if len(calls) == 2:
            raise KeyboardInterrupt

    run = EmbedRun(engine, plan, out, "float32", True, None)
    with pytest.raises(KeyboardInterrupt):
        run.embed(stop_at_the_second_video)
    run.close()
    unfinished = [r for r in run.partial.records]
    assert unfinished and not any(r.get("end") for r in unfinished)  # a.mp4's last frame never arrived
    resumed = EmbedRun(engine, plan, out, "float32", True, None, resume=True)
    assert resumed.todo()[0] == plan.images  # both videos again
    resumed.embed()
    resumed.finish()
    a, b = str(folder / "a.mp4"), str(folder / "b.mkv")
    store = open_store(out)
    assert store.names == [f"{a}#t={t}" for t in (0, 2, 4, 6, 8)] + [f"{b}#t={t}" for t in (0, 2, 4, 6, 8)]
    pictures = [f.image for f in sample_frames(a, "x")]
    np.testing.assert_allclose(np.asarray(store.rows[:5]), engine.embed_images(pictures), atol=1e-5)


def test_a_consumer_that_stops_early_leaves_no_decode_thread_waiting(tiny_checkpoint, videos):
    """Frames stream through a small queue per video: when the reader of the results stops
    (a `head`, an error), the decode threads end instead of blocking on a full queue."""
    import threading
    import time

    import siglip_cli
    from siglip_cli.sources import Source

    engine = siglip_cli.load(str(tiny_checkpoint), device="cpu", dtype="fp32", use_cache=False)
    engine.video = VideoSampling(every=0.2)  # 50 frames: more than the queue holds
    pipeline = engine.image_pipeline(batch_size=2, workers=2)
    path = str(videos["libx264.mp4"])
    items = pipeline.decoded([Source(path, path), Source(path + "-2", path)])
    first = next(items)
    assert first.name == f"{path}#t=0" and first.time == 0
    items.close()
    deadline = time.time() + 10
    while time.time() < deadline and any(t.name == "siglip-decode" for t in threading.enumerate()):
        time.sleep(0.05)
    assert not any(t.name == "siglip-decode" for t in threading.enumerate())


def test_a_sample_on_a_keyframe_is_decoded_alone_and_equals_the_ordinary_decode(tmp_path, monkeypatch):
    """With B-frames the decoder holds a keyframe back for a few packets; a sample that falls on
    a keyframe is decoded from that packet alone and the decoder drained. The frames must be
    the very ones the ordinary path gives, for samples on keyframes and between them alike."""
    import siglip_cli.core.video as video_module

    path = make_video(tmp_path / "b.mp4", fps=10, seconds=6, gop=10, preset="medium", size=(96, 64))  # keyframe every 1 s
    alone = []
    keyframe_alone = video_module._Video._keyframe_alone

    def counted(self, seconds, tolerance):
        frame = keyframe_alone(self, seconds, tolerance)
        alone.append(frame is not None)
        return frame

    monkeypatch.setattr(video_module._Video, "_keyframe_alone", counted)
    sampling = VideoSampling(every=0.5)
    fast = list(sample_frames(str(path), "b.mp4", sampling))
    assert sum(alone) == 6  # 0, 1, ..., 5 s: every keyframe sample took the short way
    monkeypatch.setattr(video_module._Video, "_on_keyframe", lambda self, seconds, tolerance: False)
    ordinary = list(sample_frames(str(path), "b.mp4", sampling))
    assert [f.time for f in fast] == [f.time for f in ordinary] == [i / 2 for i in range(12)]
    for a, b in zip(fast, ordinary):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image)), a.time
