"""`--format paths` and `--null` for classify and search (issue 18, item 12): one path per line,
exactly as stored, for xargs and image viewers; a name with a line break is left out with a
note (one path per line cannot carry it) and `--null` carries every name."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from siglip_cli.cli import render
from siglip_cli.results import SearchHit, SearchResult

from .search_fixtures import ROOT, cli, make_photos, one_error_line, records


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_checkpoint):
    """Photos, two with awkward names (a line break; bytes that are not UTF-8), in an .npz
    index (a .npy index's paths.txt cannot hold a line break)."""
    root = tmp_path_factory.mktemp("paths")
    folder = root / "photos"
    make_photos(folder, 4)
    os.rename(folder / "p001.png", folder / "p001\nsecond line.png")
    os.rename(os.fsencode(folder / "p002.png"), os.fsencode(folder) + b"/caf\xe9.png")
    env = {"SIGLIP_CACHE_DIR": str(root / "cache"), "SIGLIP_MODEL": str(tiny_checkpoint)}
    out = root / "vecs.npz"
    made = cli("embed", folder, "--out", out, env=env)
    assert made.exit_code == 0, made.stderr
    return {"root": root, "folder": folder, "out": out, "env": env}


def _run(library, *args) -> subprocess.CompletedProcess:
    """`siglip ARGS` as its own process, stdout kept as bytes (file names need not be UTF-8)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **library["env"]}
    return subprocess.run([sys.executable, "-m", "siglip_cli", *map(os.fsencode, args)], capture_output=True, env=env, timeout=300)


def _hits_json(library, *args) -> list[list[str]]:
    result = _run(library, "search", library["out"], *args, "--json")
    assert result.returncode == 0, result.stderr
    return [[hit["path"] for hit in query["results"]] for query in records(result.stdout.decode("utf-8", "surrogateescape"))]


def test_search_paths_are_the_hits_in_rank_order_exactly_as_stored(library):
    expected = [p for query in _hits_json(library, "a red square", "a cat", "--top-k", "4") for p in query]
    assert len(expected) == 8

    lines = _run(library, "search", library["out"], "a red square", "a cat", "--top-k", "4", "--format", "paths")
    assert lines.returncode == 0, lines.stderr
    broken = [p for p in expected if "\n" in p]
    assert len(broken) == 2  # the line-break name is a hit of both queries, and left out of both
    assert lines.stdout.split(b"\n")[:-1] == [os.fsencode(p) for p in expected if "\n" not in p]
    assert os.fsencode(library["folder"]) + b"/caf\xe9.png" in lines.stdout.split(b"\n")  # not UTF-8: the bytes on disk
    assert b"left out 2 path(s) holding a line break" in lines.stderr and b"--null" in lines.stderr

    nul = _run(library, "search", library["out"], "a red square", "a cat", "--top-k", "4", "-0")
    assert nul.returncode == 0, nul.stderr
    assert nul.stdout.split(b"\0")[:-1] == [os.fsencode(p) for p in expected]
    assert nul.stderr == b""
    for name in nul.stdout.split(b"\0")[:-1]:
        assert os.path.isfile(name)  # xargs -0 gets real files


def test_classify_paths_lists_the_images_that_keep_a_label(library):
    scores = _run(library, "classify", library["folder"], "--labels", "red,blue", "--json")
    assert scores.returncode == 0, scores.stderr
    best = {r["path"]: max(label["score"] for label in r["labels"]) for r in records(scores.stdout.decode("utf-8", "surrogateescape"))}
    ordered = sorted(best.values())
    threshold = (ordered[1] + ordered[2]) / 2  # between the 2nd and 3rd image: two pass
    expected = [path for path, score in best.items() if score >= threshold]
    assert len(expected) == 2

    result = _run(library, "classify", library["folder"], "--labels", "red,blue", "--threshold", f"{threshold:.9f}", "-0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(b"\0")[:-1] == [os.fsencode(p) for p in expected]

    every = _run(library, "classify", library["folder"], "--labels", "red,blue", "--format", "paths")
    assert every.returncode == 0 and b"without --threshold every image does" in every.stderr
    assert len(every.stdout.split(b"\n")[:-1]) == 3  # 4 images, one with a line break left out


@pytest.mark.parametrize("args, fragment", [
    (("--null", "--format", "json"), "--null"),
    (("--json", "-0"), "--json and --null"),
    (("--format", "paths", "--texts"), "--texts"),
])
def test_paths_with_what_it_cannot_print_is_refused(library, args, fragment):
    result = cli("search", library["out"], "a cat", *args, env=library["env"])
    assert result.exit_code == 2 and result.stdout == ""
    one_error_line(result.stderr, fragment)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_control_characters_in_names_are_escaped():
    name = "/photos/\x1b]0;pwned\x07\x1b[2Jx.png"
    results = [SearchResult("q", [SearchHit(name, 0.5, 0.1, 1), SearchHit("/photos/plain.png", 0.4, 0.1, 2)])]
    screen = _Terminal()
    render.emit(results, "paths", render.SEARCH_VIEW, out=screen)
    assert screen.getvalue() == "/photos/\\x1b]0;pwned\\x07\\x1b[2Jx.png\n/photos/plain.png\n"
    piped = io.StringIO()
    render.emit(results, "paths", render.SEARCH_VIEW, out=piped)
    assert piped.getvalue() == name + "\n/photos/plain.png\n"  # piped: exact
