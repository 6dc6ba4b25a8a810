"""How fast video frames are sampled, against decoding every frame, and the whole run with the
model. One command:

    python benchmarks/video_speed.py                 # 1080p H.264, 30 fps, 60 s: keyframe every 1 s and every 10 s
    python benchmarks/video_speed.py --seconds 20    # shorter videos, quicker

Generates the videos once (PyAV's libx264, `--folder`, reused when present): moving content
with a scene change every 10 s. For each video and mode it prints the frames sampled, the CPU
seconds the process spent (all threads: FFmpeg's included), frames per CPU second, and the
real-time factor (video seconds per CPU second). Modes: `all` decodes every frame (no colour
conversion: the floor of any sequential reader), `--every 2`, `--every 0.5` and `--scenes` as
siglip samples them (seek, decode, upright RGB). Then the whole default run on the 1 s-keyframe
video: `--every 2` through the model (the full-size base-224 architecture with random weights,
built by transformers, default dtype), frames embedded per wall second and real-time factor.
The CPU (model and SIMD flags) and the load (`uptime`) are printed with the figures.

Needs the video extra (pip install -e '.[video]').
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import build_checkpoint, load_average, machine  # noqa: E402

WIDTH, HEIGHT, FPS = 1920, 1080, 30


def make_video(path: Path, seconds: int, gop: int) -> Path:
    """1080p H.264 (veryfast, crf 23, yuv420p) at 30 fps: a textured picture panning (jumping
    back by 192 pixels every 64 frames, a cut for --scenes), a square moving across it, another
    picture every 10 s."""
    if path.exists():
        return path
    import av
    from PIL import Image

    rng = np.random.default_rng(0)
    scenes = []
    for _ in range(max(1, seconds // 10 + 1)):
        coarse = rng.integers(0, 256, (HEIGHT // 24, WIDTH // 24 + 8, 3), dtype=np.uint8)
        scenes.append(np.asarray(Image.fromarray(coarse).resize((WIDTH + 192, HEIGHT), Image.BICUBIC)))
    grain = rng.integers(-12, 12, (4, HEIGHT, WIDTH, 1), dtype=np.int16)
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"preset": "veryfast", "crf": "23", "keyint_min": str(gop), "sc_threshold": "0"}
        for number in range(seconds * FPS):
            scene = scenes[number // (10 * FPS)]
            shift = (number * 3) % 192
            picture = scene[:, shift : shift + WIDTH].astype(np.int16) + grain[number % 4]
            x = (number * 17) % (WIDTH - 200)
            picture[400:600, x : x + 200] = 255
            frame = av.VideoFrame.from_ndarray(np.clip(picture, 0, 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.rename(path)
    return path


def decode_all(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(stream))


def sampled(path: Path, **options) -> int:
    from siglip_cli.core.video import VideoSampling, sample_frames

    return sum(1 for _ in sample_frames(str(path), path.name, VideoSampling(**options)))


def measure(work) -> tuple[int, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    frames = work()
    return frames, time.process_time() - cpu, time.perf_counter() - wall


def whole_run(path: Path, checkpoint: Path, seconds: int) -> str:
    import siglip_cli
    from siglip_cli.sources import Source

    engine = siglip_cli.load(str(checkpoint), use_cache=False)
    engine.embed_images([np.zeros((224, 224, 3), np.uint8)] * 2)  # warm: weights loaded, kernels picked
    wall, cpu = time.perf_counter(), time.process_time()
    rows = sum(1 for r in engine.iter_image_features([Source(str(path), str(path))]) if r.vector is not None)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return (f"whole run, --every 2, model {engine.precision} (decode {engine.decode}, batch {engine.batch_size}): {rows} frames in "
            f"{wall:.2f} s wall ({cpu:.2f} s CPU): {rows / wall:.1f} frames/s, {seconds / wall:.1f}x real time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/siglip-video-bench"))
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--no-model", action="store_true", help="skip the whole run with the model")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    videos = {}
    for gop in (FPS, 10 * FPS):
        path = args.folder / f"1080p-{args.seconds}s-key{gop // FPS}s.mp4"
        start = time.perf_counter()
        videos[gop] = make_video(path, args.seconds, gop)
        print(f"{path.name}: {path.stat().st_size / 1e6:.1f} MB (ready in {time.perf_counter() - start:.0f} s)")
    modes = [
        ("all frames (decode only)", lambda p: decode_all(p)),
        ("--every 2", lambda p: sampled(p, every=2)),
        ("--every 0.5", lambda p: sampled(p, every=0.5)),
        ("--scenes", lambda p: sampled(p, scenes=True)),
    ]
    print(f"{'video':<24} {'mode':<26} {'frames':>6} {'CPU s':>7} {'wall s':>7} {'frames/CPU s':>13} {'x real time (CPU)':>18}")
    for gop, path in videos.items():
        for label, work in modes:
            frames, cpu, wall = measure(lambda: work(path))
            print(f"{'keyframe every ' + str(gop // FPS) + ' s':<24} {label:<26} {frames:>6} {cpu:>7.2f} {wall:>7.2f} "
                  f"{frames / cpu:>13.1f} {args.seconds / cpu:>17.1f}x")
        print(f"  load: {load_average()}")
    if not args.no_model:
        checkpoint = build_checkpoint(args.folder / "base-224")
        print(whole_run(videos[FPS], checkpoint, args.seconds))
        print(f"  load: {load_average()}")


if __name__ == "__main__":
    main()
