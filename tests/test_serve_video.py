"""Videos in `siglip serve` and its `--server` clients: an uploaded video is sampled as the CLI
samples it and answered with the records `classify --json` / `embed --format jsonl` print; a
store holding frame rows is searched with their times and its frame rows have thumbnails;
bad videos are 4xx and the server goes on; `--server` prints what a local run prints."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

av = pytest.importorskip("av", reason="video inputs need PyAV: pip install 'siglip-cli[video]'")

from .conftest import random_image  # noqa: E402
from .search_fixtures import ROOT, cli, make_photos, one_error_line, records  # noqa: E402
from .serve_fixtures import Server, upload  # noqa: E402
from .test_serve import same_records  # noqa: E402
from .test_serve_client import csv_cells  # noqa: E402
from .video_fixtures import make_video  # noqa: E402

LABELS = "a bar,a field,a red car"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_checkpoint):
    """A 3 s clip and a 7 s one, a photo, damaged videos, and a store embedded from the clip,
    the photo and the long video with `embed --video --every 1 --exact`, served."""
    root = tmp_path_factory.mktemp("servevideo")
    media = root / "media"
    photo = make_photos(media, 1)[0]
    clip = make_video(media / "clip.mp4", seconds=3)
    long = make_video(media / "long.mkv", codec="mpeg4", fps=4, seconds=7)  # no two frames alike: no ties in rankings
    bad = root / "bad"
    bad.mkdir()
    data = clip.read_bytes()
    (bad / "cut.mp4").write_bytes(data[: len(data) // 2])  # its index (moov) is at the end: lost
    whole = make_video(bad / "whole.mkv", codec="mpeg4", seconds=20).read_bytes()
    (bad / "cut.mkv").write_bytes(whole[: len(whole) // 3])  # the first frames stay readable
    (bad / "empty.mp4").write_bytes(b"")
    with av.open(str(bad / "audio.mp4"), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    env = {"SIGLIP_CACHE_DIR": str(root / "cache"), "SIGLIP_MODEL": str(tiny_checkpoint)}
    out = root / "frames.npy"
    made = cli("embed", media, "--video", "--every", "1", "--out", out, "--exact", env=env)
    assert made.exit_code == 0, made.stderr
    server = Server([out, "--exact"], env=env)
    yield {"server": server, "root": root, "photo": photo, "clip": clip, "long": long, "bad": bad, "out": out, "env": env}
    assert server.stop() == 0, server.stderr


def local(served, *args):
    result = cli(*args, "--exact", env=served["env"])
    return result


def form_of(extra: list[str]) -> dict:
    """CLI flags as the API's form fields."""
    form, flags = {}, list(extra)
    while flags:
        flag = flags.pop(0)
        name = flag.removeprefix("--").replace("-", "_")
        form[name] = "true" if flag in ("--scenes", "--softmax", "--no-template") else flags.pop(0)
    return form


# ============================================================================ the API equals the CLI
@pytest.mark.parametrize("extra", [[], ["--every", "0.5", "--threshold", "0.05"], ["--scenes", "--min-gap", "0.5"],
                                   ["--max-frames", "2", "--top-k", "2"]])
def test_classify_of_a_video_equals_the_cli(served, extra):
    inputs = [served["clip"], served["photo"]]
    expected = local(served, "classify", *inputs, "--labels", LABELS, "--json", *extra)
    assert expected.exit_code == 0, expected.stderr
    wanted = json.loads(expected.stdout)
    response = served["server"].post("/v1/classify", data={"labels": LABELS, **form_of(extra)}, files=[upload(p) for p in inputs])
    assert response.status_code == 200, response.text
    found = response.json()
    assert same_records(found, wanted), (found, wanted)
    frames = [r for r in found if "time" in r]
    assert frames and all(r["path"] == f"{served['clip']}#t={r['time']:g}" for r in frames)
    summary = next(r for r in found if r.get("summary") == "video")
    assert summary["path"] == str(served["clip"]) and summary["frames"] == len(frames)


def test_embed_of_a_video_equals_the_cli_lines(served):
    expected = local(served, "embed", served["clip"], served["photo"], "--text", "a bar", "--format", "jsonl", "--every", "1")
    assert expected.exit_code == 0, expected.stderr
    response = served["server"].post("/v1/embed", data={"text": "a bar", "every": "1"},
                                     files=[upload(served["clip"]), upload(served["photo"])])
    assert response.status_code == 200, response.text
    found = records(response.text)
    assert same_records(found, records(expected.stdout))
    assert [r.get("time") for r in found] == [0, 1, 2, None, None]
    assert found[1]["path"] == f"{served['clip']}#t=1"


def test_a_video_with_an_image_name_is_read_by_its_content(served):
    response = served["server"].post("/v1/embed", data={"every": "1"},
                                     files=[upload(served["clip"], name="holiday.jpg")])
    assert response.status_code == 200, response.text
    assert [r["path"] for r in records(response.text)] == ["holiday.jpg#t=0", "holiday.jpg#t=1", "holiday.jpg#t=2"]


def test_a_truncated_video_keeps_its_frames_and_names_the_fault_as_the_cli(served):
    cut = served["bad"] / "cut.mkv"
    expected = local(served, "classify", cut, "--labels", LABELS, "--json")
    assert expected.exit_code == 1
    response = served["server"].post("/v1/classify", data={"labels": LABELS}, files=[upload(cut)])
    assert response.status_code == 200, response.text
    found = response.json()
    assert same_records(found, json.loads(expected.stdout))
    assert any("truncated?" in r.get("error", "") for r in found) and found[-1]["summary"] == "video"


@pytest.mark.parametrize("name,cause", [("cut.mp4", "not a readable video"), ("empty.mp4", "not a readable video"),
                                        ("audio.mp4", "holds no video stream (only audio)")])
def test_a_bad_video_upload_is_422_naming_it_and_the_server_goes_on(served, name, cause):
    server = served["server"]
    response = server.post("/v1/classify", data={"labels": LABELS}, files=[upload(served["bad"] / name, name=name)])
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error.startswith(f"{name}: ") and cause in error and "\n" not in error
    assert server.healthy()
    again = server.post("/v1/classify", data={"labels": LABELS, "every": "1"}, files=[upload(served["clip"])])
    assert again.status_code == 200 and len(again.json()) == 4  # 3 frames and the summary


@pytest.mark.parametrize("field,value", [("every", "0"), ("every", "-1"), ("max_frames", "0"), ("min_gap", "-0.5"),
                                         ("every", "often")])
def test_sampling_fields_are_checked_as_the_options_are(served, field, value):
    response = served["server"].post("/v1/classify", data={"labels": LABELS, field: value}, files=[upload(served["clip"])])
    assert response.status_code == 422 and response.json()["error"].startswith(f"{field}: "), response.text


# ============================================================================ an index of frames
def test_search_over_frame_rows_gives_their_times_as_the_cli(served):
    expected = cli("search", served["out"], "a bar", "--top-k", "30", "--json", env=served["env"])
    assert expected.exit_code == 0, expected.stderr
    response = served["server"].get("/v1/search", params={"q": "a bar", "k": "30"})
    assert response.status_code == 200, response.text
    hits = response.json()[0]["results"]
    assert same_records(response.json(), json.loads(expected.stdout))
    assert len(hits) == 11  # 3 + 7 frames and the photo
    assert sorted((h["path"], h["time"]) for h in hits if "time" in h) == sorted(
        [(f"{served['clip']}#t={t}", t) for t in range(3)] + [(f"{served['long']}#t={t}", t) for t in range(7)])


def _frame_row(served, name: str) -> int:
    hits = served["server"].get("/v1/search", params={"q": "a bar", "k": "30", "rows": "true"}).json()[0]["results"]
    return next(h["row"] for h in hits if h["path"] == name)


def test_thumbnail_of_a_frame_row_is_that_frame(served):
    from PIL import Image

    from siglip_cli.core.video import read_frame

    long = str(served["long"])
    pictures = {}
    for seconds in (4, 6):
        response = served["server"].get(f"/v1/thumbnail/0/{_frame_row(served, f'{long}#t={seconds}')}")
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg", response.text
        pictures[seconds] = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), np.float32)
    for seconds in (4, 6):
        expected = np.asarray(read_frame(long, seconds), np.float32)
        assert pictures[seconds].shape == expected.shape  # 64x48: under the thumbnail's 256 px, kept
        other = 6 if seconds == 4 else 4
        own, others = np.abs(pictures[seconds] - expected).mean(), np.abs(pictures[other] - expected).mean()
        assert others > 2 * own, (own, others)  # the frame at its own time, not another's (the bar moved 40 px)


def test_a_frame_row_whose_video_changed_has_no_thumbnail(served, tmp_path):
    server = served["server"]
    name = f"{served['clip']}#t=2"
    row = _frame_row(served, name)
    stamp = os.stat(served["clip"])
    os.utime(served["clip"], ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 5_000_000_000))
    try:
        response = server.get(f"/v1/thumbnail/0/{row}")
        assert response.status_code == 404 and "changed since it was indexed" in response.json()["error"]
    finally:
        os.utime(served["clip"], ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert server.get(f"/v1/thumbnail/0/{row}").status_code == 200


# ============================================================================ --server clients
def both(served, *args):
    return local(served, *args), cli(*args, "--server", served["server"].url, env=served["env"])


@pytest.mark.parametrize("fmt", ["json", "table", "jsonl", "csv"])
def test_server_classify_of_a_video_prints_what_a_local_run_prints(served, fmt):
    inputs = [served["photo"], served["clip"], served["bad"] / "audio.mp4", served["bad"] / "cut.mkv"]
    here, there = both(served, "classify", *inputs, "--labels", LABELS, "--every", "0.5", "--threshold", "0.01", "--format", fmt)
    assert there.exit_code == here.exit_code == 1, there.stderr
    assert there.stderr == here.stderr
    if fmt == "json":
        found = json.loads(there.stdout)
        assert same_records(found, json.loads(here.stdout))
        assert [r["time"] for r in found if str(r["path"]).startswith(f"{served['clip']}#t=")] == [0, 0.5, 1, 1.5, 2, 2.5]
    elif fmt == "jsonl":
        assert same_records(records(there.stdout), records(here.stdout))
    elif fmt == "csv":
        assert same_records(csv_cells(there.stdout), csv_cells(here.stdout))
    else:
        assert there.stdout == here.stdout and "00:00:01.5" in there.stdout


def test_server_embed_and_similarity_of_a_video_print_what_a_local_run_prints(served):
    here, there = both(served, "embed", served["clip"], "--format", "jsonl", "--scenes", "--max-frames", "2")
    assert there.exit_code == here.exit_code == 0, there.stderr
    assert same_records(records(there.stdout), records(here.stdout)) and len(records(there.stdout)) >= 1
    here, there = both(served, "similarity", "-i", served["clip"], "--text", "a bar", "--every", "1", "--format", "table")
    assert there.exit_code == here.exit_code == 0 and there.stdout == here.stdout and "#t=" in there.stdout


def test_server_search_by_a_video_prints_what_a_local_run_prints(served):
    args = ("search", served["out"], "a bar", "--image", served["clip"], "--image", served["bad"] / "audio.mp4",
            "--image", served["photo"], "-k", "4", "--json")
    here = cli(*args, env=served["env"])
    there = cli(*args, "--server", served["server"].url, env=served["env"])
    assert there.exit_code == here.exit_code == 1, there.stderr
    assert there.stderr == here.stderr
    found = json.loads(there.stdout)
    assert same_records(found, json.loads(here.stdout))
    assert [r["query"] for r in found] == ["a bar", *[f"{served['clip']}#t={t}" for t in (0, 2)],
                                           str(served["bad"] / "audio.mp4"), str(served["photo"])]


# ============================================================================ without PyAV, and the upload cap
@pytest.fixture(scope="module")
def bare(served, tmp_path_factory):
    """The same index on a server that cannot import PyAV and takes 20 KB per request."""
    blocker = tmp_path_factory.mktemp("noav")
    (blocker / "av.py").write_text("raise ImportError('PyAV is not installed')\n")
    server = Server([served["out"], "--exact", "--max-upload", "0.02"],
                    env={**served["env"], "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)])})
    yield server
    assert server.stop() == 0, server.stderr


def test_without_pyav_a_video_is_a_4xx_naming_the_extra(served, bare):
    small = make_video(served["root"] / "small.mp4", seconds=0.5)
    assert small.stat().st_size < 20_000
    response = bare.post("/v1/classify", data={"labels": LABELS}, files=[upload(small)])
    assert response.status_code == 422 and "pip install 'siglip-cli[video]'" in response.json()["error"], response.text
    row = _frame_row(served, f"{served['clip']}#t=1")
    thumbnail = bare.get(f"/v1/thumbnail/0/{row}")
    assert thumbnail.status_code == 501 and "pip install 'siglip-cli[video]'" in thumbnail.json()["error"]
    assert bare.healthy()


def test_the_upload_cap_applies_to_videos(served, bare):
    assert served["clip"].stat().st_size > 20_000
    response = bare.post("/v1/embed", files=[upload(served["clip"])])
    assert response.status_code == 413 and "--max-upload" in response.json()["error"]
    assert bare.healthy()
    # a --server client names the video it cannot send and goes on with the rest
    result = cli("classify", served["clip"], served["photo"], "--labels", LABELS, "--json", "--server", bare.url,
                 "--exact", env=served["env"])
    assert result.exit_code == 1
    one_error_line(result.stderr, str(served["clip"]), "--max-upload")
    assert [r["path"] for r in json.loads(result.stdout)] == [str(served["clip"]), str(served["photo"])]


def test_an_image_upload_stays_an_image(served):
    """A PNG upload is one image record, no frames and no time."""
    buffer = io.BytesIO()
    random_image(9, (40, 30)).save(buffer, format="PNG")
    response = served["server"].post("/v1/embed", files=[upload(served["photo"], name="p.png", data=buffer.getvalue())])
    assert response.status_code == 200 and [list(r) for r in records(response.text)] == [["kind", "path", "embedding"]]
