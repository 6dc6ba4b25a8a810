"""Image bombs in containers, built here with Pillow and struct (issue 17, item 15), and a way
to measure a whole siglip process's peak memory. Used by tests/test_image_bombs.py and
benchmarks/bomb_memory.py."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
HUGE = 20000  # sides of the hidden picture: 400 megapixels, 400 MB as Pillow's 1-bit mode


def huge_png(side: int = HUGE) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")  # ~60 kB on disk
    return buffer.getvalue()


def small_png(side: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def ico_holding(payload: bytes, magic: int = 1, claimed: int = 16) -> bytes:
    """An ICO (magic 1) or CUR (magic 2) whose one directory entry claims `claimed` pixels a
    side while holding `payload`."""
    header = struct.pack("<HHH", 0, magic, 1)
    entry = struct.pack("<BBBBHHII", claimed, claimed, 0, 0, 1, 32, len(payload), 6 + 16)
    return header + entry + payload


def bmp_header_only(width: int, height: int) -> bytes:
    """A BITMAPINFOHEADER (ICO stores twice the height: picture and mask) with 1 kB of pixels."""
    return struct.pack("<IiiHHIIiiII", 40, width, 2 * height, 1, 32, 0, 0, 0, 0, 0, 0) + b"\0" * 1024


def icns_holding(png: bytes, kind: bytes = b"ic10") -> bytes:
    block = kind + struct.pack(">I", 8 + len(png)) + png
    return b"icns" + struct.pack(">I", 8 + len(block)) + block


def corpus(folder: Path) -> dict[str, Path]:
    """Every bomb, and an ordinary picture of the same kind to compare with."""
    folder.mkdir(parents=True, exist_ok=True)
    png = huge_png()
    files = {
        "ordinary.png": small_png(64),
        "ordinary.ico": ico_holding(small_png(16)),
        "png-bomb.png": png,
        "png-in-ico.ico": ico_holding(png),
        "png-in-cur.cur": ico_holding(png, magic=2),
        "bmp-in-ico.ico": ico_holding(bmp_header_only(HUGE, HUGE)),
        "png-in-icns.icns": icns_holding(png),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


PEAK_WRAPPER = (
    "import json, os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
    "err = p.stderr.read()\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "print(json.dumps({'peak_mb': usage.ru_maxrss / 1024, 'rc': os.waitstatus_to_exitcode(status),\n"
    "                  'stderr': err.decode(errors='replace')[-2000:]}))\n"
)


def siglip_peak(args: list, env: dict | None = None) -> dict:
    """Run `python -m siglip_cli ARGS` as its own process: {peak_mb (its peak RSS), rc, stderr}."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    argv = [sys.executable, "-m", "siglip_cli", *map(str, args)]
    out = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *argv], capture_output=True, text=True, env=environment,
                         timeout=600, check=True)
    return json.loads(out.stdout)
