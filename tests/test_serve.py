"""`siglip serve`: a real server process; each endpoint's JSON equals the command's, bad input
gets its status and the server answers afterwards, security limits, micro-batching under 32
concurrent clients, SIGTERM under load and index reloads."""

from __future__ import annotations

import io
import json
import re
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from .conftest import random_image
from .search_fixtures import cli, make_photos, one_error_line, records
from .serve_fixtures import Server, httpx, upload, wait_for

LABELS = "2 cats,2 dogs,a red car"


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_checkpoint):
    """8 photos and a text row embedded into vecs.npy with --exact (fp32, exact decoding)."""
    root = tmp_path_factory.mktemp("serve")
    photos = make_photos(root / "photos", 8)
    env = {"SIGLIP_CACHE_DIR": str(root / "cache"), "SIGLIP_MODEL": str(tiny_checkpoint)}
    out = root / "vecs.npy"
    result = cli("embed", root / "photos", "--out", out, "--text", "a red car", "--exact", env=env)
    assert result.exit_code == 0, result.stderr
    return {"root": root, "photos": photos, "out": out, "env": env}


@pytest.fixture(scope="module")
def server(indexed):
    running = Server([indexed["out"], "--exact"], env=indexed["env"])
    yield running
    assert running.stop() == 0, running.stderr


def same_records(found, expected, rel: float = 1e-5, abs_: float = 1e-6) -> bool:
    """Equal records, numbers within float32 rounding: images batched with others (or split
    into other batches than the CLI's) differ from the CLI's rows in the last bits."""
    if isinstance(expected, float) or isinstance(found, float):
        return found == pytest.approx(expected, rel=rel, abs=abs_)
    if isinstance(expected, dict):
        return isinstance(found, dict) and found.keys() == expected.keys() and all(same_records(found[k], expected[k]) for k in expected)
    if isinstance(expected, list):
        return isinstance(found, list) and len(found) == len(expected) and all(map(same_records, found, expected))
    return found == expected


def run(indexed, *args):
    result = cli(*args, env=indexed["env"])
    return result


# ============================================================================ same JSON as the CLI
def test_start_line_names_the_model_and_the_port(server, indexed, tiny_checkpoint):
    assert any(line.startswith(f"siglip: serving {tiny_checkpoint} (revision local-") and "fp32 on cpu) at http://127.0.0.1:" in line
               for line in server.lines), server.stderr
    info = server.get("/v1/info").json()
    assert info["dtype"] == "fp32" and info["decode"] == "exact" and info["embed_dim"] == 32
    assert info["indexes"] == [{"index": 0, "path": str(indexed["out"]), "rows": 9, "images": 8, "texts": 1, "dim": 32}]
    assert info["model"] == str(tiny_checkpoint)


@pytest.mark.parametrize("extra", [[], ["--softmax", "--top-k", "2"], ["--threshold", "0.05", "--no-template"],
                                   ["--template", "a photo of {}", "--template", "art of {}"]])
def test_classify_equals_the_cli(server, indexed, extra):
    photos = indexed["photos"][:3]
    expected = run(indexed, "classify", *photos, "--labels", LABELS, "--exact", "--json", *extra)
    assert expected.exit_code == 0, expected.stderr
    form: dict = {"labels": LABELS}
    options = dict(zip(extra[::1], extra[1:]))
    if "--softmax" in extra:
        form["softmax"] = "true"
    if "--top-k" in extra:
        form["top_k"] = options["--top-k"]
    if "--threshold" in extra:
        form["threshold"] = options["--threshold"]
    if "--no-template" in extra:
        form["no_template"] = "true"
    templates = [extra[i + 1] for i, flag in enumerate(extra) if flag == "--template"]
    if templates:
        form["template"] = templates
    response = server.post("/v1/classify", data=form, files=[upload(p) for p in photos])
    assert response.status_code == 200, response.text
    assert same_records(response.json(), json.loads(expected.stdout)), (response.json(), expected.stdout)


def test_classify_keeps_the_good_images_beside_a_bad_one(server, indexed, bad_files):
    photos = [indexed["photos"][0], bad_files["not_image"], indexed["photos"][1]]
    expected = run(indexed, "classify", *photos, "--labels", LABELS, "--exact", "--json")
    assert expected.exit_code == 1
    response = server.post("/v1/classify", data={"labels": LABELS}, files=[upload(p) for p in photos])
    assert response.status_code == 200
    assert same_records(response.json(), json.loads(expected.stdout))
    assert "error" in response.json()[1] and "labels" in response.json()[2]


def test_embed_equals_the_cli_lines(server, indexed):
    photos = indexed["photos"][:2]
    expected = run(indexed, "embed", *photos, "--text", "a cat", "--text", "a dog", "--exact", "--format", "jsonl")
    assert expected.exit_code == 0, expected.stderr
    response = server.post("/v1/embed", data={"text": ["a cat", "a dog"]}, files=[upload(p) for p in photos])
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/x-ndjson")
    assert same_records(records(response.text), records(expected.stdout))
    assert response.text.splitlines()[2:] == expected.stdout.splitlines()[2:]  # the texts: exactly


def test_embed_float16_and_raw_rows(server, indexed):
    photo = indexed["photos"][3]
    expected = run(indexed, "embed", photo, "--exact", "--format", "jsonl", "--out-dtype", "float16", "--no-normalize")
    response = server.post("/v1/embed", data={"out_dtype": "float16", "no_normalize": "true"}, files=[upload(photo)])
    assert response.text == expected.stdout


@pytest.mark.parametrize("extra", [[], ["--top-k", "3", "--texts"], ["--threshold", "0.1"], ["--no-template", "-k", "20"]])
def test_text_search_equals_the_cli(server, indexed, extra):
    expected = run(indexed, "search", indexed["out"], "a cat", "a red car", "--json", *extra)
    assert expected.exit_code == 0, expected.stderr
    params = [("q", "a cat"), ("q", "a red car")]
    options = dict(zip(extra, extra[1:]))
    if "--top-k" in extra or "-k" in extra:
        params.append(("k", options.get("--top-k") or options["-k"]))
    if "--texts" in extra:
        params.append(("texts", "true"))
    if "--threshold" in extra:
        params.append(("threshold", options["--threshold"]))
    if "--no-template" in extra:
        params.append(("no_template", "true"))
    response = server.get("/v1/search", params=params)
    assert response.status_code == 200, response.text
    assert response.json() == json.loads(expected.stdout)


def test_image_search_equals_the_cli(server, indexed):
    photo = indexed["photos"][5]
    expected = run(indexed, "search", indexed["out"], "--image", photo, "--json", "-k", "4")
    response = server.post("/v1/search", data={"k": "4"}, files=[upload(photo)])
    assert response.status_code == 200, response.text
    assert same_records(response.json(), json.loads(expected.stdout))  # the query image is embedded in another batch


def test_more_like_this_searches_with_the_stored_row(server, indexed):
    photo = indexed["photos"][2]
    expected = json.loads(run(indexed, "search", indexed["out"], "--image", photo, "--json", "-k", "5").stdout)
    found = server.get("/v1/search", params={"like": 2, "k": 5}).json()
    assert found[0]["query"] == str(photo)
    assert [h["path"] for h in found[0]["results"]] == [h["path"] for h in expected[0]["results"]]
    assert found[0]["results"][0]["path"] == str(photo) and found[0]["results"][0]["cosine"] == pytest.approx(1, abs=1e-6)
    np.testing.assert_allclose([h["cosine"] for h in found[0]["results"]], [h["cosine"] for h in expected[0]["results"]], atol=1e-6)


def test_thumbnail_is_a_small_jpeg_of_the_row(server, indexed):
    from PIL import Image

    response = server.get("/v1/thumbnail/0/1")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumbnail = Image.open(io.BytesIO(response.content))
    assert thumbnail.format == "JPEG" and thumbnail.size == (48, 40)  # smaller than 256: kept as is
    original = np.asarray(Image.open(indexed["photos"][1]).convert("RGB"), dtype=float)
    assert np.abs(np.asarray(thumbnail, dtype=float) - original).mean() < 12  # the same picture, JPEG-compressed
    assert server.get("/v1/thumbnail/0/1").content == response.content  # cached


def test_a_replaced_file_is_never_read_through_the_index(tmp_path, tiny_checkpoint):
    """A row's file swapped for a symlink to another file after indexing: 404, never its bytes."""
    photos = make_photos(tmp_path / "photos", 2)
    secret = tmp_path / "secret.png"
    random_image(99, (64, 64)).save(secret)
    env = {"SIGLIP_CACHE_DIR": str(tmp_path / "cache"), "SIGLIP_MODEL": str(tiny_checkpoint)}
    out = tmp_path / "v.npy"
    assert cli("embed", tmp_path / "photos", "--out", out, "--exact", env=env).exit_code == 0
    photos[0].unlink()
    photos[0].symlink_to(secret)
    running = Server([out], env=env)
    try:
        response = running.get("/v1/thumbnail/0/0")
        assert response.status_code == 404 and "changed since it was indexed" in response.json()["error"]
        assert running.get("/v1/thumbnail/0/1").status_code == 200
    finally:
        assert running.stop() == 0


# ============================================================================ bad input
def _bomb_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buffer, format="PNG")
    return buffer.getvalue()


def _truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    random_image(5, (64, 64)).save(buffer, format="JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


BAD_REQUESTS = [
    # (name, method, path, form/params, files, status, fragment of the error)
    ("non-image", "post", "/v1/classify", {"labels": "a"}, [("image", ("notes.jpg", b"not a picture", "image/jpeg"))], 422, "notes.jpg: not an image"),
    ("truncated", "post", "/v1/classify", {"labels": "a"}, [("image", ("cut.jpg", _truncated_jpeg(), "image/jpeg"))], 422, "cut.jpg"),
    ("bomb", "post", "/v1/classify", {"labels": "a"}, [("image", ("bomb.png", _bomb_png(), "image/png"))], 422, "megapixels"),
    ("empty file", "post", "/v1/classify", {"labels": "a"}, [("image", ("e.png", b"", "image/png"))], 422, "e.png"),
    ("no labels", "post", "/v1/classify", {"labels": " , "}, "photo", 400, "no labels"),
    ("too many labels", "post", "/v1/classify", {"labels": ",".join(f"l{i}" for i in range(1001))}, "photo", 400, "at most 1000"),
    ("top_k 0", "post", "/v1/classify", {"labels": "a", "top_k": "0"}, "photo", 422, "top_k"),
    ("threshold 2", "post", "/v1/classify", {"labels": "a", "threshold": "2"}, "photo", 422, "threshold"),
    ("no image", "post", "/v1/classify", {"labels": "a"}, None, 400, "no images"),
    ("bad template", "post", "/v1/classify", {"labels": "a", "template": "no placeholder"}, "photo", 400, "template"),
    ("url refused", "post", "/v1/classify", {"labels": "a", "url": "http://169.254.169.254/"}, None, 403, "--allow-urls"),
    ("nothing to embed", "post", "/v1/embed", {}, None, 400, "nothing to embed"),
    ("embed non-image", "post", "/v1/embed", {}, [("image", ("x.png", b"nope", "image/png"))], 422, "x.png"),
    ("k 0", "get", "/v1/search", {"q": "cat", "k": "0"}, None, 422, "k:"),
    ("k huge", "get", "/v1/search", {"q": "cat", "k": "1000000"}, None, 422, "k:"),
    ("index out of range", "get", "/v1/search", {"q": "cat", "index": "3"}, None, 404, "no index 3"),
    ("index negative", "get", "/v1/search", {"q": "cat", "index": "-1"}, None, 422, "index"),
    ("index not a number", "get", "/v1/search", {"q": "cat", "index": "../../etc/passwd"}, None, 422, "index"),
    ("row out of range", "get", "/v1/search", {"like": "99"}, None, 404, "no row 99"),
    ("text row", "get", "/v1/search", {"like": "8"}, None, 404, "is a text"),
    ("empty query", "get", "/v1/search", {"q": " "}, None, 400, "empty text query"),
    ("no query", "get", "/v1/search", {}, None, 400, "nothing to search for"),
    ("search non-image", "post", "/v1/search", {}, [("image", ("q.png", b"nope", "image/png"))], 422, "q.png"),
    ("thumbnail row", "get", "/v1/thumbnail/0/99", {}, None, 404, "no row 99"),
    ("thumbnail index", "get", "/v1/thumbnail/4/0", {}, None, 404, "no index 4"),
    ("thumbnail path", "get", "/v1/thumbnail/0/..%2F..%2Fetc%2Fpasswd", {}, None, 404, "Not Found"),
    ("thumbnail word", "get", "/v1/thumbnail/0/etc", {}, None, 422, "row"),
    ("thumbnail dots", "get", "/v1/thumbnail/0/../../../etc/passwd", {}, None, 404, "Not Found"),
    ("thumbnail text row", "get", "/v1/thumbnail/0/8", {}, None, 404, "is a text"),
]


@pytest.mark.parametrize("name,method,path,form,files,status,fragment", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_its_status_and_the_server_answers_after(server, indexed, name, method, path, form, files, status, fragment):
    if files == "photo":
        files = [upload(indexed["photos"][0])]
    if method == "get":
        response = server.get(path, params=form)
    else:
        response = server.post(path, data=form, files=files or None)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error and "Traceback" not in error and "\n" not in error
    assert server.healthy()


def test_a_busy_queue_answers_503_with_retry_after(indexed):
    running = Server([indexed["out"], "--exact", "--queue-size", "1", "--batch-size", "1", "--window-ms", "0"], env=indexed["env"])
    photo = indexed["photos"][0]
    try:
        with ThreadPoolExecutor(32) as pool:
            responses = list(pool.map(lambda _: running.post("/v1/embed", files=[upload(photo)]), range(64)))
        statuses = {r.status_code for r in responses}
        assert statuses <= {200, 503} and 503 in statuses and 200 in statuses
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["error"]
        rows = {r.text for r in responses if r.status_code == 200}
        assert len(rows) == 1  # every answer given is the whole, right row
        assert running.healthy()
    finally:
        assert running.stop() == 0


# ============================================================================ security
def test_token_upload_cap_and_urls(indexed):
    running = Server([indexed["out"], "--exact", "--token", "s3cret", "--max-upload", "0.02"], env=indexed["env"])
    try:
        assert running.get("/v1/info").status_code == 401
        assert running.get("/v1/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert running.get("/openapi.json").status_code == 401
        assert running.get("/v1/health").status_code == 200  # for load balancers: no data in it
        assert running.get("/").status_code == 200  # the page holds no data; it asks for the token
        auth = {"Authorization": "Bearer s3cret"}
        assert running.get("/v1/info", headers=auth).status_code == 200
        big = running.post("/v1/embed", headers=auth, files=[("image", ("big.png", os.urandom(30_000), "image/png"))])
        assert big.status_code == 413 and "--max-upload" in big.json()["error"]
        assert running.post("/v1/embed", headers=auth, files=[upload(indexed["photos"][0])]).status_code == 200
    finally:
        assert running.stop() == 0


def test_other_hosts_need_a_token_or_no_auth(indexed):
    result = cli("serve", indexed["out"], "--host", "0.0.0.0", env=indexed["env"])
    assert result.exit_code == 2
    one_error_line(result.stderr, "--host 0.0.0.0", "--token", "--no-auth")
    result = cli("serve", "--token", "a", "--no-auth", env=indexed["env"])
    assert result.exit_code == 2


def test_indexes_of_two_models_are_refused(indexed, checkpoint_factory, tmp_path):
    other = checkpoint_factory("other-serve", seed=3)
    out = tmp_path / "other.npy"
    assert cli("embed", indexed["photos"][0], "--out", out, "--model", other, "--exact", env=indexed["env"]).exit_code == 0
    result = cli("serve", indexed["out"], out, "--port", "0", env=indexed["env"])
    assert result.exit_code == 2
    one_error_line(result.stderr, "one server serves one model")


def test_the_page_forbids_scripts_from_elsewhere(server):
    policy = server.get("/").headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'self'" in policy


def test_the_api_is_described_without_a_cdn(server):
    schema = server.get("/openapi.json").json()
    assert {"/v1/classify", "/v1/embed", "/v1/search", "/v1/health", "/v1/info", "/v1/thumbnail/{index}/{row}"} <= set(schema["paths"])
    page = server.get("/docs").text
    assert "openapi.json" in page or "docs.js" in page
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from elsewhere


# ============================================================================ micro-batching
def test_32_concurrent_clients_get_their_own_rows(indexed, tmp_path):
    """32 clients at once, one image each: every answer is its own image's row (the CLI's,
    within float32 rounding), and they were computed in fewer forward passes than images."""
    photos = make_photos(tmp_path / "many", 32, start=200)
    expected = records(run(indexed, "embed", *photos, "--exact", "--format", "jsonl").stdout)
    expected_rows = {row["path"]: np.array(row["embedding"]) for row in expected}
    running = Server([indexed["out"], "--exact", "--window-ms", "20"], env=indexed["env"])
    try:
        barrier = threading.Barrier(32)

        def one(path):
            client = httpx.Client(base_url=running.url, timeout=120)
            barrier.wait()
            try:
                return client.post("/v1/embed", files=[upload(path)])
            finally:
                client.close()

        with ThreadPoolExecutor(32) as pool:
            responses = list(pool.map(one, photos))
        for path, response in zip(photos, responses):
            assert response.status_code == 200, response.text
            row = json.loads(response.text)
            assert row["path"] == str(path)
            np.testing.assert_allclose(row["embedding"], expected_rows[str(path)], atol=2e-6)
        info = running.get("/v1/info").json()
        assert info["batched_images"] == 32 and info["batches"] < 32
    finally:
        assert running.stop() == 0


# ============================================================================ lifecycle
def test_sigterm_under_load_finishes_the_answers_and_exits_0(indexed):
    running = Server([indexed["out"], "--exact"], env=indexed["env"])
    photo = indexed["photos"][0]
    expected = np.array(json.loads(running.post("/v1/embed", files=[upload(photo)]).text)["embedding"])

    def right(response) -> bool:  # batched with others: the same row within float32 rounding
        return response.status_code == 200 and np.allclose(json.loads(response.text)["embedding"], expected, atol=2e-6)
    answered, refused, broken = [], [], []
    stop = threading.Event()

    def client():
        with httpx.Client(base_url=running.url, timeout=60) as session:
            while not stop.is_set():
                try:
                    response = session.post("/v1/embed", files=[upload(photo)])
                except httpx.TransportError:
                    # no longer listening, or an idle keep-alive connection closed (FIN or RST)
                    # before its next request was read: the client cannot tell that from a
                    # request taken and dropped, so the server's own count decides below
                    refused.append(1)
                    return
                (answered if right(response) else broken).append(response.status_code)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    assert wait_for(lambda: len(answered) >= 16)
    running.signal(signal.SIGTERM)
    code = running.process.wait(60)
    stop.set()
    for thread in threads:
        thread.join(60)
    assert code == 0, running.stderr
    assert not broken, broken
    # every request that reached the app was answered, and each answer reached its client (the
    # one request before the load included)
    stopped = re.search(r"siglip: stopped: (\d+) requests answered, (\d+) taken and not answered", running.stderr)
    assert stopped and "Traceback" not in running.stderr, running.stderr
    assert (int(stopped.group(1)), int(stopped.group(2))) == (len(answered) + 1, 0)


@pytest.mark.parametrize("how", ["sighup", "--reload-index"])
def test_an_updated_index_is_reloaded_without_dropping_requests(indexed, tmp_path, how):
    folder = tmp_path / "photos"
    make_photos(folder, 3)
    out = tmp_path / "v.npy"
    env = indexed["env"]
    assert cli("embed", folder, "--out", out, "--exact", env=env).exit_code == 0
    running = Server([out, "--exact"] + (["--reload-index"] if how == "--reload-index" else []), env=env)
    try:
        assert running.get("/v1/info").json()["indexes"][0]["rows"] == 3
        errors = []
        stop = threading.Event()

        def client():
            with httpx.Client(base_url=running.url, timeout=60) as session:
                while not stop.is_set():
                    response = session.get("/v1/search", params={"q": "a cat", "k": 50})
                    if response.status_code != 200 or len(response.json()[0]["results"]) not in (3, 5):
                        errors.append(response.text)

        thread = threading.Thread(target=client)
        thread.start()
        make_photos(folder, 2, start=3)
        assert cli("embed", folder, "--out", out, "--update", "--exact", env=env).exit_code == 0
        if how == "sighup":
            running.signal(signal.SIGHUP)
        assert wait_for(lambda: running.get("/v1/info").json()["indexes"][0]["rows"] == 5)
        stop.set()
        thread.join(60)
        assert not errors, errors[:3]
        assert len(running.get("/v1/search", params={"q": "a cat", "k": 50}).json()[0]["results"]) == 5
        assert running.get("/v1/thumbnail/0/4").status_code == 200
        assert any("reloaded, 5 rows (was 3)" in line for line in running.lines)
    finally:
        assert running.stop() == 0


def test_a_taken_port_or_a_missing_index_is_one_line(indexed, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = cli("serve", indexed["out"], "--port", port, env=indexed["env"])
    assert result.exit_code == 4
    one_error_line(result.stderr, f"cannot listen on 127.0.0.1:{port}")
    result = cli("serve", tmp_path / "nothing.npy", "--port", "0", env=indexed["env"])
    assert result.exit_code != 0
    one_error_line(result.stderr, "nothing.npy")


def test_a_naflex_model_batches_images_of_different_shapes(tmp_path_factory, tmp_path):
    """SigLIP 2 NaFlex: requests of different aspect ratios padded into one batch give each
    image its own row (the mask keeps the padding out), as `embed` computes it alone."""
    from .siglip2_fixtures import siglip2_naflex

    folder = siglip2_naflex(tmp_path_factory)
    env = {"SIGLIP_CACHE_DIR": str(tmp_path / "cache"), "SIGLIP_MODEL": str(folder)}
    photos = [*make_photos(tmp_path / "wide", 4, size=(96, 32)), *make_photos(tmp_path / "tall", 4, start=10, size=(24, 80))]
    expected = {row["path"]: row["embedding"] for row in records(cli("embed", *photos, "--exact", "--format", "jsonl", env=env).stdout)}
    running = Server(["--exact", "--window-ms", "50"], env=env)
    try:
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda p: running.post("/v1/embed", files=[upload(p)]), photos))
        for path, response in zip(photos, responses):
            assert response.status_code == 200, response.text
            np.testing.assert_allclose(json.loads(response.text)["embedding"], expected[str(path)], atol=2e-6)
        assert running.get("/v1/info").json()["batches"] < len(photos)
    finally:
        assert running.stop() == 0
