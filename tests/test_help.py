"""Help a newcomer can read (issue 18, item 8): one placeholder style in every command, defaults
without stray parentheses, Rich markup that leaves `[preview]` alone, and suggestions for a
mistyped option only when they are close."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from siglip_cli.cli.app import app

COMMANDS = [command.name or command.callback.__name__ for command in app.registered_commands]  # new ones too
# What Typer prints when an option has no metavar of ours: <bool>, <int range>, <list[str]>, <path>...
TYPE_PLACEHOLDER = re.compile(r"<(bool|int|float|str|text|path|file|list\[|int range|float range)")


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "220", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("command", [[], *[[c] for c in COMMANDS]], ids=["siglip", *COMMANDS])
def test_one_placeholder_style(command):
    text = _help(*command)
    assert not TYPE_PLACEHOLDER.search(text), TYPE_PLACEHOLDER.search(text).group(0)
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert not re.search(r"[{\[]?[a-z_]+[}\]]?\.\.\.|\{[a-z]", usage), usage  # arguments in capitals: no {index}
    assert "[default: (" not in text
    for line in text.splitlines():  # choices are written a|b|c, never <a|b|c>
        assert not re.search(r"<\w+(\|\w+)+>", line), line


def test_usage_lines_name_arguments_in_capitals():
    usage = next(line for line in _help("search").splitlines() if "Usage:" in line)
    assert re.search(r"Usage: siglip search \[OPTIONS\] \{?INDEX\}? \[QUERY\](\.\.\.)?", usage), usage  # {} = required, Typer >= 0.29
    assert re.search(r"Usage: siglip classify \[OPTIONS\] \[IMAGE\](\.\.\.)?", _help("classify"))


def test_the_default_model_has_no_parentheses():
    text = _help("classify")
    assert "[default: google/siglip-base-patch16-224]" in text


def _words(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


def test_markup_leaves_extras_in_brackets():
    assert "pip install 'siglip-cli[preview]'" in _words(_help("search"))
    assert "pip install 'siglip-cli[ray]'" in _words(_help("embed"))


def test_help_and_completion_are_still_there():
    top = _help()
    assert "--install-completion" in top and "--show-completion" in top and "--version" in top
    short = CliRunner().invoke(app, ["classify", "-h"], env={"COLUMNS": "220"})
    assert short.exit_code == 0 and "Usage: siglip classify" in short.stdout


@pytest.mark.parametrize("typed,suggested", [
    ("--bogus", None), ("--verbos", "--verbose"), ("--thresold", "--threshold"), ("--top_k", "--top-k"),
    ("--labes", "--label or --labels"),
])
def test_a_mistyped_option_suggests_only_close_matches(typed, suggested):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "siglip_cli", "classify", "a.jpg", "--labels", "x", typed],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"siglip: error: No such option: {typed}")
    if suggested is None:
        assert "did you mean" not in proc.stderr and "Possible" not in proc.stderr and "--verbose" not in proc.stderr
    else:
        assert f"did you mean {suggested}?" in proc.stderr
