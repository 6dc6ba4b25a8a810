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
               preset: str = "ultrafast", scene: int = 0, intro: float = 0.0, bit_rate: int | None = None) -> Path:
    """A video of `seconds` at `fps` (or frames at the given `times`, a variable rate), a
    keyframe every `gop` frames; with `cut_at`, another scene from that time on. `scene` picks
    the pictures (another number, another video); `intro` seconds of plain black come first
    (the intro many videos share); `bit_rate` sets the encoder's target (codecs other than x264)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": preset}  # ultrafast: no B-frames; medium: 3
        if bit_rate is not None:
            stream.codec_context.bit_rate = bit_rate
        if rotation is not None:
            stream.set_display_rotation(rotation)
        if times is not None:
            from fractions import Fraction

            stream.codec_context.time_base = Fraction(1, 1000)
        stamps = times if times is not None else [n / fps for n in range(round(seconds * fps))]
        for number, seconds_at in enumerate(stamps):
            cut = 1 if cut_at is not None and seconds_at >= cut_at - 1e-9 else 0
            if seconds_at < intro - 1e-9:
                picture = np.zeros((size[1], size[0], 3), np.uint8)
            else:
                picture = frame_picture(number, size, scene + cut)
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
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


def reencode(source: Path, path: Path, codec: str = "mpeg4", size=None, bit_rate: int = 100_000, fps: int = 10) -> Path:
    """`source` decoded and encoded again, as a phone's share sheet or a converter does: another
    codec and bit rate, with `size` another frame size too (the same frames, times and rate)."""
    import av

    with av.open(str(source)) as reader, av.open(str(path), "w") as writer:
        stream = writer.add_stream(codec, rate=fps)
        width, height = size or (reader.streams.video[0].width, reader.streams.video[0].height)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.bit_rate = bit_rate
        for frame in reader.decode(video=0):
            picture = av.VideoFrame.from_ndarray(frame.to_ndarray(width=width, height=height, format="rgb24",
                                                                   interpolation="AREA"), format="rgb24")
            for packet in stream.encode(picture):
                writer.mux(packet)
        for packet in stream.encode():
            writer.mux(packet)
    return path
