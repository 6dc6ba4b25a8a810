"""Videos made here with PyAV (whose wheels carry FFmpeg): several codecs and containers, a
rotated one, one with a scene cut at a known time, damaged ones. Each frame's picture depends
on its number, so a frame decoded at a time can be told from its neighbours."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .conftest import random_image

SIZE = (64, 48)  # width, height


def frame_picture(number: int, size=SIZE, scene: int = 0) -> np.ndarray:
    """Frame `number`: a scene's smooth random picture with a bright bar whose column moves by
    two pixels a frame (so neighbouring frames differ, a little)."""
    width, height = size
    picture = np.asarray(random_image(1000 + scene, size)).copy()
    column = (2 * number) % (width - 4)
    picture[:, column : column + 4] = 255
    return picture


def make_video(path: Path, codec: str = "libx264", fps: int = 10, seconds: float = 10.0, gop: int = 10, size=SIZE,
               rotation: int | None = None, cut_at: float | None = None, times: list[float] | None = None,
               preset: str = "ultrafast") -> Path:
    """A video of `seconds` at `fps` (or frames at the given `times`, a variable rate), a
    keyframe every `gop` frames; with `cut_at`, another scene from that time on."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": preset}  # ultrafast: no B-frames; medium: 3
        if rotation is not None:
            stream.set_display_rotation(rotation)
        if times is not None:
            from fractions import Fraction

            stream.codec_context.time_base = Fraction(1, 1000)
        stamps = times if times is not None else [n / fps for n in range(round(seconds * fps))]
        for number, seconds_at in enumerate(stamps):
            scene = 1 if cut_at is not None and seconds_at >= cut_at - 1e-9 else 0
            frame = av.VideoFrame.from_ndarray(frame_picture(number, size, scene), format="rgb24")
            if times is not None:
                frame.pts = round(seconds_at * 1000)
                from fractions import Fraction

                frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decoded_frames(path: Path, kinds: bool = False) -> list:
    """Every frame of the video, decoded in order from the start (no seeking): (time, RGB), or
    with `kinds` the picture types ("I", "P", "B")."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        start = stream.start_time or 0
        if kinds:
            return [" IPB"[int(f.pict_type)] if int(f.pict_type) < 4 else "?" for f in container.decode(stream)]
        return [(float((f.pts - start) * stream.time_base), f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
