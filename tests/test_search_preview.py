"""`search --preview`: thumbnails in a terminal that answers kitty-graphics or sixel queries,
the table with one note everywhere else. The terminal is a pseudo-terminal driven here: it
answers the capability queries as kitty, a sixel terminal or a plain terminal would."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import sys
import termios

import pytest

from .search_fixtures import ROOT, cli, make_photos

TGP_QUERY = re.compile(rb"\x1b_Gi=(\d+),s=1,v=1,a=q")
SIXEL_QUERY = b"\x1b[c"
PLACEHOLDER = "\U0010eeee".encode()  # kitty's image placeholder cell


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("preview")
    make_photos(root / "photos", 3, size=(64, 48))
    env = {"SIGLIP_CACHE_DIR": str(root / "cache"), "SIGLIP_MODEL": str(tiny_checkpoint)}
    assert cli("embed", root / "photos", "--out", root / "vecs.npy", env=env).exit_code == 0
    return root / "vecs.npy", env


def _in_terminal(argv: list[str], env: dict, kitty: bool = False, sixel: bool = False, python_code: str | None = None) -> tuple[int, bytes]:
    """Run `siglip ARGV` on a pseudo-terminal (stdin, stdout and stderr), answering queries."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the terminal is its stdin, stdout and stderr
        code = python_code or "from siglip_cli.cli import main; main()"
        os.execve(sys.executable, [sys.executable, "-c", code, *argv],
                  {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "COLUMNS": "100"})
    # 40 rows x 100 columns of 10x20-pixel cells, as a real terminal reports its size
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 1000, 800))
    output, answered = b"", set()
    while True:
        ready, _, _ = select.select([fd], [], [], 60)
        if not ready:
            break
        try:
            data = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        output += data
        match = TGP_QUERY.search(output)
        if kitty and match and "tgp" not in answered:
            os.write(fd, b"\x1b_Gi=" + match.group(1) + b";OK\x1b\\")
            answered.add("tgp")
        if sixel and SIXEL_QUERY in output and "sixel" not in answered:
            os.write(fd, b"\x1b[?62;4;22c")
            answered.add("sixel")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output


def test_kitty_terminals_get_thumbnails(small_index):
    pytest.importorskip("textual_image")
    index, env = small_index
    code, output = _in_terminal(["search", str(index), "a cat", "-k", "2", "--preview"], env, kitty=True)
    assert code == 0, output[-2000:]
    assert output.count(b"\x1b_G") >= 3  # the query, then each thumbnail's transmission
    assert PLACEHOLDER in output and b"p00" in output and b"Traceback" not in output


def test_sixel_terminals_get_thumbnails(small_index):
    pytest.importorskip("textual_image")
    index, env = small_index
    code, output = _in_terminal(["search", str(index), "a cat", "-k", "2", "--preview"], env, sixel=True)
    assert code == 0, output[-2000:]
    assert output.count(b"\x1bP") >= 2 and b"\x1b\\" in output  # a sixel image per hit
    assert PLACEHOLDER not in output


def test_a_terminal_without_images_gets_the_table_and_a_note(small_index):
    pytest.importorskip("textual_image")
    index, env = small_index
    code, output = _in_terminal(["search", str(index), "a cat", "-k", "2", "--preview"], env)
    assert code == 0
    assert b"this terminal draws no images" in output and b"rank" in output and b"\x1bP" not in output


def test_without_textual_image_the_table_and_a_note(small_index):
    index, env = small_index
    hide = "import sys; sys.modules['textual_image'] = None; from siglip_cli.cli import main; main()"
    code, output = _in_terminal(["search", str(index), "a cat", "-k", "2", "--preview"], env, kitty=True, python_code=hide)
    assert code == 0
    assert b"pip install 'siglip-cli[preview]'" in output and b"rank" in output and PLACEHOLDER not in output


def test_piped_output_gets_the_format_it_asked_for(small_index):
    index, env = small_index
    table = cli("search", index, "a cat", "-k", "2", "--preview", "-f", "table", env=env)
    assert table.exit_code == 0 and "must be a terminal" in table.stderr and "rank" in table.stdout
    lines = cli("search", index, "a cat", "-k", "2", "--preview", env=env)
    assert lines.exit_code == 0 and "only in the table format" in lines.stderr and lines.stdout.startswith("{")
