"""The CLI at the lowest Typer version pyproject.toml allows: only Typer's public API is used, so
usage errors stay one line and help still shows. (The highest is what the suite runs on.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lowest_typer() -> str:
    spec = re.search(r'"typer>=([\d.]+)', (ROOT / "pyproject.toml").read_text())
    assert spec, "pyproject.toml must give typer a lower bound"
    return spec.group(1)


@pytest.fixture(scope="module")
def old_typer(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("typer-lowest")
    version = _lowest_typer()
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), f"typer=={version}"],
        capture_output=True, text=True, timeout=300,
    )
    if install.returncode:
        pytest.skip(f"cannot install typer=={version} from the package index: {install.stderr.strip()[-200:]}")
    return target


def _siglip(old_typer: Path, *args: str) -> subprocess.CompletedProcess:
    code = "import sys, typer; sys.argv = ['siglip', *sys.argv[1:]]; print('typer', typer.__version__, file=sys.stderr)\n" \
           "from siglip_cli.cli import main\nmain()\n"
    env = {"PYTHONPATH": f"{old_typer}:{ROOT}", "PATH": "/usr/bin:/bin", "COLUMNS": "100"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)


def test_usage_errors_and_help_at_the_lowest_typer(old_typer):
    version = _lowest_typer()
    bogus = _siglip(old_typer, "classify", "a.jpg", "--bogus")
    assert f"typer {version}" in bogus.stderr
    lines = [line for line in bogus.stderr.splitlines() if not line.startswith("typer ")]
    assert bogus.returncode == 2 and len(lines) == 1, bogus.stderr
    assert lines[0].startswith("siglip: error: No such option: --bogus") and lines[0].endswith("(see 'siglip classify --help')")
    assert "('" not in lines[0]  # no Python repr leaking from Typer's suggestion
    out_of_range = _siglip(old_typer, "classify", "a.jpg", "--labels", "a", "--top-k", "0")
    assert out_of_range.returncode == 2 and "--top-k" in out_of_range.stderr and "Traceback" not in out_of_range.stderr
    bare = _siglip(old_typer, "embed")
    assert bare.returncode == 0 and "Usage: siglip embed" in bare.stdout
    assert "Usage: siglip" in _siglip(old_typer, "--help").stdout
