"""A corpus of hostile inputs and faults, each built here: concurrent writers, FIFOs, a full disk,
names that look like text rows, stale files on resume, image bombs in containers, dripping and
redirecting servers, credentials in URLs, symlink loops, deep trees, damaged caches, NaN weights.

Every case asserts what a careful user expects: one line naming the file and the cause, the
right exit code, nothing else lost, and never a traceback."""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import siglip_cli
from siglip_cli.core.errors import InputError
from siglip_cli.store import open_store

from .conftest import LocalHTTPServer, random_image

LABELS = "a cat,a dog"


def _env(checkpoint: Path, cache: Path) -> dict:
    return {**os.environ, "SIGLIP_MODEL": str(checkpoint), "SIGLIP_CACHE_DIR": str(cache)}


def _siglip(*args, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "siglip_cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("siglip: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.fixture(scope="module")
def slow_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slow")
    for i in range(20):
        random_image(i, (90, 70)).save(folder / f"{i:03d}.jpg", quality=90)
    return folder


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    random_image(seed, (40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


class _Quiet(http.server.BaseHTTPRequestHandler):
    png = b""

    def send_png(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.png)))
        self.end_headers()
        self.wfile.write(self.png)

    def log_message(self, *args):
        pass


def _serve(handler) -> http.server.ThreadingHTTPServer:
    httpd = LocalHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


class _Slow(_Quiet):
    """Answers its first request for a path after 25 s, later ones at once: a run that ends with
    this URL holds its output that long, however slowly a loaded machine starts a second run."""

    served: set = set()

    def do_GET(self):  # noqa: N802
        if self.path not in self.served:
            self.served.add(self.path)
            time.sleep(25)
        self.send_png()


@pytest.fixture(scope="module")
def slow_url():
    _Slow.png = _png(3)
    httpd = _serve(_Slow)
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield lambda name: f"{base}/{name}.png"
    httpd.shutdown()


def _start_writer(folder: Path, url: str, out: Path, env: dict) -> subprocess.Popen:
    """An embed run into `out`, returned once it has committed rows and waits on the slow URL."""
    first = _siglip("embed", folder, url, "--out", out, "--batch-size", "4", env=env)
    partial = out.with_name(out.name + ".partial") / "rows.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (partial.exists() and partial.stat().st_size):
        time.sleep(0.02)
    return first


# ============================================================================ 1. two writers
def test_a_second_run_on_the_same_output_is_refused_naming_the_first(slow_folder, slow_url, tmp_path, tiny_checkpoint):
    slow_url = slow_url("refused")
    env = _env(tiny_checkpoint, tmp_path / "cache")
    out = tmp_path / "x.npy"
    first = _start_writer(slow_folder, slow_url, out, env)
    for extra in ([], ["--resume"]):
        second = _siglip("embed", slow_folder, slow_url, "--out", out, "--batch-size", "4", *extra, env=env)
        assert second.wait(timeout=60) == 2
        line = _one_error_line(second.stderr.read())
        assert "another siglip run is writing it" in line and f"pid {first.pid}" in line
    assert first.wait(timeout=300) == 0, first.stderr.read()
    clean = tmp_path / "clean.npy"
    assert _siglip("embed", slow_folder, slow_url, "--out", clean, env=env).wait(timeout=300) == 0
    np.testing.assert_allclose(np.load(out), np.load(clean), atol=1e-6)  # batches differ: float rounding only
    assert (tmp_path / "x.npy.paths.txt").read_text() == (tmp_path / "clean.npy.paths.txt").read_text()
    assert not (tmp_path / ".x.npy.lock").exists()


def test_the_lock_goes_with_a_killed_process(slow_folder, slow_url, tmp_path, tiny_checkpoint):
    slow_url = slow_url("killed")
    env = _env(tiny_checkpoint, tmp_path / "cache")
    out = tmp_path / "x.npy"
    first = _start_writer(slow_folder, slow_url, out, env)
    first.kill()
    first.wait()
    resumed = _siglip("embed", slow_folder, slow_url, "--out", out, "--resume", env=env)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert np.load(out).shape == (21, 32)


# ============================================================================ 2. FIFOs and devices
def test_fifos_are_skipped_with_a_reason_and_never_block(run, tmp_path, image_dir):
    folder = tmp_path / "with-fifo"
    folder.mkdir()
    shutil.copy(image_dir / "a.jpg", folder / "a.jpg")
    os.mkfifo(folder / "b.jpg")
    started = time.monotonic()
    result = run("classify", folder, "--labels", LABELS, "--json")
    named = run("classify", folder / "b.jpg", "--labels", LABELS, "--json")
    assert time.monotonic() - started < 60
    assert result.exit_code == 1 and named.exit_code == 1
    records = json.loads(result.stdout)
    assert [Path(r["path"]).name for r in records] == ["a.jpg", "b.jpg"] and "labels" in records[0]
    assert "FIFO" in records[1]["error"] and "FIFO" in _one_error_line(named.stderr)
    with pytest.raises(InputError, match="FIFO"):  # the Python API opens without blocking, too
        siglip_cli.load(os.environ["SIGLIP_MODEL"]).embed_images([str(folder / "b.jpg")])
    assert run("classify", "/dev/null", "--labels", LABELS).exit_code == 1


def test_ctrl_c_ends_promptly_while_a_decoder_waits(tmp_path, tiny_checkpoint, image_dir):
    """A decode thread blocked on a server that never answers (30 s timeout) must not keep the
    process alive after Ctrl-C."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/x.png"
    try:
        proc = _siglip("classify", url, image_dir / "a.jpg", "--labels", LABELS, env=_env(tiny_checkpoint, tmp_path / "c"))
        time.sleep(3)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=20)
        assert time.monotonic() - started < 5 and code == 130
        assert "Traceback" not in proc.stderr.read()
    finally:
        silent.close()


# ============================================================================ 3. a full disk
@pytest.fixture()
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(disk: Path, leave: int) -> Path:
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


def test_a_full_disk_is_one_line_and_keeps_the_previous_store(run, small_disk, image_dir, tmp_path):
    out = small_disk / "v.npy"
    assert run("embed", image_dir / "a.jpg", "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in small_disk.iterdir()}
    filler = _fill(small_disk, 12 * 1024)
    result = run("embed", image_dir, "--out", out)
    assert result.exit_code == 1
    line = _one_error_line(result.stderr)
    assert "no space left on the device" in line
    after = {p.name: p.read_bytes() for p in small_disk.iterdir() if p.name not in ("filler", "v.npy.partial")}
    assert after == before  # the old store, byte for byte, and no temporary files
    filler.unlink()
    resumed = run("embed", image_dir, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert np.load(out).shape == (5, 32)


def test_output_stream_on_a_full_device_is_one_line(tiny_checkpoint, image_dir, tmp_path):
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "siglip_cli", "classify", str(image_dir / "a.jpg"), "--labels", LABELS],
                              stdout=full, stderr=subprocess.PIPE, text=True, env=_env(tiny_checkpoint, tmp_path / "c"), timeout=120)
    assert proc.returncode == 1
    assert "No space left on device" in _one_error_line(proc.stderr)


# ============================================================================ 4-6. row identity
def test_file_names_that_look_like_text_rows_keep_their_kind(run, tmp_path, image_dir):
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(image_dir / "a.jpg", folder / "text:cat.jpg")
    expected_names = [str(folder / "text:cat.jpg"), "text:cat.jpg", "cat.jpg"]
    for suffix in (".npy", ".npz", ".jsonl", ".parquet"):
        out = tmp_path / f"v{suffix}"
        result = run("embed", folder, "--text", "text:cat.jpg", "--text", "cat.jpg", "--out", out)
        assert result.exit_code == 0, result.stderr
        store = open_store(out)
        assert store.names == expected_names, suffix
        assert [store.kind(i) for i in range(3)] == ["image", "text", "text"], suffix
    records = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["image", "text", "text"] and records[0]["path"].endswith("text:cat.jpg")


def test_every_output_kind_keeps_its_own_meta(run, image_dir, tmp_path):
    assert run("embed", image_dir, "--out", tmp_path / "vecs.npy").exit_code == 0
    assert run("embed", image_dir / "a.jpg", "--out", tmp_path / "vecs.npz", "--out-dtype", "float16").exit_code == 0
    assert run("embed", image_dir / "b.png", "--out", tmp_path / "vecs.jsonl").exit_code == 0
    npy = json.loads((tmp_path / "vecs.npy.meta.json").read_text())
    npz = json.loads((tmp_path / "vecs.npz.meta.json").read_text())
    assert (npy["count"], npy["dtype"]) == (5, "float32") and (npz["count"], npz["dtype"]) == (1, "float16")
    assert json.loads((tmp_path / "vecs.jsonl.meta.json").read_text())["count"] == 1
    assert np.load(tmp_path / "vecs.npy").shape == (5, 32)


def test_a_file_that_is_not_a_store_is_never_overwritten(run, image_dir, tmp_path):
    precious = tmp_path / "data.npy"
    np.save(precious, np.arange(3))
    result = run("embed", image_dir, "--out", precious)
    assert result.exit_code == 2 and "not a siglip embedding file" in _one_error_line(result.stderr)
    assert np.load(precious).tolist() == [0, 1, 2]


def test_resume_re_embeds_a_file_replaced_since(run, tmp_path, image_dir):
    folder = tmp_path / "imgs"
    shutil.copytree(image_dir, folder)
    (folder / "c.webp").write_bytes(b"broken for now")
    out = tmp_path / "v.npy"
    assert run("embed", folder, "--out", out, "--strict").exit_code == 1  # a.jpg, b.png done
    random_image(99, (64, 48)).save(folder / "a.jpg", quality=92)  # same name, new picture
    os.utime(folder / "a.jpg", ns=(1, 1))
    shutil.copy(image_dir / "c.webp", folder / "c.webp")
    assert run("embed", folder, "--out", out, "--resume").exit_code == 0
    clean = tmp_path / "clean.npy"
    assert run("embed", folder, "--out", clean).exit_code == 0
    np.testing.assert_allclose(np.load(out), np.load(clean), atol=1e-6)


# ============================================================================ 7. image bombs
def _ico_holding(png: bytes) -> bytes:
    """An ICO whose directory says 16x16 while its one entry is `png`."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def test_an_ico_holding_a_huge_png_is_refused_before_decoding(run, tmp_path):
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    bomb = tmp_path / "bomb.ico"
    bomb.write_bytes(_ico_holding(buffer.getvalue()))
    small = io.BytesIO()
    random_image(1, (16, 16)).save(small, format="PNG")
    fine = tmp_path / "fine.ico"
    fine.write_bytes(_ico_holding(small.getvalue()))
    result = run("classify", bomb, fine, "--labels", LABELS, "--json", "--max-pixels", "10000000")
    records = json.loads(result.stdout)
    assert result.exit_code == 1 and "--max-pixels" in records[0]["error"] and "20000x20000" in records[0]["error"]
    assert "labels" in records[1]


def test_empty_images_are_refused(tiny_checkpoint):
    model = siglip_cli.load(tiny_checkpoint)
    with pytest.raises(InputError, match="0x0"):
        model.embed_images([Image.new("RGB", (0, 0))])
    with pytest.raises(InputError, match="nothing to look at"):
        model.embed_images([np.zeros((0, 5, 3), np.uint8)])


# ============================================================================ 8-10. URLs
class _Hostile(_Quiet):
    seen_auth: list = []
    ftp_port = 0

    def do_GET(self):  # noqa: N802
        if self.path == "/drip-headers.png":  # a header line a byte at a time, every 0.2 s
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for byte in b"X-Slow: " + b"a" * 200:
                try:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)
            return
        if self.path == "/to-ftp.png":
            self.send_response(302)
            self.send_header("Location", f"ftp://127.0.0.1:{self.ftp_port}/x.png")
            self.end_headers()
            return
        if self.path == "/redirect.png":
            self.send_response(301)
            self.send_header("Location", "/private.png")
            self.end_headers()
            return
        if self.path == "/private.png":
            _Hostile.seen_auth.append(self.headers.get("Authorization"))
            if self.headers.get("Authorization") != "Basic " + base64.b64encode(b"me:s3cret").decode():
                self.send_response(401)
                self.end_headers()
                return
        self.send_png()


@pytest.fixture(scope="module")
def hostile_server():
    _Hostile.png = _png(7)
    ftp = socket.socket()
    ftp.bind(("127.0.0.1", 0))
    ftp.listen(5)
    ftp.settimeout(0.1)
    _Hostile.ftp_port = ftp.getsockname()[1]
    httpd = _serve(_Hostile)
    yield f"127.0.0.1:{httpd.server_address[1]}", ftp
    httpd.shutdown()
    ftp.close()


def test_the_deadline_covers_dripping_headers(hostile_server):
    from siglip_cli.urls import fetch_url

    host, _ = hostile_server
    started = time.monotonic()
    with pytest.raises(InputError, match="within 1 s"):
        fetch_url(f"http://{host}/drip-headers.png", timeout=1.0)
    assert time.monotonic() - started < 4


def test_redirects_to_ftp_are_not_followed(hostile_server):
    from siglip_cli.urls import fetch_url

    host, ftp = hostile_server
    with pytest.raises(InputError, match="only http and https"):
        fetch_url(f"http://{host}/to-ftp.png", timeout=5)
    with pytest.raises(socket.timeout):
        ftp.accept()  # nobody knocked on the FTP port


def test_credentials_are_used_and_never_shown(run, hostile_server):
    host, _ = hostile_server
    good = f"http://me:s3cret@{host}/redirect.png"
    bad = f"http://me:wrong@{host}/private.png"
    result = run("classify", good, bad, "--labels", LABELS, "--json")
    assert "s3cret" not in result.stdout + result.stderr and "wrong" not in result.stdout + result.stderr
    records = json.loads(result.stdout)
    assert records[0]["path"] == f"http://me:***@{host}/redirect.png" and "labels" in records[0]
    assert records[1]["path"] == f"http://me:***@{host}/private.png" and "HTTP 401" in records[1]["error"]
    assert result.exit_code == 1


# ============================================================================ 13-14. odd trees
def test_symlink_loops_and_broken_links_are_reported_and_the_rest_runs(run, tmp_path, image_dir):
    folder = tmp_path / "links"
    folder.mkdir()
    shutil.copy(image_dir / "a.jpg", folder / "a.jpg")
    os.symlink(folder / "loop.jpg", folder / "loop.jpg")
    os.symlink(folder / "missing.jpg", folder / "broken.jpg")
    os.symlink(folder, folder / "again")  # a folder loop
    for extra in ([], ["--recursive"]):
        result = run("classify", folder, "--labels", LABELS, "--json", *extra)
        records = {Path(r["path"]).name: r for r in json.loads(result.stdout)}
        assert result.exit_code == 1 and "labels" in records["a.jpg"]
        assert "symbolic link loop" in records["loop.jpg"]["error"] and "broken symbolic link" in records["broken.jpg"]["error"]
        assert len(records) == 3


def _remove_deep(levels: list[Path]) -> None:
    """Bottom-up, without recursion (shutil.rmtree, which pytest's clean-up uses, recurses)."""
    for folder in reversed(levels):
        for entry in os.scandir(folder):
            if not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)
        os.rmdir(folder)


def test_very_deep_trees_and_looping_globs(run, tmp_path, image_dir, request):
    deep = tmp_path / "deep"
    path = deep
    deep.mkdir()
    levels = [deep]
    for _ in range(1100):  # (os.makedirs itself recurses)
        path = path / "d"
        path.mkdir()
        levels.append(path)
    request.addfinalizer(lambda: _remove_deep(levels))
    shutil.copy(image_dir / "a.jpg", path / "x.jpg")
    shutil.copy(image_dir / "b.png", deep / "y.png")
    os.symlink(deep, deep / "d" / "up")  # a loop a ** pattern would walk forever
    result = run("classify", deep, "--recursive", "--labels", LABELS, "--json")
    assert result.exit_code == 0, result.stderr
    assert sorted(Path(r["path"]).name for r in json.loads(result.stdout)) == ["x.jpg", "y.png"]
    pattern = run("classify", f"{deep}/**/*.jpg", "--labels", LABELS, "--json")
    assert pattern.exit_code == 0, pattern.stderr
    assert [Path(r["path"]).name for r in json.loads(pattern.stdout)] == ["x.jpg"]


# ============================================================================ 15. the label cache
@pytest.mark.parametrize("damage", ["short", "zip", "zeros", "nan", "text"])
def test_damaged_cache_entries_are_recomputed_and_repaired(run, image_dir, tmp_path, damage):
    first = run("classify", image_dir / "a.jpg", "--labels", LABELS, "--json")
    files = sorted((tmp_path / "cache").rglob("*.npy"))
    assert len(files) == 2
    for file in files:
        if damage == "short":
            np.save(file, np.ones(5, np.float32))
        elif damage == "zip":
            np.savez(file.with_suffix(""), a=np.ones(32, np.float32))
            os.replace(file.with_suffix(".npz"), file)
        elif damage == "zeros":
            np.save(file, np.zeros(32, np.float32))
        elif damage == "nan":
            np.save(file, np.full(32, np.nan, np.float32))
        else:
            file.write_text("not numpy")
    again = run("classify", image_dir / "a.jpg", "--labels", LABELS, "--json")
    assert again.exit_code == 0 and "Traceback" not in again.stderr
    assert json.loads(again.stdout) == json.loads(first.stdout)
    for file in files:
        vector = np.load(file)
        assert vector.shape == (32,) and np.isfinite(vector).all() and np.linalg.norm(vector) > 0


# ============================================================================ 17. early Ctrl-C
def test_ctrl_c_at_start_up_is_quiet(tiny_checkpoint, tmp_path, image_dir):
    """From the moment siglip's code runs, Ctrl-C is one line and exit 130. (A signal inside the
    interpreter's own start-up, before any of our code, is Python's: `-X importtime` says when
    our entry package is in, and the delays count from there.)"""
    env = _env(tiny_checkpoint, tmp_path / "c")
    for delay in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4):
        proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "siglip_cli", "classify", str(image_dir / "a.jpg"),
                                 "--labels", LABELS], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:
            if line.rstrip().endswith("siglip_cli.cli"):
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        stderr = "".join(line for line in proc.stderr if not line.startswith("import time:"))
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, (delay, stderr)
        assert code in (0, 130), (delay, code, stderr)


# ============================================================================ 18. non-finite models
def _poisoned(checkpoint: Path, tmp_path: Path, tower: str) -> Path:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / f"poisoned-{tower}"
    shutil.copytree(checkpoint, folder)
    state = load_file(folder / "model.safetensors")
    name = f"{tower}_model.post_layernorm.weight" if tower == "vision" else f"{tower}_model.final_layer_norm.weight"
    state[name][:] = float("nan")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_nan_weights_are_an_error_never_a_nan_score(run, tiny_checkpoint, tmp_path, image_dir):
    images = _poisoned(tiny_checkpoint, tmp_path, "vision")
    result = run("classify", image_dir / "a.jpg", image_dir / "b.png", "--labels", LABELS, "--json", "--model", images)
    def no_nan(constant):
        raise AssertionError(f"JSON holds {constant}")

    assert result.exit_code == 1
    assert all("non-finite" in r["error"] for r in json.loads(result.stdout, parse_constant=no_nan))
    texts = _poisoned(tiny_checkpoint, tmp_path, "text")
    result = run("classify", image_dir / "a.jpg", "--labels", LABELS, "--json", "--model", texts)
    assert result.exit_code == 3 and "non-finite" in _one_error_line(result.stderr) and result.stdout == ""


# ============================================================================ 19. the Python API
def test_the_api_refuses_what_it_cannot_mean(tiny_checkpoint, image_dir):
    model = siglip_cli.load(tiny_checkpoint)
    with pytest.raises(TypeError, match="list of images"):
        model.embed_images(str(image_dir / "a.jpg"))
    with pytest.raises(TypeError, match="not a string"):
        model.embed_texts([None])
    with pytest.raises(TypeError, match="not a string"):
        model.classify([image_dir / "a.jpg"], ["a cat", 3])


# ============================================================================ 21. closed pipes
def test_a_closed_pipe_is_a_success(tiny_checkpoint, image_dir, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(200):
        os.symlink(image_dir / "a.jpg", folder / f"{i:03d}.jpg")
    proc = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {sys.executable} -m siglip_cli classify {folder} --labels a,b --workers 0 | head -n 1"],
        capture_output=True, text=True, env=_env(tiny_checkpoint, tmp_path / "cache"), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1 and "Traceback" not in proc.stderr and proc.stderr == ""


# ============================================================================ 27-29. small ones
def test_small_usage_mistakes(run, image_dir, tmp_path):
    missing = run("classify", image_dir / "a.jpg", "--labels-file", tmp_path / "nope.txt")
    assert missing.exit_code == 2 and "no such labels file" in _one_error_line(missing.stderr)
    json_embed = run("embed", image_dir, "--format", "json")
    assert json_embed.exit_code == 2 and "only jsonl" in json_embed.stderr and "--out vecs.npy" in json_embed.stderr
    cpu99 = run("classify", image_dir / "a.jpg", "--labels", LABELS, "--device", "cpu:99")
    assert cpu99.exit_code == 2 and "one cpu device" in cpu99.stderr
    quoted = run("classify", image_dir / "a.jpg", "--labels", '"red, white and blue",a dog', "--json")
    assert [l["label"] for l in json.loads(quoted.stdout)[0]["labels"]] and \
        {l["label"] for l in json.loads(quoted.stdout)[0]["labels"]} == {"red, white and blue", "a dog"}
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = run("embed", empty, "--out", tmp_path / "e.npy")
    assert nothing.exit_code == 1 and not (tmp_path / "e.npy").exists()
    assert "folder holds no image files" in nothing.stderr and "--recursive" not in nothing.stderr
    (empty / "sub").mkdir()
    shutil.copy(image_dir / "a.jpg", empty / "sub" / "a.jpg")
    hint = run("classify", empty, "--labels", LABELS)
    assert hint.exit_code == 1 and "add --recursive" in hint.stderr
    heic = tmp_path / "photo.heic"
    heic.write_bytes(b"\0\0\0\x18ftypheic" + b"\0" * 64)
    result = run("classify", heic, "--labels", LABELS, "--json")
    assert "pip install pillow-heif" in result.stderr or "labels" in result.stdout  # when pillow-heif is installed it reads it
    one = run("embed", image_dir / "a.jpg", "--out", tmp_path / "one.npy")
    assert "wrote 1 image " in one.stderr


def test_the_same_file_by_two_spellings_is_embedded_once(run, image_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(image_dir)
    result = run("embed", "a.jpg", "./a.jpg", str(image_dir / "a.jpg"), "--out", tmp_path / "v.npy")
    assert result.exit_code == 0 and np.load(tmp_path / "v.npy").shape[0] == 1
    assert "2 input(s) were named more than once" in result.stderr


def test_unusual_line_breaks_in_names_stay_where_they_can(run, image_dir, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    for name in ("a\u2028b.jpg", "c\u0085d.jpg", "e\rf.jpg"):
        shutil.copy(image_dir / "a.jpg", folder / name)
    shutil.copy(image_dir / "a.jpg", folder / "g\nh.jpg")
    for suffix in (".npz", ".jsonl", ".parquet"):
        result = run("embed", folder, "--out", tmp_path / f"v{suffix}")
        assert result.exit_code == 0, result.stderr
        assert sorted(Path(n).name for n in open_store(tmp_path / f"v{suffix}").names) == \
            sorted(["a\u2028b.jpg", "c\u0085d.jpg", "e\rf.jpg", "g\nh.jpg"])
    npy = run("embed", folder, "--out", tmp_path / "v.npy")
    assert npy.exit_code == 1 and "line break" in npy.stderr  # only "\n" cannot be a line of paths.txt
    assert sorted(Path(n).name for n in open_store(tmp_path / "v.npy").names) == \
        sorted(["a\u2028b.jpg", "c\u0085d.jpg", "e\rf.jpg"])
