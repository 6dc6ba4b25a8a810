"""Videos in, upright RGB frames with their times out, through PyAV (FFmpeg).

A video is one more kind of image source: `sample_frames` yields the frames a sampling asks
for, each with its presentation time in seconds from the start of the video stream, and the
pipeline treats every frame as it treats an image. A frame is named with the Media Fragments
URI time syntax, `clip.mp4#t=12.5` (`frame_name`), so names stay unique and a player can jump
to the frame.

Sampling:
- `every` seconds (the default, 2 s): the frames shown at 0, every, 2*every, ... Decoding
  seeks: for each sample time it jumps to the keyframe at or before it when that keyframe lies
  ahead of where decoding stands (the container's index says where keyframes are), and decodes
  forward from there; frames between samples that no keyframe separates are decoded (a frame
  needs its predecessors), all others are never read. With a keyframe every second, as phones
  record, `--every 2` decodes about one frame per sample.
- `scenes`: one frame per shot. Every frame is decoded (a cut can be anywhere) and shrunk by
  FFmpeg to a 64x36 grey thumbnail; a new shot starts where the mean absolute difference of two
  consecutive thumbnails exceeds `scene_threshold` (of the full 0-255 range), at least
  `min_gap` seconds after the previous one. The first frame always starts a shot.
- `max_frames`: at most this many frames per video. With `every`, a video that would give
  more is sampled at `max_frames` evenly spaced times instead (the whole video stays covered);
  with `scenes`, the first `max_frames` shots are kept.

Rotation: phones store a portrait video as landscape frames plus a display matrix; every frame
is turned upright by it, as EXIF orientation is applied to photos.

Faults: a video that cannot be opened, has no video stream, or no frames, is a still image in a
video's clothes, or has frames over the pixel cap, raises InputError before any frame. A fault
in the middle (a truncated file, a damaged packet) ends the sampling: the frames yielded
before it stand, and an InputError names the time where decoding stopped.
"""

from __future__ import annotations

import bisect
import io
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator

from .errors import InputError  # (no numpy or PyAV at import: the renderer uses the names and time codes)

VIDEO_SUFFIXES = frozenset(".mp4 .mov .m4v .mkv .webm .avi".split())
DEFAULT_EVERY = 2.0
DEFAULT_MIN_GAP = 1.0
DEFAULT_SCENE_THRESHOLD = 0.1
VIDEO_EXTRA = "video inputs need PyAV: pip install 'siglip-cli[video]'"
_THUMB = (64, 36)
# Seconds before a sample time from which every frame is decoded again (at least two frames,
# so that no frame within the half-frame tolerance of the time is ever skipped). Measured on
# 10 s 1080p H.264 clips (x264 veryfast, 3 B-frames), CPU s, 3 rounds each, loaded machine:
# keyframe every 10 s, --every 2: 1.13-1.26 with skipping, 1.58-1.63 without; --every 0.5:
# 1.46-1.52 against 1.88-1.96; keyframe every 1 s, --every 0.5: 1.40 against 1.70.
_SKIP_MARGIN = 0.1
# ISO base media files whose major brand says "still image" (HEIC, AVIF): Pillow's, not ours.
_IMAGE_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis", b"hevc", b"hevx"}
_STILL_FORMATS = ("image2", "_pipe", "gif", "apng", "webp")


@dataclass(frozen=True)
class VideoSampling:
    """Which frames of a video become inputs."""

    every: float = DEFAULT_EVERY
    scenes: bool = False
    max_frames: int | None = None
    min_gap: float = DEFAULT_MIN_GAP
    scene_threshold: float = DEFAULT_SCENE_THRESHOLD

    def describe(self) -> dict:
        """What the rows of a store depend on (recorded in its meta; --update compares it)."""
        if self.scenes:
            return {"scenes": True, "min_gap": self.min_gap, "scene_threshold": self.scene_threshold, "max_frames": self.max_frames}
        return {"every": self.every, "max_frames": self.max_frames}


@dataclass
class Frame:
    time: float  # seconds from the start of the video stream
    image: Any  # PIL image, RGB, upright


# ============================================================================ names
def is_video_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in VIDEO_SUFFIXES


def format_seconds(seconds: float) -> str:
    """12.5 -> "12.5", 2.0 -> "2", 0.0333 -> "0.033": milliseconds at most, no trailing zeros."""
    text = f"{seconds:.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def frame_name(video: str, seconds: float) -> str:
    return f"{video}#t={format_seconds(seconds)}"


def split_frame_name(name: str) -> tuple[str, float] | None:
    """`clip.mp4#t=12.5` -> ("clip.mp4", 12.5); None for a name without a time fragment."""
    video, mark, seconds = name.rpartition("#t=")
    if not mark:
        return None
    try:
        value = float(seconds)
    except ValueError:
        return None
    return (video, value) if math.isfinite(value) and value >= 0 else None


def time_code(seconds: float) -> str:
    """12.5 -> "00:00:12.5"; 3725 -> "01:02:05"."""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    fraction = format_seconds(seconds - whole)
    tail = fraction[1:] if fraction != "0" else ""  # "0.5" -> ".5"
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{tail}"


def looks_like_video(path: str | bytes) -> bool:
    """Whether the file's first bytes (or, for an upload held in memory, the bytes') say
    "video container" (MP4/MOV, Matroska/WebM, AVI), whatever its suffix says."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        head = bytes(path[:16])
    else:
        from .images import _open_file  # non-blocking: a FIFO or device is never waited on

        try:
            with _open_file(path, path) as fh:
                head = fh.read(16)
        except (OSError, InputError):
            return False
    if len(head) < 12:
        return False
    if head[4:8] == b"ftyp":
        return head[8:12] not in _IMAGE_BRANDS
    if head[4:8] in (b"moov", b"mdat", b"wide", b"free", b"skip"):
        return True
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska, WebM
        return True
    return head[:4] == b"RIFF" and head[8:12] == b"AVI "


# ============================================================================ decoding
def _av():
    try:
        import av  # type: ignore[import-not-found]
    except ImportError:
        return None
    return av


def _problem(av, exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    if av is not None and isinstance(exc, av.FFmpegError):
        text = getattr(exc, "strerror", None) or text
    return text


def frame_size(path: str) -> tuple[int, int] | None:
    """(width, height) of a video's frames, from its stream header (nothing decoded); None
    when PyAV is missing or the file holds no readable video stream. For `dedupe --keep
    largest`, as an image's header size is."""
    av = _av()
    if av is None:
        return None
    from .images import _open_file

    try:
        _open_file(path, path).close()  # a FIFO or device is refused, never waited on
        with av.open(path, metadata_errors="ignore") as container:
            if not container.streams.video:
                return None
            context = container.streams.video[0].codec_context
            return (int(context.width), int(context.height)) if context.width and context.height else None
    except (InputError, OSError, av.FFmpegError):
        return None


def _upright(image, rotation: int):
    """Turn a frame by its display matrix: `rotation` is counter-clockwise degrees (PyAV's
    `VideoFrame.rotation`), as FFmpeg's own player applies it."""
    from PIL import Image

    turn = round(rotation / 90) % 4
    if turn == 1:
        return image.transpose(Image.Transpose.ROTATE_90)
    if turn == 2:
        return image.transpose(Image.Transpose.ROTATE_180)
    if turn == 3:
        return image.transpose(Image.Transpose.ROTATE_270)
    return image


class _Video:
    """One open video stream: frames in presentation order, with seeking to keyframes."""

    def __init__(self, av, path: str | bytes, name: str, max_pixels: int | None):
        from .images import _open_file

        self.av, self.name = av, name
        if isinstance(path, (bytes, bytearray, memoryview)):
            path = io.BytesIO(path)  # an upload held in memory (siglip serve): FFmpeg seeks in it as in a file
        else:
            _open_file(path, name).close()  # refuses a FIFO, device or folder instead of blocking in FFmpeg
        try:
            self.container = av.open(path, metadata_errors="ignore")
        except av.FFmpegError as exc:
            raise InputError(f"{name}: not a readable video ({_problem(av, exc)})") from None
        except OSError as exc:
            raise InputError(f"{name}: cannot read ({exc.strerror or exc})") from None
        try:
            self._check(max_pixels)
        except BaseException:
            self.container.close()
            raise

    def _check(self, max_pixels: int | None) -> None:
        name = self.name
        format_name = self.container.format.name
        if any(part in format_name for part in _STILL_FORMATS):
            raise InputError(f"{name}: is a still image ({format_name}), not a video; give it an image suffix")
        if not self.container.streams.video:
            kinds = sorted({s.type for s in self.container.streams})
            held = f"only {' and '.join(kinds)}" if kinds else "no streams"
            raise InputError(f"{name}: holds no video stream ({held})")
        self.stream = self.container.streams.video[0]
        context = self.stream.codec_context
        if context is None or context.codec is None:
            raise InputError(f"{name}: its video codec cannot be decoded here (unsupported codec)")
        from .images import _too_many_pixels  # the same cap and message as for photos

        refused = _too_many_pixels(name, context.width, context.height, max_pixels)
        if refused is not None:
            raise refused
        self.time_base = self.stream.time_base
        self.start = self.stream.start_time or 0
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.frame_duration = float(1 / rate) if rate else 0.0
        self.duration = self._duration()
        self.keyframes, self.lead = self._keyframes()
        self.position = -math.inf  # the time of the last frame decoded
        self._frames: Iterator | None = None
        self._last = None  # the frame frame_at returned last
        self._drained = False  # frame_at drained the decoder for a lone keyframe: seek before decoding on
        self.target: float | None = None  # the sample time being decoded towards (None: every frame)

    def _duration(self) -> float | None:
        if self.stream.duration and self.time_base:
            return float(self.stream.duration * self.time_base)
        if self.container.duration:
            return self.container.duration / 1e6
        return None

    def _keyframes(self) -> tuple[list[float], int]:
        """Keyframe times (seconds, ascending) from the container's index, and how far a
        keyframe's decode timestamp (what the index holds) runs ahead of its presentation time."""
        try:
            entries = [(e.timestamp, e.is_keyframe) for e in self.stream.index_entries]
        except Exception:  # no index (a stream without cues): seek by distance instead
            return [], 0
        if not entries:
            return [], 0
        lead = max(0, self.start - entries[0][0])
        times = sorted(float((ts + lead - self.start) * self.time_base) for ts, key in entries if key)
        return times, lead

    def seconds(self, frame) -> float:
        if frame.pts is None:
            return max(self.position, 0.0)
        return float((frame.pts - self.start) * self.time_base)

    def close(self) -> None:
        self.container.close()

    # ------------------------------------------------------------------ frames in order
    def frames(self, skip: str | None = None) -> Iterator:
        """Decoded frames from where the stream stands. While `self.target` (seconds) is more
        than `_SKIP_MARGIN` ahead, frames no other frame refers to are not decoded at all: none
        of them can be the frame shown at the target, and nothing later needs them."""
        context = self.stream.codec_context
        if skip:
            context.skip_frame = skip
        mode = context.skip_frame
        margin = max(_SKIP_MARGIN, 2 * self.frame_duration)
        for packet in self.container.demux(self.stream):
            if not skip:
                far = packet.pts is not None and self.target is not None and (
                    float((packet.pts - self.start) * self.time_base) < self.target - margin)
                wanted = "NONREF" if far else "DEFAULT"
                if wanted != mode:
                    context.skip_frame = mode = wanted
            for frame in packet.decode():
                self.position = self.seconds(frame)
                yield frame

    def _seek(self, seconds: float) -> None:
        """To the keyframe at or before `seconds`. FFmpeg's MP4 and Matroska readers seek by
        presentation time (measured: asking for a keyframe's decode time lands a keyframe
        earlier); a reader that lands after the time is caught by `frame_at`."""
        target = round(seconds / self.time_base) + self.start
        self.container.seek(max(target, 0) if self.start >= 0 else target, stream=self.stream, backward=True, any_frame=False)
        self._frames = None
        self.position = -math.inf

    def _should_seek(self, seconds: float) -> bool:
        if self.keyframes:
            at = bisect.bisect_right(self.keyframes, seconds + 1e-6) - 1
            return at >= 0 and self.keyframes[at] > self.position + 1e-6
        return seconds - self.position > 1.0  # no index: jump when more than a second ahead

    def frame_at(self, seconds: float):
        """The first frame shown at or after `seconds` (within half a frame), or None past the end."""
        tolerance = max(self.frame_duration / 2, 1e-3)
        if self._last is not None and self.seconds(self._last) >= seconds - tolerance and self.position == self.seconds(self._last):
            return self._last  # a variable-rate gap: the frame that overshot the last time is this one
        if self._drained:  # the decoder was drained (_keyframe_alone): it decodes again only after a seek
            self._drained = False
            self._seek(seconds)
        elif self.position > -math.inf and self.position >= seconds - self.frame_duration / 2:
            # a frame already decoded ahead of this time: decoding cannot go back without a seek
            self._seek(seconds)
        elif self._should_seek(seconds):
            self._seek(seconds)
        self.target = seconds
        sought = self._frames is None
        if sought:
            if self._on_keyframe(seconds, tolerance):
                frame = self._keyframe_alone(seconds, tolerance)
                if frame is not None:
                    return frame
                self._seek(seconds)  # not the packet expected: the ordinary way below, from the keyframe again
            self._frames = self.frames()
        while (frame := next(self._frames, None)) is not None:
            if sought and seconds > 0 and self.seconds(frame) > seconds + tolerance:
                # the seek landed past the time: go back a second further, once
                self._seek(max(0.0, seconds - 1.0))
                self._frames, sought = self.frames(), False
                continue
            sought = False
            if self.seconds(frame) >= seconds - tolerance:
                self._last = frame
                return frame
        return None


    def _on_keyframe(self, seconds: float, tolerance: float) -> bool:
        """Whether a keyframe is shown at `seconds` (phone videos put one every second; `--every
        2` samples land on them)."""
        if not self.keyframes:
            return False
        at = bisect.bisect_left(self.keyframes, seconds - tolerance)
        return at < len(self.keyframes) and abs(self.keyframes[at] - seconds) <= tolerance

    def _keyframe_alone(self, seconds: float, tolerance: float):
        """Right after a seek to a keyframe shown at `seconds`: decode that one packet and drain
        the decoder, instead of feeding it the packets after it until it lets the frame out (with
        B-frames it holds a frame back for two or three more packets, each decoded for nothing:
        `--every 2` on 1080p with 1 s keyframes 1.31 -> 0.79 s, benchmarks/video_speed.py). The drained decoder is reset by the next seek,
        which the next call makes. None (nothing decoded) when the first packet is not that
        keyframe."""
        for packet in self.container.demux(self.stream):
            if packet.pts is None or not packet.is_keyframe:
                return None
            if abs(float((packet.pts - self.start) * self.time_base) - seconds) > tolerance:
                return None
            context = self.stream.codec_context
            context.skip_frame = "DEFAULT"
            shown = [frame for frame in [*context.decode(packet), *context.decode(None)]
                     if self.seconds(frame) >= seconds - tolerance]
            if not shown:
                return None
            frame = shown[0]
            self.position = self.seconds(frame)
            self._last = frame
            self._frames = None  # drained: whatever comes next starts with a seek
            self._drained = True
            return frame
        return None


def _image(frame, draft_size: tuple[int, int] | None):
    """A decoded frame as an upright RGB PIL image; with `draft_size` (width, height of the
    upright picture) FFmpeg shrinks it while converting, never below that size."""
    rotation = getattr(frame, "rotation", 0) or 0
    if draft_size:
        width, height = draft_size[::-1] if round(rotation / 90) % 2 else draft_size
        scale = max(width / frame.width, height / frame.height)
        if scale < 1:
            size = (max(1, round(frame.width * scale)), max(1, round(frame.height * scale)))
            return _upright(frame.to_image(width=size[0], height=size[1], interpolation="AREA"), rotation)
    return _upright(frame.to_image(), rotation)


def sample_times(duration: float, sampling: VideoSampling) -> list[float]:
    """The sample times of a video of `duration` seconds under `every` and `max_frames`."""
    count = max(1, math.ceil(duration / sampling.every - 1e-9)) if duration > 0 else 1
    if sampling.max_frames and count > sampling.max_frames:
        step = duration / sampling.max_frames
        return [round(k * step, 6) for k in range(sampling.max_frames)]
    return [round(k * sampling.every, 6) for k in range(count)]


def sample_frames(
    path: str | bytes,
    name: str,
    sampling: VideoSampling = VideoSampling(),
    max_pixels: int | None = None,
    draft_size: tuple[int, int] | None = None,
) -> Iterator[Frame]:
    """The frames `sampling` picks from the video at `path` (or in `path`'s bytes, an upload),
    in time order. Raises InputError naming `name`: before the first frame when the video
    cannot be used at all, after the frames decoded so far when decoding fails part way."""
    av = _av()
    if av is None:
        raise InputError(f"{name}: {VIDEO_EXTRA}")
    video = _Video(av, path, name, max_pixels)
    count = 0
    try:
        frames = _scene_frames(video, sampling) if sampling.scenes else _interval_frames(video, sampling)
        for seconds, frame in frames:
            yield Frame(seconds, _image(frame, draft_size))
            count += 1
    except InputError:
        raise
    except (av.FFmpegError, OSError, ValueError, MemoryError) as exc:
        where = f"at {format_seconds(max(video.position, 0))} s" if video.position > -math.inf else "at its start"
        kept = f"; the {count} frame{'s' if count != 1 else ''} before are kept" if count else ""
        raise InputError(f"{name}: decoding failed {where} ({_problem(av, exc)}){kept}") from None
    finally:
        video.close()
    if count == 0:
        raise InputError(f"{name}: holds no decodable frames (empty or truncated video)")
    if video.duration and video.last_time < video.duration - max(1.0, 2 * video.frame_duration) and video.ran_out:
        # frames ran out long before the length the header promises: cut short
        raise InputError(
            f"{name}: ends at {format_seconds(video.last_time)} s, its header says {format_seconds(video.duration)} s "
            f"(truncated?); the {count} frame{'s' if count != 1 else ''} before are kept"
        )


def _interval_frames(video: _Video, sampling: VideoSampling) -> Iterator[tuple[float, Any]]:
    video.last_time, video.ran_out = 0.0, False
    if video.duration is None:
        yield from _interval_frames_unknown_length(video, sampling)
        return
    given = -1.0
    for target in sample_times(video.duration, sampling):
        frame = video.frame_at(target)
        if frame is None:
            video.ran_out = True
            return
        seconds = video.seconds(frame)
        video.last_time = max(video.last_time, seconds)
        if seconds == given:
            continue  # a variable-rate gap longer than the interval: the frame is given once
        given = seconds
        yield seconds, frame


def _interval_frames_unknown_length(video: _Video, sampling: VideoSampling) -> Iterator[tuple[float, Any]]:
    """No duration in the header (a live recording, some WebM): read through, picking frames."""
    target, count = 0.0, 0
    for frame in video.frames():
        seconds = video.seconds(frame)
        video.last_time = seconds
        if seconds >= target - max(video.frame_duration / 2, 1e-3):
            yield seconds, frame
            count += 1
            if sampling.max_frames and count >= sampling.max_frames:
                return
            target = (math.floor(seconds / sampling.every + 1e-6) + 1) * sampling.every


def _scene_frames(video: _Video, sampling: VideoSampling) -> Iterator[tuple[float, Any]]:
    import numpy as np

    previous, last_cut, count = None, -math.inf, 0
    video.last_time, video.ran_out = 0.0, False
    for frame in video.frames():
        seconds = video.seconds(frame)
        video.last_time = seconds
        thumb = frame.to_ndarray(width=_THUMB[0], height=_THUMB[1], format="gray").astype(np.int16)
        cut = previous is None or (
            seconds - last_cut >= sampling.min_gap
            and float(np.abs(thumb - previous).mean()) / 255.0 > sampling.scene_threshold
        )
        previous = thumb
        if cut:
            last_cut = seconds
            yield seconds, frame
            count += 1
            if sampling.max_frames and count >= sampling.max_frames:
                return
    video.ran_out = True  # read to the end (not stopped by max_frames)


def read_frame(path: str, seconds: float, max_pixels: int | None = None):
    """The upright frame of the video at `path` shown at `seconds` (as named by `frame_name`),
    for a preview; None when it cannot be read."""
    av = _av()
    if av is None:
        return None
    try:
        video = _Video(av, path, path, max_pixels)
    except InputError:
        return None
    try:
        frame = video.frame_at(seconds)
        return None if frame is None else _image(frame, None)
    except (av.FFmpegError, OSError, ValueError, MemoryError):
        return None
    finally:
        video.close()
