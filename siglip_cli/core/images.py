"""Images in (path, bytes, PIL image, uint8 array), model pixels out.

Preprocessing reproduces transformers' `SiglipImageProcessorPil` bit for bit:
RGB conversion (transparency composited onto white), PIL resize of the uint8 image to the
model's square size with the checkpoint's filter (bicubic for SigLIP, bilinear for SigLIP 2),
then x * (1/255) in float64 cast to float32, then (x - mean) / std in float32, i.e. [-1, 1].

SigLIP 2 NaFlex (`Siglip2ImageProcessorPil`, also bit for bit): the image keeps its aspect
ratio and is resized to the largest size whose sides are multiples of the patch size and
whose patch count fits the budget (`naflex_size`), then cut into patches in row-major order,
each flattened as (row, column, channel) (`patchify`). Padding to the batch happens later.

Two deliberate additions, both as in transformers' zero-shot pipeline (`load_image`) rather
than the bare processor: the EXIF orientation is applied (phones store pictures sideways and
say so in EXIF), and animated files (GIF, WebP, APNG) use their first frame.

The last two steps are a 256-entry lookup table per channel, applied to uint8 batches on the
model's device: a batch travels to a GPU as uint8, a quarter of the bytes of float32.

One opt-in departure from the reference, `DecodeOptions(draft_jpeg=True)` (`--decode fast`): a
JPEG at least 4x the model's size on both sides is decoded by libjpeg at 1/2, 1/4 or 1/8 scale
in the DCT domain (Pillow's draft mode), never below twice the model's size, then resized as
usual: 2.5x faster for 12 MP phone photos, pixels within 3 levels (0.25 on average) of the
exact decode (benchmarks/agreement.py, benchmarks/embed_modes.py).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import PreprocessConfig
from .errors import InputError, cannot_read

DEFAULT_MAX_PIXELS = 100_000_000  # a 100-megapixel image decodes to 300 MB of RGB

IMAGE_SUFFIXES = frozenset(
    ".jpg .jpeg .jpe .jfif .png .apng .gif .webp .bmp .dib .tif .tiff .ppm .pgm .pbm .pnm .tga .ico .jp2 .j2k "
    ".avif .heic .heif .qoi .sgi .im .pcx .xbm .dds .icns .psd".split()
)

_pil_ready = False


def _pil():
    """Import Pillow once; our own --max-pixels check replaces PIL's bomb guard, and HEIF
    files open when the optional pillow-heif plugin is installed."""
    global _pil_ready
    from PIL import Image

    if not _pil_ready:
        import warnings

        # Pillow warns about odd files on stderr ("Image was not the expected size", EXIF
        # oddities); a damaged file is reported as one line by us, or decoded as it is.
        warnings.filterwarnings("ignore", module=r"PIL\.")
        Image.MAX_IMAGE_PIXELS = None
        try:
            from pillow_heif import register_heif_opener  # type: ignore[import-not-found]

            register_heif_opener()
        except ImportError:
            pass
        _pil_ready = True
    return Image


# Draft decoding stops at twice the model's size: the final resize then still averages over
# 2x2 decoded pixels. Measured on generated 3 and 12 MP JPEGs resized to 224: mean error 0.64
# levels (max 5) when drafting to the model's size, 0.25 (max 3) at twice it. Pillow's own
# `thumbnail()` uses the same gap.
DRAFT_GAP = 2
_ORIENTATION = 0x0112
_SIDEWAYS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class DecodeOptions:
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    draft_jpeg: bool = False  # --decode fast: large JPEGs decode at reduced scale (see above)


def open_image(source: Any, name: str, options: DecodeOptions = DecodeOptions(), draft_size: tuple[int, int] | None = None):
    """Decode one input to an upright PIL image (first frame), checking the pixel cap before
    decoding. With `draft_size` (width, height of the upright result), a JPEG may decode at a
    reduced scale that stays at least that large. Raises InputError naming `name` and the cause."""
    Image = _pil()
    if isinstance(source, Image.Image):
        image = source
        if 0 in image.size:
            raise InputError(f"{name}: the image is {image.size[0]}x{image.size[1]} pixels: nothing to look at")
    elif isinstance(source, np.ndarray):
        image = _from_array(source, name)
    else:
        if isinstance(source, (bytes, bytearray, memoryview)):
            stream = io.BytesIO(bytes(source))
        elif isinstance(source, (str, Path)):
            stream = _open_file(Path(source), name)
        else:
            raise InputError(f"{name}: unsupported input type {type(source).__name__}")
        image = _decode(stream, name, options.max_pixels, draft_size)
    return _exif_upright(image, name)


def _open_file(path: Path, name: str):
    """Open a regular file for reading. Opened non-blocking first, so a FIFO or device named as
    an image is refused instead of blocking forever."""
    import os
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise InputError(cannot_read(name, exc)) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "a folder" if stat.S_ISDIR(mode) else "a FIFO, device or socket"
        raise InputError(f"{name}: is {what}, not an image file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Containers whose directory can promise one size while an embedded image holds another: the
# embedded PNGs are decoded at their own size, whatever the directory says.
_CONTAINERS = ("ICO", "CUR", "ICNS")
_HEIF_SUFFIXES = (".heic", ".heif", ".avif")


def _too_many_pixels(name: str, width: int, height: int, max_pixels: int | None) -> InputError | None:
    if max_pixels and width * height > max_pixels:
        return InputError(
            f"{name}: {width}x{height} is {width * height / 1e6:.1f} megapixels, over the "
            f"--max-pixels limit of {max_pixels / 1e6:g} megapixels (a decompression bomb?)"
        )
    if width == 0 or height == 0:
        return InputError(f"{name}: the image is {width}x{height} pixels: nothing to look at")
    return None


_ICO_MAGICS = (b"\0\0\1\0", b"\0\0\2\0")  # ICO, CUR
_JP2_SIGNATURE = b"\0\0\0\x0cjP  \r\n\x87\n"
_J2K_SIGNATURE = b"\xff\x4f\xff\x51"
_MAX_CONTAINER_ENTRIES = 1024  # more than any real icon holds; a longer directory is damage


def _embedded_header_size(head: bytes, bitmaps: bool = True) -> tuple[int, int] | None:
    """(width, height) from the first bytes of an image embedded in a container: a PNG's IHDR,
    a BMP info header (ICO stores the XOR and AND masks, twice the height), a JPEG 2000 box or
    codestream header. None when these bytes are none of them."""
    if head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head.startswith(_JP2_SIGNATURE):
        at = head.find(b"ihdr")
        if at >= 0 and len(head) >= at + 12:
            return int.from_bytes(head[at + 8 : at + 12], "big"), int.from_bytes(head[at + 4 : at + 8], "big")
        return None
    if head.startswith(_J2K_SIGNATURE) and len(head) >= 16:
        return int.from_bytes(head[8:12], "big"), int.from_bytes(head[12:16], "big")
    if bitmaps and len(head) >= 12 and int.from_bytes(head[0:4], "little") in (12, 40, 52, 56, 108, 124):
        if int.from_bytes(head[0:4], "little") == 12:  # BITMAPCOREHEADER: 16-bit sides
            return int.from_bytes(head[4:6], "little"), int.from_bytes(head[6:8], "little") // 2
        width = abs(int.from_bytes(head[4:8], "little", signed=True))
        height = abs(int.from_bytes(head[8:12], "little", signed=True)) // 2
        return width, height
    return None


def _read_at(stream, offset: int, count: int) -> bytes:
    stream.seek(offset)
    return stream.read(count)


def container_sizes(stream) -> list[tuple[int, int]] | None:
    """For an ICO, CUR or ICNS file: the (width, height) of every image inside it, as its
    directory and the embedded images' own headers say, read BEFORE Pillow opens the file
    (Pillow's ICO plugin decodes the first entry while opening: a 16x16 entry in the directory
    holding a 20000x20000 PNG decoded to 400 MB before any check could run). Only headers are
    read, never pixels. None for any other kind of file. The stream is left at its start."""
    try:
        magic = _read_at(stream, 0, 8)
        if magic[:4] in _ICO_MAGICS:
            count = int.from_bytes(magic[4:6], "little")
            directory = _read_at(stream, 6, 16 * min(count, _MAX_CONTAINER_ENTRIES))
            sizes = []
            for start in range(0, len(directory) - 15, 16):
                entry = directory[start : start + 16]
                sizes.append((entry[0] or 256, entry[1] or 256))
                embedded = _embedded_header_size(_read_at(stream, int.from_bytes(entry[12:16], "little"), 64))
                if embedded:
                    sizes.append(embedded)
            return sizes
        if magic[:4] == b"icns":
            sizes, offset, end = [], 8, int.from_bytes(magic[4:8], "big")
            for _ in range(_MAX_CONTAINER_ENTRIES):
                block = _read_at(stream, offset, 8 + 256)
                if len(block) < 8 or offset >= end:
                    break
                embedded = _embedded_header_size(block[8:], bitmaps=False)
                if embedded:
                    sizes.append(embedded)
                length = int.from_bytes(block[4:8], "big")
                if length < 8:
                    break
                offset += length
            return sizes
        return None
    finally:
        stream.seek(0)


def _embedded_png_sizes(stream) -> list[tuple[int, int]]:
    """(width, height) of every PNG inside a container file, read from their headers (IHDR)."""
    stream.seek(0)
    data = stream.read()
    sizes, start = [], data.find(_PNG_SIGNATURE)
    while start >= 0:
        header = data[start + 8 : start + 24]
        if len(header) == 16 and header[4:8] == b"IHDR":
            sizes.append((int.from_bytes(header[8:12], "big"), int.from_bytes(header[12:16], "big")))
        start = data.find(_PNG_SIGNATURE, start + 8)
    return sizes


def _not_identified(name: str) -> InputError:
    if str(name).lower().endswith(_HEIF_SUFFIXES):
        return InputError(f"{name}: HEIC/HEIF/AVIF images need the optional pillow-heif package (pip install pillow-heif)")
    return InputError(f"{name}: not an image, or a format Pillow cannot read")


def _decode(stream, name: str, max_pixels: int | None, draft_size: tuple[int, int] | None = None):
    """Open, check the size that will really be decoded against the pixel cap, then decode."""
    Image = _pil()
    try:
        with stream:
            for width, height in container_sizes(stream) or ():
                if max_pixels and width * height > max_pixels:
                    raise _too_many_pixels(name, width, height, max_pixels)
            try:
                image = Image.open(stream)
            except Image.UnidentifiedImageError:
                raise _not_identified(name) from None
            sizes = [image.size]
            if image.format in _CONTAINERS:
                sizes += _embedded_png_sizes(stream)
            for width, height in sizes:
                problem = _too_many_pixels(name, width, height, max_pixels)
                if problem:
                    raise problem
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # animated or multi-page: the first frame, documented
            if draft_size and image.format == "JPEG":
                _draft(image, draft_size)
            image.load()
            problem = _too_many_pixels(name, *image.size, max_pixels)
            if problem:  # a decoder that still grew past its header's promise
                raise problem
            return image
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow says "image file is truncated", "broken data stream", ... for damaged files.
        raise InputError(f"{name}: corrupt or truncated image ({exc})") from None
    except MemoryError:
        raise InputError(f"{name}: too large to decode in memory") from None


def _draft(image, size: tuple[int, int]) -> None:
    """Ask libjpeg for the largest reduction (1/2, 1/4, 1/8) that keeps the picture at least
    `size` (Pillow never goes below it, so a small JPEG decodes exactly as before). `size` is of
    the upright picture: for one stored sideways it is swapped, since EXIF turns it afterwards."""
    try:
        sideways = image.getexif().get(_ORIENTATION) in _SIDEWAYS
    except Exception:  # a malformed EXIF block: the orientation step ignores it too
        sideways = False
    image.draft(None, size[::-1] if sideways else size)


def _from_array(array: np.ndarray, name: str):
    Image = _pil()
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise InputError(f"{name}: arrays must be uint8 with shape (H, W), (H, W, 3) or (H, W, 4); got {array.dtype} {array.shape}")
    if 0 in array.shape[:2]:
        raise InputError(f"{name}: the array is {array.shape[1]}x{array.shape[0]} pixels: nothing to look at")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(array))


def _exif_upright(image, name: str):
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(image) or image
    except Exception:  # a malformed EXIF block should not lose the picture
        return image


def to_rgb(image, name: str = "image"):
    """The reference's `convert_to_rgb`: transparency goes onto a white background."""
    Image = _pil()
    try:
        if image.mode == "RGB":
            return image
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise InputError(f"{name}: cannot convert {image.mode} pixels to RGB ({exc})") from None


def resize_to_model(image, preprocess: PreprocessConfig) -> np.ndarray:
    """RGB PIL image -> (H, W, 3) uint8 at the model's input size."""
    if preprocess.do_resize and image.size != (preprocess.width, preprocess.height):
        image = image.resize((preprocess.width, preprocess.height), resample=preprocess.resample)
    return np.asarray(image, dtype=np.uint8)


def load_pixels(source: Any, name: str, preprocess: PreprocessConfig, options: DecodeOptions = DecodeOptions()) -> np.ndarray:
    """Everything that happens on the CPU for one image: decode, orient, RGB, resize."""
    draft_size = (DRAFT_GAP * preprocess.width, DRAFT_GAP * preprocess.height) if options.draft_jpeg and preprocess.do_resize else None
    image = to_rgb(open_image(source, name, options, draft_size), name)
    pixels = resize_to_model(image, preprocess)
    if pixels.shape != (preprocess.height, preprocess.width, 3):
        raise InputError(f"{name}: image is {pixels.shape[1]}x{pixels.shape[0]}, the model needs {preprocess.width}x{preprocess.height}")
    return pixels


@dataclass(frozen=True)
class Patches:
    """One image for a NaFlex model: uint8 patches (rows * columns, patch * patch * 3), row-major,
    and the grid they came from."""

    values: np.ndarray
    grid: tuple[int, int]  # (rows, columns) of patches


def naflex_size(height: int, width: int, patch_size: int, max_patches: int) -> tuple[int, int]:
    """(height, width) in pixels for an image to be cut into at most `max_patches` patches: the
    largest scale of the image whose sides, rounded up to whole patches (at least one), fit.
    The same bisection over the scale as the reference (`get_image_size_for_max_num_patches`),
    so that its floating-point rounding, and therefore every size, is the same."""

    def side(size: int, scale: float) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    eps = 1e-5
    low, high = eps / 10, 100.0
    while high - low >= eps:
        scale = (low + high) / 2
        if (side(height, scale) / patch_size) * (side(width, scale) / patch_size) <= max_patches:
            low = scale
        else:
            high = scale
    return side(height, low), side(width, low)


def patchify(pixels: np.ndarray, patch_size: int) -> np.ndarray:
    """(H, W, 3) uint8 with sides multiples of `patch_size` -> (rows * columns, patch * patch * 3),
    patches row by row, each flattened in (row, column, channel) order as the linear patch
    embedding expects."""
    height, width, channels = pixels.shape
    rows, columns = height // patch_size, width // patch_size
    grid = pixels.reshape(rows, patch_size, columns, patch_size, channels).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(grid.reshape(rows * columns, patch_size * patch_size * channels))


def load_patches(
    source: Any, name: str, preprocess: PreprocessConfig, patch_size: int, options: DecodeOptions = DecodeOptions()
) -> Patches:
    """Everything that happens on the CPU for one image of a NaFlex model: decode, orient, RGB,
    aspect-preserving resize to the patch budget, patches."""
    image = to_rgb(open_image(source, name, options), name)
    height, width = naflex_size(image.height, image.width, patch_size, preprocess.max_num_patches)
    if image.size != (width, height):
        image = image.resize((width, height), resample=preprocess.resample)
    values = patchify(np.asarray(image, dtype=np.uint8), patch_size)
    return Patches(values, (height // patch_size, width // patch_size))


def normalization_table(preprocess: PreprocessConfig) -> np.ndarray:
    """(3, 256) float32: the value each uint8 level of each channel becomes, computed with the
    reference's exact casts (rescale in float64 then float32; normalise in float32)."""
    levels = np.arange(256, dtype=np.float64)
    if preprocess.do_rescale:
        levels = levels * preprocess.rescale_factor
    levels = levels.astype(np.float32)
    table = np.stack([levels] * 3)
    if preprocess.do_normalize:
        mean = np.array(preprocess.image_mean, dtype=np.float32)[:, None]
        std = np.array(preprocess.image_std, dtype=np.float32)[:, None]
        table = (table - mean) / std
    return table.astype(np.float32)


def normalize_channels_last(values, table):
    """uint8 torch tensor whose last axis cycles through R, G, B (pixels (..., 3), or NaFlex
    patches (..., p * p * 3)) + (3, 256) table on the same device -> float, same shape."""
    import torch

    shape = values.shape
    rgb = values.reshape(*shape[:-1], shape[-1] // 3, 3)
    channel_offset = torch.arange(3, device=values.device) * 256
    return table.reshape(-1)[rgb.long() + channel_offset].reshape(shape)


def pixels_to_model_input(batch, table):
    """uint8 (N, H, W, 3) torch tensor + (3, 256) table on the same device -> float (N, 3, H, W)."""
    return normalize_channels_last(batch, table).permute(0, 3, 1, 2)  # a channels-last view; the patch conv takes it as is
