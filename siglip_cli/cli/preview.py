"""`search --preview`: the hits with thumbnails, in terminals that draw images.

Drawing is textual-image's work (an optional dependency: `pip install 'siglip-cli[preview]'`):
importing its renderable module asks the terminal, through escape sequences, whether it speaks
kitty's graphics protocol or sixel (kitty, WezTerm, iTerm2, foot, Konsole, Windows Terminal,
xterm -ti vt340...). Anywhere else -- no such terminal, output piped, another format, or
textual-image missing -- the usual output is printed, after one line on stderr saying why.
"""

from __future__ import annotations

import sys
from typing import Callable

from ..results import SearchResult
from . import render

THUMBNAIL_CELLS = 24  # thumbnail width in terminal cells; the height follows the picture


def drawing_renderer() -> tuple[type | None, str]:
    """textual-image's renderable for this terminal, or None and why there is none."""
    if not (sys.stdout.isatty() and sys.stdin.isatty()):
        return None, "stdout and stdin must be a terminal"
    try:
        from textual_image import renderable
    except ImportError:
        return None, "it needs textual-image: pip install 'siglip-cli[preview]'"
    if renderable.Image in (renderable.TGPImage, renderable.SixelImage):
        return renderable.Image, ""
    return None, "this terminal draws no images (it answered neither kitty graphics nor sixel queries)"


def thumbnail(path: str, renderer: type, time: float = -1.0):
    """The picture at `path` (a video's frame at `time`, for a hit `clip.mp4#t=12.5`), upright
    and small, as a renderable; None when it cannot be read (moved since it was embedded) or is
    not a local file."""
    from ..core.errors import InputError
    from ..core.images import DecodeOptions, open_image, to_rgb

    if time >= 0:
        from ..core.video import read_frame

        picture = read_frame(path.rpartition("#t=")[0], time)
        if picture is None:
            return None
        picture.thumbnail((512, 512))
        return renderer(picture, width=THUMBNAIL_CELLS)
    try:
        picture = to_rgb(open_image(path, path, DecodeOptions(draft_jpeg=True), draft_size=(512, 512)), path)
    except InputError:
        return None
    picture.thumbnail((512, 512))
    return renderer(picture, width=THUMBNAIL_CELLS)


def emit_with_thumbnails(results: list[SearchResult], fmt: str, note: Callable[[str], None]) -> None:
    if fmt != "table":
        note(f"--preview draws only in the table format; printing {fmt}")
        render.emit(results, fmt, render.SEARCH_VIEW)
        return
    renderer, why = drawing_renderer()
    if renderer is None:
        note(f"--preview: {why}; showing the table")
        render.emit(results, fmt, render.SEARCH_VIEW)
        return
    from rich.text import Text

    # One hit after another, not a table: sixel images move the cursor, which table cells
    # cannot hold.
    console = render.stdout_console()
    for result in results:
        if result.error is not None:
            continue  # already reported on stderr
        console.print(render.search_title(result, console.width))
        for hit in result.hits:
            score = render.format_score(hit.score) if hit.score is not None else f"cosine {hit.cosine:.3f}"
            console.print(Text(f"{hit.rank:>3}  {score:>8}  {render.hit_name(hit)}"))
            picture = thumbnail(hit.path, renderer, hit.time) if hit.kind == "image" and "://" not in hit.path else None
            if picture is not None:
                console.print(picture)
