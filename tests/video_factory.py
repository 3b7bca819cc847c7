"""Test media whose frames carry their own index.

Each frame shows its index as a barcode: ``NUM_BITS`` equal-width vertical bars across
the middle band of the picture, bar ``i`` white when bit ``i`` (most significant first)
is set and black otherwise. The bands above and below get a colour that changes with
the index, so consecutive frames also differ in chroma like real video. Bars are laid
out in proportion to the frame size, so ``read_index`` still works after a resize, and
it reads only the centre of each bar, so compression ringing at bar edges does not
matter. This lets a test assert that a reader returned exactly the frames it claims.

Videos are encoded by the ffmpeg command line from raw RGB on stdin; tests that need
ffmpeg or a particular encoder are skipped when it is missing. Helpers also make the
awkward cases readers meet: variable frame rates, rotation/flip display matrices, edit
lists (``remux``), large frames (``write_test_pattern``), cut files and junk after the
last frame; ``ffmpeg_decode`` gives what ffmpeg itself displays, to compare against.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

NUM_BITS = 10
MAX_INDEX = (1 << NUM_BITS) - 1

# codec name -> (file suffix, ffmpeg encoder, output arguments)
CODECS: dict[str, tuple[str, str, list[str]]] = {
    "h264": (".mp4", "libx264", ["-pix_fmt", "yuv420p", "-crf", "18", "-preset", "veryfast"]),
    "mpeg4": (".avi", "mpeg4", ["-pix_fmt", "yuv420p", "-q:v", "3"]),
    "xvid": (".avi", "libxvid", ["-pix_fmt", "yuv420p", "-q:v", "3", "-vtag", "XVID"]),
    "vp9": (".webm", "libvpx-vp9", ["-pix_fmt", "yuv420p", "-crf", "30", "-b:v", "0",
                                    "-deadline", "realtime", "-cpu-used", "8"]),
    "mjpeg": (".avi", "mjpeg", ["-pix_fmt", "yuvj420p", "-q:v", "3"]),
}

# codecs encoded with B-frames unless the caller says otherwise
_BFRAMES_BY_DEFAULT = {"xvid"}


def _skip(reason: str) -> None:
    import pytest

    pytest.skip(reason)


def ffmpeg_path() -> str | None:
    """Return the ffmpeg executable, or None when it is not installed."""
    return shutil.which("ffmpeg")


@functools.lru_cache(maxsize=None)
def has_encoder(encoder: str) -> bool:
    """Say whether the installed ffmpeg offers ``encoder``."""
    exe = ffmpeg_path()
    if exe is None:
        return False
    out = subprocess.run([exe, "-hide_banner", "-encoders"], capture_output=True,
                         text=True, timeout=30).stdout
    return any(line.split()[1:2] == [encoder] for line in out.splitlines() if line.strip())


def _bar_edges(width: int) -> np.ndarray:
    return np.round(np.linspace(0, width, NUM_BITS + 1)).astype(int)


def _band(height: int) -> tuple[int, int]:
    return height // 4, height - height // 4


def background_colour(index: int) -> tuple[int, int, int]:
    """A colour that changes with the index (kept mid-range so it never looks like a bar)."""
    return (40 + (index * 37) % 176, 40 + (index * 71) % 176, 40 + (index * 113) % 176)


def make_index_frame(index: int, width: int = 96, height: int = 64) -> np.ndarray:
    """Draw one RGB uint8 frame (H, W, 3) carrying ``index`` as a barcode."""
    if not 0 <= index <= MAX_INDEX:
        raise ValueError(f"index {index} outside 0..{MAX_INDEX}")
    if width < 2 * NUM_BITS or height < 8:
        raise ValueError(f"frame {width}x{height} too small for a {NUM_BITS}-bit barcode")
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[:] = background_colour(index)
    top, bottom = _band(height)
    edges = _bar_edges(width)
    for bit in range(NUM_BITS):
        on = (index >> (NUM_BITS - 1 - bit)) & 1
        frame[top:bottom, edges[bit]:edges[bit + 1]] = 255 if on else 0
    return frame


def read_index(frame: np.ndarray) -> int:
    """Decode the barcode of an RGB (H, W, 3) frame back to its index.

    Takes the mean luma over the centre half of each bar (width) and the centre of the
    band (height) and thresholds it at mid-grey.
    """
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) frame, got shape {frame.shape}")
    height, width = frame.shape[:2]
    luma = frame.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    top, bottom = _band(height)
    quarter = max((bottom - top) // 4, 0)
    rows = slice(top + quarter, max(bottom - quarter, top + quarter + 1))
    edges = np.linspace(0, width, NUM_BITS + 1)
    index = 0
    for bit in range(NUM_BITS):
        left, right = edges[bit], edges[bit + 1]
        margin = (right - left) / 4
        cols = slice(int(np.ceil(left + margin)), max(int(np.floor(right - margin)),
                                                      int(np.ceil(left + margin)) + 1))
        index = (index << 1) | int(luma[rows, cols].mean() > 127.5)
    return index


def write_index_video(path: str | os.PathLike, num_frames: int, codec: str = "h264",
                      fps: float = 10, width: int = 96, height: int = 64,
                      bframes: bool | None = None) -> Path:
    """Encode ``num_frames`` barcode frames (indices 0..num_frames-1) with ffmpeg.

    ``codec`` is one of ``CODECS``. ``bframes`` asks for B-frames (``-bf 2``); None means
    the codec's default here (on for "xvid", the MSVD-like case: libxvid in AVI writes
    packed B-frames and no timestamps, off elsewhere). A suffix missing from ``path`` is
    added. Skips the calling test when ffmpeg or the encoder is missing.

    Caveat: ffmpeg never flushes libxvid, so an "xvid" file with B-frames loses one or two
    of its last frames (e.g. 40 written, 38 decodable: 0..36 and 39). Compare readers
    against ``decoded_indices(path)`` rather than ``range(num_frames)`` for that codec.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose from {sorted(CODECS)}")
    if not 1 <= num_frames <= MAX_INDEX + 1:
        raise ValueError(f"num_frames must be in 1..{MAX_INDEX + 1}")
    suffix, encoder, args = CODECS[codec]
    exe = ffmpeg_path()
    if exe is None:
        _skip("ffmpeg is not installed")
    if not has_encoder(encoder):
        _skip(f"ffmpeg has no {encoder} encoder")
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    use_bframes = codec in _BFRAMES_BY_DEFAULT if bframes is None else bframes
    gop = ["-bf", "2" if use_bframes else "0", "-g", "12"] if codec != "mjpeg" else []
    cmd = [exe, "-hide_banner", "-loglevel", "error", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps),
           "-i", "-", "-an", "-c:v", encoder, *gop, *args, str(path)]
    raw = b"".join(make_index_frame(i, width, height).tobytes() for i in range(num_frames))
    result = subprocess.run(cmd, input=raw, capture_output=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"ffmpeg failed for {path}: {result.stderr.decode(errors='replace')}")
    logger.debug("wrote %s (%d frames, %s)", path, num_frames, codec)
    return path


def decoded_indices(path: str | os.PathLike, stop_at_error: bool = False) -> list[int]:
    """Barcodes of every frame in decode order, by a plain sequential PyAV decode.

    This is the ground truth a random-access reader must agree with: position ``i`` of
    the result is what a correct reader returns for frame index ``i``. ``stop_at_error``
    ends at the first decode error instead of raising (a cut file, trailing garbage).
    """
    import av

    found: list[int] = []
    with av.open(str(path)) as container:
        try:
            for frame in container.decode(video=0):
                found.append(read_index(frame.to_ndarray(format="rgb24")))
        except av.error.FFmpegError:
            if not stop_at_error:
                raise
    return found


def _run_ffmpeg(args: list[str], stdin: bytes | None = None) -> bytes:
    """Run ffmpeg quietly and return its stdout; skips the calling test when ffmpeg is missing."""
    exe = ffmpeg_path()
    if exe is None:
        _skip("ffmpeg is not installed")
    result = subprocess.run([exe, "-hide_banner", "-loglevel", "error", "-y", *args], input=stdin,
                            capture_output=True, timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ffmpeg {' '.join(args)} failed: {result.stderr.decode(errors='replace')}")
    return result.stdout


def write_test_pattern(path: str | os.PathLike, width: int, height: int, seconds: float,
                       fps: float = 10, bframes: bool = True) -> Path:
    """An H.264 clip of ffmpeg's ``testsrc`` (asymmetric, so any rotation or flip shows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _run_ffmpeg(["-f", "lavfi", "-i", f"testsrc=size={width}x{height}:rate={fps}", "-t", str(seconds),
                 "-c:v", "libx264", "-preset", "ultrafast", "-bf", "2" if bframes else "0",
                 "-pix_fmt", "yuv420p", str(path)])
    return path


def remux(src: str | os.PathLike, dst: str | os.PathLike, output_args: Sequence[str] = (),
          input_args: Sequence[str] = ()) -> Path:
    """Copy a video's streams into a new file with ffmpeg (``-c copy``), e.g. with rotate metadata,
    ``+faststart``, or ``input_args=["-ss", "0.5"]`` for an MP4 edit list."""
    _run_ffmpeg([*input_args, "-i", str(src), "-c", "copy", *output_args, str(dst)])
    return Path(dst)


def write_display_matrix(src: str | os.PathLike, dst: str | os.PathLike, degrees: int,
                         hflip: bool = False, vflip: bool = False) -> Path:
    """Remux ``src`` with a display matrix: ``degrees`` counter-clockwise, then the flips.

    Uses PyAV, because ffmpeg's command line before 6.0 writes rotations only, no flips.
    """
    import av

    with av.open(str(src)) as source, av.open(str(dst), "w") as target:
        stream = source.streams.video[0]
        out = target.add_stream_from_template(stream)
        out.set_display_rotation(degrees, hflip=hflip, vflip=vflip)
        for packet in source.demux(stream):
            if packet.dts is not None:  # the demuxer's final flush packet
                packet.stream = out
                target.mux(packet)
    return Path(dst)


def write_vfr_index_video(path: str | os.PathLike, pieces: Sequence[tuple[int, float]],
                          width: int = 96, height: int = 64) -> tuple[Path, list[float]]:
    """A variable-frame-rate H.264 clip of barcode frames: ``pieces`` are (frames, fps) in turn.

    Frame times are set with ``setpts`` in milliseconds and kept as they are
    (``-fps_mode passthrough``), in whatever container the suffix names (.mp4, .mkv).
    Returns the path and each frame's start time in seconds.
    """
    millis: list[int] = []
    begin = 0.0
    for count, fps in pieces:
        millis += [round(1000 * (begin + i / fps)) for i in range(count)]
        begin += count / fps
    pts = "+".join(f"eq(N,{i})*{ms}" for i, ms in enumerate(millis))
    raw = b"".join(make_index_frame(i, width, height).tobytes() for i in range(len(millis)))
    path = Path(path)
    _run_ffmpeg(["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", "25", "-i", "-",
                 "-vf", f"settb=1/1000,setpts='{pts}'", "-fps_mode", "passthrough", "-c:v", "libx264",
                 "-preset", "veryfast", "-bf", "2", "-g", "12", "-pix_fmt", "yuv420p", str(path)], stdin=raw)
    return path, [ms / 1000 for ms in millis]


def append_ts_garbage(path: str | os.PathLike, num_packets: int = 20, seed: int = 0) -> Path:
    """Append junk MPEG-TS packets on the video PID (0x100, ffmpeg's default) to a .ts file.

    Each has a valid TS header, the first a PES header and an H.264 IDR start code, then
    random bytes: junk the demuxer passes to the decoder, as a broken capture or a bad
    concatenation leaves. (Random bytes alone are skipped by the demuxer's resync.)
    """
    rng = np.random.default_rng(seed)
    pes = b"\x00\x00\x01\xe0\x00\x00\x80\x80\x05\x21\x00\x07\xd8\x61\x00\x00\x00\x01\x65"
    packets = []
    for i in range(num_packets):
        header = bytes([0x47, 0x41 if i == 0 else 0x01, 0x00, 0x10 | i % 16])
        body = header + (pes if i == 0 else b"") + rng.integers(0, 256, 188, dtype=np.uint8).tobytes()
        packets.append(body[:188])
    path = Path(path)
    with open(path, "ab") as f:
        f.write(b"".join(packets))
    return path


def ffmpeg_decode(path: str | os.PathLike) -> np.ndarray:
    """Every frame as ffmpeg's command line shows it (autorotated, no frames dropped or
    repeated), (N, H, W, 3) uint8 RGB: the reference for what a player displays."""
    data = _run_ffmpeg(["-i", str(path), "-fps_mode", "passthrough", "-f", "image2pipe",
                        "-c:v", "ppm", "-"])
    frames, offset = [], 0
    while offset < len(data):
        header = re.match(rb"P6\s+(\d+)\s+(\d+)\s+255\s", data[offset:offset + 64])
        width, height = int(header[1]), int(header[2])
        start = offset + header.end()
        offset = start + width * height * 3
        frames.append(np.frombuffer(data[start:offset], dtype=np.uint8).reshape(height, width, 3))
    return np.stack(frames)


def write_image(path: str | os.PathLike, index: int = 0, width: int = 96,
                height: int = 64) -> Path:
    """Write a still image (format from the suffix: .jpg, .png, .bmp, .webp) carrying ``index``."""
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = make_index_frame(index, width, height)[:, :, ::-1]
    if not cv2.imwrite(str(path), np.ascontiguousarray(bgr)):
        raise RuntimeError(f"OpenCV could not write {path}")
    return path


def write_empty(path: str | os.PathLike) -> Path:
    """Create a zero-length file (e.g. a failed download named like a video)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_truncated(src: str | os.PathLike, dst: str | os.PathLike, num_bytes: int) -> Path:
    """Copy only the first ``num_bytes`` of a good video (an interrupted download)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(Path(src).read_bytes()[:num_bytes])
    return dst


def write_corrupt(path: str | os.PathLike, num_bytes: int = 4096, seed: int = 0) -> Path:
    """Write random bytes under a video-looking name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, num_bytes, dtype=np.uint8)
                     .tobytes())
    return path


# Visibly different clips, so that a tiny random model captions each differently: (lavfi source, seconds).
CAPTION_CLIPS = (("color=c=red", 1.5), ("color=c=blue", 1.5), ("testsrc=decimals=0", 1.5), ("cellauto=rule=110", 1.5))


def write_caption_clips(folder: str | os.PathLike, sources=CAPTION_CLIPS, clip_id: str = "c{:02d}") -> Path:
    """64x48 clips v<i>.mp4 plus a corrupt broken.mp4, listed with a clip_id column in meta.csv."""
    import pandas as pd

    exe = ffmpeg_path()
    if exe is None:
        _skip("ffmpeg is not installed")
    folder = Path(folder)
    rows = []
    for i, (source, seconds) in enumerate(sources):
        subprocess.run([exe, "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                        f"{source}:size=64x48:rate=10", "-t", str(seconds), "-pix_fmt", "yuv420p",
                        str(folder / f"v{i}.mp4")], check=True, timeout=60)
        rows.append({"path": f"v{i}.mp4", "clip_id": clip_id.format(i)})
    write_corrupt(folder / "broken.mp4")
    rows.append({"path": "broken.mp4", "clip_id": "bad"})
    pd.DataFrame(rows).to_csv(folder / "meta.csv", index=False)
    return folder / "meta.csv"
