"""`--server URL`: classify, similarity, embed and search through a running `siglip serve`
print what they print locally; a server that is down, serves another model or not the index
is one line and exit 4; the client imports no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .search_fixtures import ROOT, cli, make_photos, one_error_line, records
from .serve_fixtures import Server
from .test_serve import same_records


@pytest.fixture(scope="module")
def remote(tmp_path_factory, tiny_checkpoint, bad_files):
    root = tmp_path_factory.mktemp("client")
    photos = make_photos(root / "photos", 5)
    env = {"SIGLIP_CACHE_DIR": str(root / "cache"), "SIGLIP_MODEL": str(tiny_checkpoint)}
    out = root / "vecs.npy"
    assert cli("embed", root / "photos", "--out", out, "--text", "a red car", "--exact", env=env).exit_code == 0
    server = Server([out, "--exact"], env=env)
    yield {"server": server, "photos": photos, "out": out, "env": env, "inputs": [*photos[:3], bad_files["not_image"], root / "gone.png"]}
    assert server.stop() == 0


def both(remote, *args):
    local = cli(*args, "--exact", env=remote["env"]) if args[0] != "search" else cli(*args, env=remote["env"])
    served = cli(*args, "--server", remote["server"].url, env=remote["env"])
    return local, served


@pytest.mark.parametrize("fmt", ["table", "json", "csv"])
def test_classify_prints_what_it_prints_locally(remote, fmt):
    local, served = both(remote, "classify", *remote["inputs"], "--labels", "2 cats,2 dogs,a red car", "--format", fmt)
    assert served.exit_code == local.exit_code == 1  # the bad inputs
    assert served.stderr == local.stderr
    if fmt == "json":
        assert same_records(json.loads(served.stdout), json.loads(local.stdout))
    elif fmt == "csv":  # the server batches images with others: numbers equal within float32 rounding
        assert same_records(csv_cells(served.stdout), csv_cells(local.stdout))
    else:
        assert served.stdout == local.stdout


def csv_cells(text: str) -> list:
    import csv
    import io

    def cell(value: str):
        try:
            return float(value)
        except ValueError:
            return value

    return [[cell(value) for value in row] for row in csv.reader(io.StringIO(text))]


def test_similarity_and_embed_print_what_they_print_locally(remote):
    photos = remote["photos"][:2]
    local, served = both(remote, "similarity", "-i", photos[0], "-i", photos[1], "--text", "a cat", "--format", "table")
    assert served.exit_code == local.exit_code == 0 and served.stdout == local.stdout
    local, served = both(remote, "similarity", "-i", photos[0], "--text", "a cat", "--text", "a dog", "--json")
    assert same_records(json.loads(served.stdout), json.loads(local.stdout))
    local, served = both(remote, "embed", *photos, "--text", "a cat", "--format", "jsonl", "--template", "art of {}")
    assert served.exit_code == local.exit_code == 0
    assert same_records(records(served.stdout), records(local.stdout))


def test_search_prints_what_it_prints_locally(remote):
    local, served = both(remote, "search", remote["out"], "a cat", "a red car", "--image", remote["photos"][1], "-k", "3", "--json", "--texts")
    assert served.exit_code == local.exit_code == 0, served.stderr
    assert same_records(json.loads(served.stdout), json.loads(local.stdout))
    local, served = both(remote, "search", remote["out"], "a cat", "--format", "table")
    assert served.stdout == local.stdout


def test_a_down_server_another_model_or_index_is_exit_4(remote, tmp_path, checkpoint_factory):
    photo = remote["photos"][0]
    down = cli("classify", photo, "--labels", "a", "--server", "http://127.0.0.1:9", env=remote["env"])
    assert down.exit_code == 4
    one_error_line(down.stderr, "http://127.0.0.1:9", "does not answer")
    other = cli("classify", photo, "--labels", "a", "--server", remote["server"].url, "--model", checkpoint_factory("other-client", seed=5),
                env=remote["env"])
    assert other.exit_code == 4
    one_error_line(other.stderr, "serves", "not")
    precision = cli("classify", photo, "--labels", "a", "--server", remote["server"].url, "--dtype", "bf16", env=remote["env"])
    assert precision.exit_code == 4
    one_error_line(precision.stderr, "computes in fp32, not bf16")
    (tmp_path / "elsewhere.npy").write_bytes(remote["out"].read_bytes())
    index = cli("search", tmp_path / "elsewhere.npy", "a cat", "--server", remote["server"].url, env=remote["env"])
    assert index.exit_code == 4
    one_error_line(index.stderr, "does not serve")
    out = cli("embed", photo, "--out", tmp_path / "x.npy", "--server", remote["server"].url, env=remote["env"])
    assert out.exit_code == 2


def test_the_client_imports_no_torch(remote):
    code = (
        "import sys\n"
        "from siglip_cli.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    code = exit.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('clean', code)\n"
    )
    args = ["classify", str(remote["photos"][0]), "--labels", "a,b", "--server", remote["server"].url, "--format", "json"]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                            env={**remote["env"], "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert result.stdout.strip().endswith("clean 0"), result.stderr
