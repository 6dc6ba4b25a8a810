"""Image bombs in containers are refused before a pixel is decoded (issue 17, item 15): an ICO
whose directory says 16x16 while its entry is a 20000x20000 PNG used to peak at 645 MB, as
Pillow's ICO plugin decodes while opening. The check reads directories and embedded headers
first; every bomb's whole run must stay within 50 MB of an ordinary one-image run."""

from __future__ import annotations


import pytest

from siglip_cli.core.errors import InputError
from siglip_cli.core.images import DecodeOptions, container_sizes, open_image

from .bomb_fixtures import HUGE, corpus, siglip_peak

BOMBS = ["png-in-ico.ico", "png-in-cur.cur", "bmp-in-ico.ico", "png-in-icns.icns", "png-bomb.png"]


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    return corpus(tmp_path_factory.mktemp("bombs"))


def test_container_directories_and_embedded_headers_are_read_without_decoding(bombs):
    with open(bombs["png-in-ico.ico"], "rb") as fh:
        assert container_sizes(fh) == [(16, 16), (HUGE, HUGE)] and fh.tell() == 0
    with open(bombs["bmp-in-ico.ico"], "rb") as fh:
        assert container_sizes(fh) == [(16, 16), (HUGE, HUGE)]
    with open(bombs["png-in-icns.icns"], "rb") as fh:
        assert container_sizes(fh) == [(HUGE, HUGE)]
    with open(bombs["ordinary.png"], "rb") as fh:
        assert container_sizes(fh) is None


@pytest.mark.parametrize("name", BOMBS)
def test_every_bomb_is_refused_naming_its_real_size(bombs, name):
    with pytest.raises(InputError, match=f"{HUGE}x{HUGE} is 400.0 megapixels, over the --max-pixels limit"):
        open_image(bombs[name], name, DecodeOptions(max_pixels=10_000_000))
    assert open_image(bombs["ordinary.ico"], "ordinary.ico").size == (16, 16)


def test_bombs_cost_no_more_memory_than_an_ordinary_image(bombs, tiny_checkpoint, tmp_path):
    """Whole processes, measured by the kernel (peak RSS): each bomb within 50 MB of one
    ordinary image's run (the old code decoded the ICO's PNG first: +400 MB)."""
    env = {"SIGLIP_MODEL": str(tiny_checkpoint), "SIGLIP_CACHE_DIR": str(tmp_path / "cache")}
    args = ["classify", "--labels", "a cat,a dog", "--json", "--max-pixels", "10000000"]
    ordinary = siglip_peak([*args[:1], bombs["ordinary.png"], *args[1:]], env)
    assert ordinary["rc"] == 0, ordinary["stderr"]
    for name in BOMBS:
        run = siglip_peak([*args[:1], bombs[name], *args[1:]], env)
        assert run["rc"] == 1 and "--max-pixels" in run["stderr"] and "Traceback" not in run["stderr"], run["stderr"]
        assert run["peak_mb"] < ordinary["peak_mb"] + 50, (name, run["peak_mb"], ordinary["peak_mb"])
