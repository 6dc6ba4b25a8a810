"""`siglip serve` under Ray Serve (cli/ray_serve.py) on a real local Ray: one replica of the
same app answers /v1/classify and /v1/search with exactly the commands' JSON, keeps the token
rule, and answers /v1/health.

Skipped without Ray Serve (`pip install 'siglip-cli[ray-serve]'`); CI installs it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest

from .ray_fixtures import free_port
from .search_fixtures import cli, make_photos
from .serve_fixtures import httpx, upload
from .test_serve import same_records

pytest.importorskip("ray.serve", reason="needs Ray Serve: pip install 'siglip-cli[ray-serve]'")
pytestmark = pytest.mark.ray

LABELS = "2 cats,2 dogs,a red car"
TOKEN = "s3cret-for-the-test"


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("ray-serve")
    photos = make_photos(root / "photos", 4)
    env = {"SIGLIP_CACHE_DIR": str(root / "cache"), "SIGLIP_MODEL": str(tiny_checkpoint)}
    out = root / "vecs.npy"
    result = cli("embed", root / "photos", "--out", out, "--exact", env=env)
    assert result.exit_code == 0, result.stderr
    return {"root": root, "photos": photos, "out": out, "env": env}


@pytest.fixture(scope="module")
def deployed(indexed, tiny_checkpoint):
    """A local Ray (2 CPUs, no dashboard), Ray Serve on a free loopback port, and the app built
    from string arguments as `serve run siglip_cli.cli.ray_serve:build KEY=VALUE ...` passes
    them; one replica with one CPU. Replicas inherit this environment (the cache folder)."""
    import ray
    from ray import serve

    from siglip_cli.cli.ray_serve import Args, build

    saved = dict(os.environ)
    os.environ.update({**indexed["env"], "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    os.environ.pop("RAY_ADDRESS", None)
    temp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    try:
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, _temp_dir=temp, configure_logging=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {"model": str(tiny_checkpoint), "indexes": str(indexed["out"]), "exact": "true", "token": TOKEN,
                "num_replicas": "1", "num_cpus": "1"}
        serve.run(build(Args.model_validate(args)), name="siglip", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                          headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            yield client
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            os.environ.clear()
            os.environ.update(saved)
            shutil.rmtree(temp, ignore_errors=True)


def test_a_replica_serves_the_same_app(deployed, indexed, tiny_checkpoint):
    health = deployed.get("/v1/health", headers={"Authorization": ""})  # health needs no token
    assert health.status_code == 200 and health.json() == {"status": "ok"}

    # classify: the records of `siglip classify --json`
    photos = indexed["photos"][:2]
    expected = cli("classify", *photos, "--labels", LABELS, "--exact", "--json", env=indexed["env"])
    assert expected.exit_code == 0, expected.stderr
    response = deployed.post("/v1/classify", data={"labels": LABELS}, files=[upload(p) for p in photos])
    assert response.status_code == 200, response.text
    assert same_records(response.json(), json.loads(expected.stdout)), (response.json(), expected.stdout)

    # search the index given as `indexes=`: the record of `siglip search --json`
    expected = cli("search", indexed["out"], "a red car", "-k", "3", "--json", env=indexed["env"])
    assert expected.exit_code == 0, expected.stderr
    response = deployed.get("/v1/search", params={"q": "a red car", "k": 3})
    assert response.status_code == 200, response.text
    assert same_records(response.json(), json.loads(expected.stdout)), (response.json(), expected.stdout)

    # the app's own rules hold behind Ray's proxy: the token, a bad upload's 422
    refused = deployed.post("/v1/classify", data={"labels": LABELS}, files=[upload(photos[0])], headers={"Authorization": ""})
    assert refused.status_code == 401 and "token" in refused.json()["error"]
    bad = deployed.post("/v1/classify", data={"labels": LABELS}, files=[upload(indexed["root"] / "notes.jpg", data=b"not a picture")])
    assert bad.status_code == 422 and "notes.jpg" in bad.json()["error"], bad.text

    info = deployed.get("/v1/info").json()
    assert info["model"] == str(tiny_checkpoint) and info["dtype"] == "fp32"
    assert [item["rows"] for item in info["indexes"]] == [4]
