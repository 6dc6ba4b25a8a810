"""Pixels identical to transformers' SiglipImageProcessorPil, and clear errors for bad files."""

from __future__ import annotations

import http.server
import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from siglip_cli.core.config import PreprocessConfig
from siglip_cli.core.errors import InputError
from siglip_cli.core.images import (
    DecodeOptions,
    load_pixels,
    normalization_table,
    open_image,
    pixels_to_model_input,
    to_rgb,
)
from siglip_cli.urls import fetch_url, is_url

from .conftest import LocalHTTPServer, random_image

PRE = PreprocessConfig(height=32, width=32)


def ours(source, pre=PRE, options=DecodeOptions()) -> np.ndarray:
    pixels = load_pixels(source, "test", pre, options)
    table = torch.from_numpy(normalization_table(pre))
    return pixels_to_model_input(torch.from_numpy(pixels.copy())[None], table).numpy()[0]


@pytest.fixture(scope="module")
def processor():
    from transformers import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": 32, "width": 32})


def reference(processor, image) -> np.ndarray:
    return processor(images=image, return_tensors="np")["pixel_values"][0]


def _palette_with_transparency():
    image = random_image(3, (40, 30)).convert("P")
    image.info["transparency"] = 5
    return image


MODES = {
    "RGB": lambda: random_image(1, (45, 37)),
    "RGBA": lambda: _with_alpha(random_image(2, (40, 50)), "RGBA"),
    "LA": lambda: _with_alpha(random_image(2, (40, 50)).convert("L"), "LA"),
    "P": lambda: random_image(3, (40, 30)).convert("P"),
    "P+transparency": _palette_with_transparency,
    "L": lambda: random_image(4, (33, 33)).convert("L"),
    "I;16": lambda: Image.fromarray((np.asarray(random_image(5, (36, 28)).convert("L"), dtype=np.uint16) * 257)),
    "CMYK": lambda: random_image(6, (30, 40)).convert("CMYK"),
    "1": lambda: random_image(7, (30, 40)).convert("1"),
    "upscale": lambda: random_image(8, (10, 7)),
    "exact-size": lambda: random_image(9, (32, 32)),
}


def _with_alpha(image, mode):
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, image.width, dtype=np.uint8), (image.height, 1)))
    out = image.convert(mode)
    out.putalpha(alpha)
    return out


@pytest.mark.parametrize("mode", sorted(MODES))
def test_pixels_identical_to_reference(processor, mode):
    image = MODES[mode]()
    expected = reference(processor, image)
    actual = ours(image)
    assert actual.dtype == np.float32 and actual.shape == expected.shape == (3, 32, 32)
    assert np.array_equal(actual, expected), f"max diff {np.abs(actual - expected).max()}"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF"])
def test_files_and_bytes_identical_to_reference(processor, tmp_path, fmt):
    path = tmp_path / f"x.{fmt.lower()}"
    random_image(11, (50, 38)).save(path, format=fmt)
    with Image.open(path) as image:
        expected = reference(processor, image.convert("RGB"))
    assert np.array_equal(ours(path), expected)
    assert np.array_equal(ours(path.read_bytes()), expected)
    assert np.array_equal(ours(str(path)), expected)


def test_uint8_arrays_are_accepted(processor):
    image = random_image(12, (40, 40))
    assert np.array_equal(ours(np.asarray(image)), reference(processor, image))


def test_values_span_minus_one_to_one():
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    black = Image.new("RGB", (32, 32), (0, 0, 0))
    assert ours(white).min() == 1.0 and ours(black).max() == -1.0


def test_exif_orientation_is_applied_unlike_the_bare_processor(processor, tmp_path):
    """Deliberate difference: phones store pictures sideways plus an EXIF Orientation tag.
    We (like the zero-shot pipeline's load_image) turn them upright; the processor alone does not."""
    image = random_image(13, (60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif, quality=95)
    with Image.open(path) as raw:
        upright = ImageOps.exif_transpose(raw)
        assert upright.size == (40, 60)
        assert np.array_equal(ours(path), reference(processor, upright))
        assert not np.array_equal(ours(path), reference(processor, raw.convert("RGB")))


def test_animated_files_use_their_first_frame(processor, tmp_path):
    frames = [random_image(20 + i, (32, 32)) for i in range(3)]
    path = tmp_path / "anim.webp"
    frames[0].save(path, save_all=True, append_images=frames[1:], lossless=True, duration=40)
    with Image.open(path) as image:
        assert image.n_frames == 3
        first = image.convert("RGB")
    assert np.array_equal(ours(path), reference(processor, first))
    assert not np.array_equal(ours(path), reference(processor, frames[1]))


def test_resampling_follows_the_checkpoint(processor):
    """SigLIP 2 checkpoints say resample=2 (bilinear); the filter comes from the config."""
    from transformers import SiglipImageProcessorPil

    image = random_image(21, (70, 50))
    bilinear = SiglipImageProcessorPil(size={"height": 32, "width": 32}, resample=2)
    pre = PreprocessConfig(height=32, width=32, resample=2)
    assert np.array_equal(ours(image, pre), reference(bilinear, image))


def test_rgb_conversion_composites_transparency_on_white():
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kind,message",
    [
        ("truncated", "corrupt or truncated image"),
        ("not_image", "not an image"),
        ("empty", "not an image"),
        ("bomb", "over the --max-pixels limit"),
    ],
)
def test_bad_files_raise_one_line_naming_the_file(bad_files, kind, message):
    path = bad_files[kind]
    with pytest.raises(InputError) as info:
        load_pixels(path, str(path), PRE)
    text = str(info.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text


def test_pixel_cap_is_adjustable(bad_files):
    image = open_image(bad_files["bomb"], "bomb", DecodeOptions(max_pixels=200_000_000))
    assert image.size == (12000, 12000)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_pixels(tmp_path / "nope.jpg", str(tmp_path / "nope.jpg"), PRE)
    with pytest.raises(InputError, match="is a folder"):
        load_pixels(tmp_path, str(tmp_path), PRE)


# ---------------------------------------------------------------------------------- URLs
class _Handler(http.server.BaseHTTPRequestHandler):
    payloads: dict = {}

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path == "/slow.png":
            time.sleep(2)
        if self.path == "/drip.png":  # answers at once, then trickles a byte every 0.05 s
            self.send_response(200)
            self.send_header("Content-Length", "200")
            self.end_headers()
            for _ in range(200):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.05)
            return
        body = self.payloads.get(self.path)
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    buffer = io.BytesIO()
    random_image(30, (40, 40)).save(buffer, format="PNG")
    _Handler.payloads = {"/cat.png": buffer.getvalue(), "/slow.png": buffer.getvalue(), "/big.png": b"x" * 5000}
    httpd = LocalHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_url_images_match_the_same_bytes(server):
    url = f"{server}/cat.png"
    assert np.array_equal(ours(fetch_url(url)), ours(_Handler.payloads["/cat.png"]))


@pytest.mark.parametrize(
    "path,options,message",
    [
        ("/missing.png", {}, "HTTP 404"),
        ("/big.png", {"max_bytes": 1000}, "download limit"),
        ("/slow.png", {"timeout": 0.3}, "within 0.3 s"),
        ("/drip.png", {"timeout": 0.5}, "not finished within 0.5 s"),
    ],
)
def test_url_errors(server, path, options, message):
    url = server + path
    started = time.monotonic()
    with pytest.raises(InputError) as info:
        fetch_url(url, **options)
    assert str(info.value).startswith(url) and message in str(info.value)
    assert time.monotonic() - started < 5  # the timeout bounds the whole download, not each read


def test_url_schemes_are_case_insensitive(server):
    url = f"{server}/cat.png".replace("http://", "HTTP://")
    assert is_url(url) and np.array_equal(ours(fetch_url(url)), ours(_Handler.payloads["/cat.png"]))


def test_unreachable_host():
    with pytest.raises(InputError, match="cannot download"):
        fetch_url("http://127.0.0.1:9/x.png")


def test_normalization_table_matches_reference_arithmetic():
    levels = np.arange(256, dtype=np.uint8)
    expected = ((levels.astype(np.float64) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    assert np.array_equal(normalization_table(PreprocessConfig())[0], expected)


def test_path_objects_name_themselves(tmp_path: Path):
    path = tmp_path / "a.png"
    random_image(1).save(path)
    assert ours(path).shape == (3, 32, 32)
