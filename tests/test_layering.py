"""The architecture holds: core/ knows nothing of the app, nothing imports cli/, render never
imports torch, and `--help` never imports torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "siglip_cli"


def _imports(path: Path) -> set[str]:
    """Absolute names of every siglip_cli module (and third-party top module) a file imports."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def _files(folder: Path):
    return sorted(p for p in folder.rglob("*.py"))


@pytest.mark.parametrize("path", _files(PACKAGE / "core"), ids=lambda p: p.name)
def test_core_imports_nothing_from_the_app(path):
    app = {n for n in _imports(path) if n.startswith("siglip_cli") and not n.startswith("siglip_cli.core")}
    assert not app, f"{path.name} imports the app layer: {sorted(app)}"
    assert not {n for n in _imports(path) if n.split(".")[0] in ("typer", "rich", "click")}


@pytest.mark.parametrize(
    "path",
    [p for p in _files(PACKAGE) if p.relative_to(PACKAGE).parts[0] != "cli" and p.name != "__main__.py"],  # (the entry point)
    ids=lambda p: p.name,
)
def test_nothing_outside_cli_imports_it(path):
    assert not {n for n in _imports(path) if n.startswith("siglip_cli.cli")}, path


def test_render_never_imports_torch():
    names = _imports(PACKAGE / "cli" / "render.py")
    assert not {n for n in names if n.split(".")[0] in ("torch", "numpy")}
    assert not {n for n in names if n.startswith("siglip_cli.") and n.split(".")[1] not in ("results", "cli")}


def test_the_layering_test_sees_a_violation(tmp_path):
    """The scanner itself works: a relative import of the app from core is caught."""
    fake = PACKAGE / "core" / "_probe_for_test.py"
    fake.write_text("from ..engine import Engine\nfrom .. import store\n")
    try:
        assert {"siglip_cli.engine.Engine", "siglip_cli.store"} <= _imports(fake)
    finally:
        fake.unlink()


@pytest.mark.parametrize("args", [["--help"], ["classify", "--help"], ["embed", "--help"], ["similarity", "--help"],
                                  ["bench", "--help"], ["search", "--help"], ["info", "--help"], ["dedupe", "--help"], ["serve", "--help"], ["classify"], []])
def test_help_never_imports_torch(args):
    code = (
        "import sys\n"
        "sys.argv = ['siglip', *sys.argv[1:]]\n"
        "from siglip_cli.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'heavy import'\n"
        "print('clean')\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().endswith("clean"), result.stderr
    assert "Usage" in result.stdout
