"""Terminal escapes in names never reach the terminal (issue 17, item 2): file names, labels,
queries and texts holding ESC, BEL, CSI (0x9b) or bidi overrides are shown written out
(`\\x1b`) in tables, error lines, skip notes and --preview lines; JSON, JSON lines and CSV keep
them exact."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import pytest

from siglip_cli.cli.terminal import printable

from .conftest import random_image
from .search_fixtures import cli
from .test_search_preview import _in_terminal

HYPERLINK = "c\x1b]8;;https:evil\x07click\x1b]8;;\x07.jpg"  # an OSC 8 hyperlink around "click"
CLEAR = "\x1b[2Jclear.png"  # clears the screen
C1 = "\x9b2Jcsi.png"  # the one-byte CSI
BIDI = "cat\u202egnp.exe"  # shows as "catexe.png"
RAW = ("\x1b", "\x07", "\x9b", "\u202e")


def _raw_controls(text: str) -> list[str]:
    return [c for c in RAW if c in text]


@pytest.mark.parametrize(
    "text, shown",
    [
        (HYPERLINK, "c\\x1b]8;;https:evil\\x07click\\x1b]8;;\\x07.jpg"),
        (CLEAR, "\\x1b[2Jclear.png"),
        (C1, "\\x9b2Jcsi.png"),
        (BIDI, "cat\\u202egnp.exe"),
        ("a\nb\rc\td\x7f\x00", "a\\nb\\rc\\td\\x7f\\x00"),
        ("caf\udce9.jpg", "caf\\xe9.jpg"),  # a Latin-1 byte in a file name that is not UTF-8
        ("日本語 🐱 naïve \u200d a\\b", "日本語 🐱 naïve \u200d a\\b"),  # kept: scripts, emoji, ZWJ, backslash
    ],
)
def test_printable_writes_out_what_a_terminal_would_act_on(text, shown):
    assert printable(text) == shown


@pytest.fixture()
def hostile_folder(tmp_path) -> Path:
    folder = tmp_path / "hostile"
    folder.mkdir()
    random_image(1).save(folder / HYPERLINK, format="JPEG")
    random_image(2).save(folder / CLEAR, format="PNG")
    random_image(3).save(folder / C1, format="PNG")
    (folder / ("broken\x1b[31m.jpg")).write_bytes(b"not an image at all")
    return folder


@pytest.fixture()
def env(tmp_path, tiny_checkpoint) -> dict:
    return {"SIGLIP_CACHE_DIR": str(tmp_path / "cache"), "SIGLIP_MODEL": str(tiny_checkpoint), "COLUMNS": "200"}


def test_classify_table_and_errors_show_escapes_written_out(hostile_folder, env):
    labels = "a cat,\x1b[2Jdog"
    result = cli("classify", hostile_folder, "--labels", labels, "--format", "table", env=env)
    assert result.exit_code == 1  # the broken file
    assert _raw_controls(result.stdout) == [] and _raw_controls(result.stderr) == []
    assert "\\x1b]8;;https:evil\\x07click" in result.stdout and "\\x9b2Jcsi.png" in result.stdout
    assert "\\x1b[2Jdog" in result.stdout  # the label's column header
    assert "broken\\x1b[31m.jpg" in result.stdout and "broken\\x1b[31m.jpg" in result.stderr
    one = cli("classify", hostile_folder / CLEAR, "--labels", labels, "--format", "table", env=env)
    assert one.exit_code == 0 and _raw_controls(one.stdout) == []
    assert "\\x1b[2Jclear.png" in one.stdout and "\\x1b[2Jdog" in one.stdout  # title and label rows
    many = cli("classify", hostile_folder, "--labels", ",".join(f"\x1b[{i}m{i}" for i in range(8)), "--format", "table", env=env)
    assert _raw_controls(many.stdout) == [] and re.search(r"\\x1b\[(\d)m\1 \(", many.stdout)  # the best-3 table


def test_json_jsonl_and_csv_keep_names_exact(hostile_folder, env):
    labels = "a cat,\x1b[2Jdog"
    records = json.loads(cli("classify", hostile_folder, "--labels", labels, "--json", env=env).stdout)
    names = {Path(r["path"]).name for r in records}
    assert {HYPERLINK, CLEAR, C1, "broken\x1b[31m.jpg"} == names
    assert {item["label"] for r in records if "labels" in r for item in r["labels"]} == {"a cat", "\x1b[2Jdog"}
    rows = list(csv.reader(io.StringIO(cli("classify", hostile_folder, "--labels", labels, "--format", "csv", env=env).stdout)))
    assert {Path(row[0]).name for row in rows[1:]} == names


def test_search_and_embed_notes_show_escapes_written_out(hostile_folder, env, tmp_path):
    out = tmp_path / "vecs.npy"
    embedded = cli("embed", hostile_folder, "--out", out, "--text", "\x1b[2Jtext row", env=env)
    assert embedded.exit_code == 1  # one skipped
    assert _raw_controls(embedded.stderr) == [] and "skipped" in embedded.stderr and "broken\\x1b[31m.jpg" in embedded.stderr
    found = cli("search", out, "\x1b]8;;https:evil\x07query", "--texts", "-k", "10", "--format", "table", env=env)
    assert found.exit_code == 0, found.stderr
    assert _raw_controls(found.stdout) == [] and _raw_controls(found.stderr) == []
    assert '"\\x1b]8;;https:evil\\x07query"' in found.stdout  # the title
    assert "\\x1b[2Jclear.png" in found.stdout and '"\\x1b[2Jtext row"' in found.stdout  # an image hit, a text hit
    exact = [json.loads(line) for line in cli("search", out, "\x1b]8;;https:evil\x07query", "--texts", "-k", "10",
                                              "--format", "jsonl", env=env).stdout.splitlines()]
    assert exact[0]["query"] == "\x1b]8;;https:evil\x07query"
    assert {Path(h["path"]).name for h in exact[0]["results"]} >= {HYPERLINK, CLEAR, C1}
    missing = cli("search", out, "--image", hostile_folder / "gone\x1b[2J.png", "--format", "table", env=env)
    assert missing.exit_code == 1 and _raw_controls(missing.stdout + missing.stderr) == []
    assert "gone\\x1b[2J.png" in missing.stderr


def test_similarity_table_shows_escapes_written_out(hostile_folder, env):
    result = cli("similarity", "-i", hostile_folder / CLEAR, "-i", hostile_folder / HYPERLINK, "--text", "\x9b2J a cat",
                 "--text", "a \u202edog", "--format", "table", env=env)
    assert result.exit_code == 0, result.stderr
    assert _raw_controls(result.stdout) == []
    for shown in ("\\x1b[2Jclear.png", "\\x9b2J a cat", "a \\u202edog", "click\\x1b]8;;\\x07.jpg"):
        assert shown in result.stdout, shown


def test_preview_lines_show_escapes_written_out(hostile_folder, env, tmp_path):
    pytest.importorskip("textual_image")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in (HYPERLINK, CLEAR):
        shutil.copy(hostile_folder / name, photos / name)
    out = tmp_path / "vecs.npy"
    assert cli("embed", photos, "--out", out, env=env).exit_code == 0
    code, output = _in_terminal(["search", str(out), "\x1b[2Ja cat", "-k", "2", "--preview"], env, kitty=True)
    assert code == 0, output[-2000:]
    assert b"\x1b[2J" not in output and b"\x1b]8;;" not in output and b"\x07click" not in output
    assert b"\\x1b[2Jclear.png" in output and b"\\x1b]8;;https:evil" in output and b'"\\x1b[2Ja cat"' in output
