"""The one video reader: open a video (or a still image), sample frame indices, decode them.

Backends. decord is the default because it seeks: only the requested frames are decoded.
It returns wrong frames on AVI files whose video stream has no timestamps, which is what
ffmpeg's AVI demuxer reports for MPEG-4 part 2 with B-frames, packed (XviD/DivX, as in
MSVD) or not: on such files decord's random access lands up to tens of frames away from
the requested one (seen on test videos whose frames carry their own index). decord's own
``get_frame_timestamp`` exposes the case (missing, i.e. negative, or non-increasing
timestamps), so "auto" checks them and decodes such files sequentially with PyAV instead.
PyAV is also the fallback whenever decord cannot open or decode a file.

Frame index ``i`` always means the ``i``-th frame a sequential decode produces. Time
segments (``start``/``end`` in seconds) map to those indices through a ``Timeline``: each
frame starts at the backend's own timestamp, counted from the first frame, where the
backend has usable ones (decord on most files, PyAV where its times increase), else at
``i / fps``; a segment holds the frames whose centre lies in ``[start, end)``, so
adjacent segments share no frame and together hold every frame. Sampling counts time,
not frames: "uniform" takes the frames showing at evenly spaced instants and fps
sampling counts the seconds the timestamps span, so a variable-frame-rate clip is
sampled evenly over its duration (on a constant-rate clip, instants and frame numbers
agree, and the evenly-spaced-index formula is used as is). ``sample_frames`` can return the
sampled frames' start times instead of their indices, counted from the first frame of the
sampled span, so a model that writes times into its prompt (Qwen3-VL) or positions tokens by
them (Qwen2.5-VL) gets the real ones on variable-rate clips, segments and capped samplings.

Frames come out upright, as players show them: decord applies the rotation of the
stream's display matrix, and the PyAV path applies the whole matrix (90/180/270 degree
rotations and mirror flips) itself. decord ignores a matrix's mirror flip, which
phones rarely write; ``backend="pyav"`` honours it. Frames larger than ``max_pixels``
are scaled down inside the decoder (decord's output size, PyAV's swscale conversion),
so full-size frames of a 4K or 8K file are never held in a batch.

Every failure (missing, empty, truncated beyond use, corrupt, undecodable) surfaces as
``VideoReadError`` naming the file. A file whose beginning is still readable (an AVI or
MP4 cut short, a stream with trailing garbage) yields the frames of that beginning, as
players do: the sequential decode ends at the first decode error after a good frame,
with a warning, and sampling is over the frames that decoded.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import cv2
import numpy as np

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
SAMPLINGS = ("uniform", "headtail")
BACKENDS = ("auto", "decord", "pyav")
# Frames above this many pixels are scaled down while decoding. Captioners take 224-672 px
# inputs (Qwen2-VL's defaults are 448x672), so 1080p keeps more detail than any of them
# uses, while a decoded frame stays at 6.2 MB (4K: 24.9 MB, 8K: 99.5 MB) and a chunk of
# DECODE_CHUNK frames at 200 MB per worker process.
DEFAULT_MAX_DECODE_PIXELS = 1920 * 1080

BackendResult = TypeVar("BackendResult")
Transform = Callable[[np.ndarray], np.ndarray]  # (N, H, W, 3) -> (N, H', W', 3), applied per decoded chunk


class VideoReadError(Exception):
    """A video or image could not be read; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"cannot read video {self.path}: {problem}")


class SegmentError(VideoReadError):
    """A time segment that does not fit its video; the message names the file, the segment and the fix."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(path, problem)
        self.args = (f"video {self.path}: {problem}",)


# ----------------------------------------------------------------------------- time

def _increasing(starts: np.ndarray) -> bool:
    """Usable timestamps: present (decord reports missing ones as huge negatives) and strictly increasing."""
    return bool(len(starts) and np.all(starts >= 0) and np.all(np.diff(starts) > 0))


@dataclass(frozen=True)
class Timeline:
    """When each decodable frame starts (seconds from the first frame) and the stream's frame rate.

    ``starts`` is None when the video has neither usable timestamps nor a frame rate, so
    no time can be placed in it.
    """

    count: int
    fps: float
    starts: np.ndarray | None

    @classmethod
    def build(cls, count: int, fps: float, stamps: Any = None) -> Timeline:
        """Use the backend's timestamps when they fit ``count`` and increase, else ``i / fps``."""
        if stamps is not None:
            stamps = np.asarray(stamps, dtype=np.float64)
            if len(stamps) == count and _increasing(stamps):
                return cls(count, fps, stamps - stamps[0])
        if fps > 0:
            return cls(count, fps, np.arange(count, dtype=np.float64) / fps)
        return cls(count, fps, None)

    def _starts(self, path: Path) -> np.ndarray:
        if self.starts is None or self.count == 0:
            raise SegmentError(path, "it has neither frame timestamps nor a frame rate, so a time "
                                     "segment cannot be placed in it; leave start/end empty")
        return self.starts

    def _last_length(self, starts: np.ndarray) -> float:
        """How long the last frame shows: one frame period, or the gap before it where the rate is
        unknown or that gap differs by over a quarter (a variable rate: its average is wrong there)."""
        gap = float(starts[-1] - starts[-2]) if len(starts) > 1 else 0.0
        if self.fps <= 0:
            return gap
        period = 1.0 / self.fps
        return gap if len(starts) > 1 and abs(gap - period) > period / 4 else period

    def seconds(self, lo: int, hi: int) -> float | None:
        """How long frames ``[lo, hi)`` show, first start to last end; None when no time is known."""
        if self.starts is None:
            return None
        end = self.starts[hi] if hi < self.count else self.starts[-1] + self._last_length(self.starts)
        return float(end - self.starts[lo])

    def times(self, indices: np.ndarray, first: int) -> np.ndarray:
        """Start times (seconds) of frames ``indices``, counted from frame ``first``'s start; zeros
        where no time is known (neither timestamps nor a frame rate)."""
        if self.starts is None:
            return np.zeros(len(indices))
        return self.starts[indices] - self.starts[first]

    def uneven_starts(self, lo: int, hi: int) -> np.ndarray | None:
        """Start times of frames ``[lo, hi)`` if they (and the last one's end) stray more than a
        quarter frame from an even grid, i.e. the frame rate varies; else None.

        Within that tolerance sampling by frame number is sampling by time, and it is exact
        where timestamps are rounded (e.g. to milliseconds in MKV).
        """
        if self.starts is None or hi - lo < 2:
            return None
        edges = np.append(self.starts[lo:hi], self.starts[lo] + self.seconds(lo, hi))
        grid = np.linspace(edges[0], edges[-1], len(edges))
        period = (edges[-1] - edges[0]) / (len(edges) - 1)
        return edges[:-1] if np.max(np.abs(edges - grid)) > period / 4 else None

    def duration(self, path: Path) -> float:
        """Seconds from the first frame's start to the last frame's end."""
        starts = self._starts(path)
        return float(starts[-1]) + self._last_length(starts)

    def frame_range(self, path: Path, start: float, end: float | None) -> tuple[int, int]:
        """``[lo, hi)``: the frames whose centre lies in ``[start, end)`` (``end`` None: the video's end).

        Boundaries on frame starts (as timecodes made from frame counts are) are half a
        frame from any centre, so rounding in the timestamps cannot move a frame across;
        a boundary exactly on a centre may fall either way. An end past the video's end by
        up to one frame is the end (timecodes are rounded); beyond that, a start after
        the last frame's centre, or a segment holding no frame centre is a SegmentError.
        """
        starts = self._starts(path)
        length = self._last_length(starts)
        duration = float(starts[-1]) + length
        shown = f"segment {start:g}-{end:g} s" if end is not None else f"segment from {start:g} s to the end"
        centres = starts + np.diff(np.append(starts, duration)) / 2
        lo = int(np.searchsorted(centres, start, side="left"))
        if lo == self.count:
            raise SegmentError(path, f"{shown} starts after the video's last frame (the video lasts "
                                     f"{duration:g} s); fix the row's start/end or timestamp")
        if end is not None and end > duration + length:
            raise SegmentError(path, f"{shown} ends after the end of the video ({duration:g} s); "
                                     f"fix the row's start/end or timestamp")
        hi = self.count if end is None else int(np.searchsorted(centres, end, side="left"))
        if hi <= lo:
            raise SegmentError(path, f"{shown} holds no frame (frames are about {length:g} s apart); widen it")
        return lo, hi


def check_segment_args(start: float | None, end: float | None) -> None:
    """Reject segments that no video can satisfy, before any file is opened."""
    for name, value in (("start", start), ("end", end)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"segment {name} must be a finite number of seconds >= 0, got {value}")
    if start is not None and end is not None and end <= start:
        raise ValueError(f"segment end {end:g} s is not after its start {start:g} s")


def split_windows(start: float, end: float, seconds: float, min_seconds: float) -> list[tuple[float, float]]:
    """Consecutive windows of ``seconds`` covering ``[start, end)``.

    A last window shorter than ``min_seconds`` joins the one before it, so no window is
    a sliver; a span shorter than one window is one window. Window ``i`` starts at
    ``start + i * seconds`` (not a running sum, so the times are the same on every run)
    and the last ends exactly at ``end``. An empty span (a still image) is one empty window.
    """
    if not seconds > 0 or min_seconds < 0:
        raise ValueError(f"window seconds must be > 0 and min seconds >= 0, got {seconds} and {min_seconds}")
    eps = 1e-9 * max(1.0, abs(end))
    full = math.floor((end - start) / seconds + eps)
    rest = end - start - full * seconds
    count = full + 1 if full == 0 or (rest > eps and rest >= min_seconds) else full
    edges = [start + i * seconds for i in range(count)] + [end]
    return list(zip(edges[:-1], edges[1:]))


# (the video's frame timeline) -> indices to read
Selector = Callable[[Timeline], np.ndarray]


# ----------------------------------------------------------------------------- sampling

def uniform_indices(num_available: int, count: int) -> np.ndarray:
    """Centres of ``count`` equal segments of ``range(num_available)`` (deterministic).

    Unlike LAVIS' ``np.arange(0, n, n / T)`` (segment starts) this never favours the
    beginning of the video. With ``count > num_available`` indices repeat, still sorted.
    """
    centres = (2 * np.arange(count, dtype=np.int64) + 1) * num_available // (2 * count)
    return centres.astype(np.int64)


def uniform_time_indices(starts: np.ndarray, end: float, count: int) -> np.ndarray:
    """The frames showing at the centres of ``count`` equal slices of ``[starts[0], end)`` (sorted int64).

    ``starts`` are the frames' start times, increasing. On a variable-frame-rate video this
    spreads the picks evenly over time rather than over frame numbers (which crowd into
    the fast part); a frame that shows longer than a slice can be picked more than once.
    """
    instants = starts[0] + (np.arange(count) + 0.5) * (end - starts[0]) / count
    return (np.searchsorted(starts, instants, side="right") - 1).astype(np.int64)


def _pick_sorted(low: int, high: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random indices in ``[low, high)``, distinct while the range allows it."""
    span = high - low
    if count <= span:
        picked = rng.choice(span, size=count, replace=False)
    else:
        picked = np.concatenate([np.arange(span), rng.choice(span, size=count - span)])
    return np.sort(picked).astype(np.int64) + low


def headtail_indices(num_available: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """The BLIP-2 video captioner's random training sampling ("headtail", from LAVIS).

    LAVIS draws ``T // 2`` distinct random frames from the first half ``[0, n // 2)`` and
    ``T // 2`` from the second half ``[n // 2, n)``, each half sorted (it loses one frame
    for odd ``T`` and never returns more frames than the video has). Here the head gets
    ``T // 2`` and the tail the rest, so exactly ``count`` indices come back; a half
    shorter than its share contributes all its frames plus random repeats. A one-frame
    video gives ``count`` zeros.
    """
    half = num_available // 2
    if half == 0:
        return np.zeros(count, dtype=np.int64)
    head = _pick_sorted(0, half, count // 2, rng)
    tail = _pick_sorted(half, num_available, count - count // 2, rng)
    return np.concatenate([head, tail])


def _frame_count_for_fps(duration: float, fps: float, num_frames: int | None, min_frames: int | None = None) -> int:
    """How many frames sampling at ``fps`` over ``duration`` seconds gives: at least ``min_frames`` (or one),
    at most ``num_frames``."""
    count = max(min_frames or 1, round(duration * fps))
    return count if num_frames is None else min(count, num_frames)


def check_sampling_args(num_frames: int | None, sampling: str, fps: float | None,
                        max_pixels: int | None = None, min_frames: int | None = None) -> None:
    """Reject bad arguments up front, so they are never mistaken for a bad file."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; choose from {SAMPLINGS}")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if min_frames is not None and min_frames < 1:
        raise ValueError(f"min_frames must be at least 1, got {min_frames}")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1 (or None for no cap), got {max_pixels}")


def select_indices(num_available: int, num_frames: int | None, sampling: str,
                   fps: float | None, duration: float | None,
                   rng: np.random.Generator | int | None,
                   starts: np.ndarray | None = None, min_frames: int | None = None) -> np.ndarray:
    """Frame indices (sorted int64) for ``num_available`` frames that show for ``duration`` seconds.

    ``duration`` is needed with ``fps`` and with ``starts``. ``starts`` (the frames' start
    times, given when they are unevenly spaced) makes "uniform" uniform in time; None
    means uniform in frame number, which on an even spacing is the same thing.
    ``min_frames``: with ``fps``, the fewest frames (a short clip's spread over its duration).
    """
    check_sampling_args(num_frames, sampling, fps, min_frames=min_frames)
    if num_available < 1:
        raise ValueError("a video needs at least one frame")
    if fps is None and num_frames is None:
        return np.arange(num_available, dtype=np.int64)
    if fps is None:
        count = num_frames
    elif duration is None:
        raise ValueError("the video has neither frame times nor a frame rate, so fps sampling is impossible")
    else:
        count = _frame_count_for_fps(duration, fps, num_frames, min_frames)
    if sampling == "headtail":
        return headtail_indices(num_available, count, np.random.default_rng(rng))
    if starts is None:
        return uniform_indices(num_available, count)
    return uniform_time_indices(starts, float(starts[0]) + duration, count)


# ----------------------------------------------------------------------------- resizing

def _target_size(src_h: int, src_w: int, height: int | None,
                 width: int | None) -> tuple[int, int] | None:
    if height is None and width is None:
        return None
    if height is None:
        height = max(1, round(src_h * width / src_w))
    elif width is None:
        width = max(1, round(src_w * height / src_h))
    return height, width


def _capped_size(height: int, width: int, max_pixels: int | None) -> tuple[int, int] | None:
    """The largest (h, w) of the same aspect with h * w <= ``max_pixels`` (at least 1 each); None when it fits.

    Integer square roots, so the product never exceeds the cap through float rounding.
    Swapping height and width swaps the result, so capping coded or displayed sizes agrees.
    """
    if max_pixels is None or height * width <= max_pixels:
        return None
    return (max(1, math.isqrt(height * max_pixels // width)),
            max(1, math.isqrt(width * max_pixels // height)))


def resize_frames(frames: np.ndarray, height: int | None, width: int | None) -> np.ndarray:
    """Resize (T, H, W, 3) frames; one of height/width alone keeps the aspect ratio."""
    size = _target_size(frames.shape[1], frames.shape[2], height, width)
    if size is None or size == frames.shape[1:3]:
        return frames
    new_h, new_w = size
    shrinking = new_h * new_w < frames.shape[1] * frames.shape[2]
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    out = np.empty((frames.shape[0], new_h, new_w, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        out[i] = cv2.resize(frame, (new_w, new_h), interpolation=interp)
    return out


# ----------------------------------------------------------------------------- decord

def _open_decord(path: Path, size: tuple[int, int] | None = None) -> Any:
    """A decord reader; ``size`` (h, w) makes decord scale every frame while decoding."""
    import decord

    if size is None:
        return decord.VideoReader(str(path), num_threads=1)
    return decord.VideoReader(str(path), width=size[1], height=size[0], num_threads=1)


def _decord_starts(reader: Any) -> np.ndarray:
    count = len(reader)
    return reader.get_frame_timestamp(np.arange(count))[:, 0] if count else np.zeros(0)


def decord_timestamps_reliable(reader: Any) -> bool:
    """Say whether decord's per-frame start times exist and strictly increase.

    decord seeks by these timestamps; where the container gives none (AVI + MPEG-4 part 2
    with B-frames, e.g. XviD) they come back hugely negative and seeking goes wrong.
    """
    return _increasing(_decord_starts(reader))


def _open_decord_timeline(path: Path, check_timestamps: bool, max_pixels: int | None = None
                          ) -> tuple[Any, Timeline] | None:
    """decord's reader and timeline, or None when its random access cannot be trusted here.

    With ``max_pixels``, the first frame gives the displayed size (decord has no other way
    to tell it) and a larger video is reopened to decode at the capped size.
    """
    reader = _open_decord(path)
    starts = _decord_starts(reader)
    if check_timestamps and not _increasing(starts):
        logger.debug("%s: decord timestamps missing or unordered, using PyAV", path)
        return None
    if max_pixels is not None:
        size = _capped_size(*reader.next().shape[:2], max_pixels)
        if size is not None:
            reader = _open_decord(path, size)
    return reader, Timeline.build(len(reader), reader.get_avg_fps(), starts)


DECODE_CHUNK = 32  # frames decoded at once (each at most max_pixels); each chunk is resized before the next


def _read_decord(path: Path, select: Selector, check_timestamps: bool, transform: Transform,
                 max_pixels: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Frames via decord, or None when decord's random access cannot be trusted here."""
    opened = _open_decord_timeline(path, check_timestamps, max_pixels)
    if opened is None:
        return None
    reader, timeline = opened
    indices = select(timeline)
    unique, inverse = np.unique(indices, return_inverse=True)
    chunks = [transform(reader.get_batch(unique[i:i + DECODE_CHUNK].tolist()).asnumpy())
              for i in range(0, len(unique), DECODE_CHUNK)]
    return np.concatenate(chunks)[inverse], indices


def _decord_timeline(path: Path, check_timestamps: bool) -> Timeline | None:
    opened = _open_decord_timeline(path, check_timestamps)
    return None if opened is None else opened[1]


# ----------------------------------------------------------------------------- PyAV

@dataclass(frozen=True)
class Orientation:
    """How to turn a decoded picture upright, from its display matrix (as ffmpeg's autorotate does)."""

    transpose: bool = False
    flip_rows: bool = False  # then reverse the rows (upside down)
    flip_cols: bool = False  # and the columns (mirrored)

    @classmethod
    def from_matrix(cls, matrix: np.ndarray) -> Orientation:
        """Read FFmpeg's 3x3 display matrix (row-major, 16.16 fixed point).

        It maps a source pixel (x, y) to ``(a x + c y, b x + d y)`` with ``a, b, c, d`` its
        entries 0, 1, 3 and 4: a signed permutation for right-angle rotations and flips.
        Any other angle is left unrotated, with a warning.
        """
        a, b, c, d = (int(v) for v in np.sign(np.asarray(matrix)[[0, 1, 3, 4]]))
        if a == d == 0 and b and c:
            return cls(transpose=True, flip_rows=b < 0, flip_cols=c < 0)
        if b == c == 0 and a and d:
            return cls(flip_rows=d < 0, flip_cols=a < 0)
        logger.warning("display matrix %s is not a right-angle rotation; frames left unrotated",
                       np.asarray(matrix).tolist())
        return cls()

    @classmethod
    def of_frame(cls, frame: Any) -> Orientation:
        """A PyAV frame's orientation (FFmpeg attaches the stream's display matrix to each frame)."""
        side = frame.side_data.get("DISPLAYMATRIX")
        return cls() if side is None else cls.from_matrix(np.frombuffer(bytes(side), dtype=np.int32))

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The upright view of an (H, W, C) picture (no copy)."""
        if self.transpose:
            image = image.transpose(1, 0, 2)
        if self.flip_rows:
            image = image[::-1]
        if self.flip_cols:
            image = image[:, ::-1]
        return image


@contextmanager
def _open_pyav(path: Path) -> Iterator[Any]:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoReadError(path, "no video stream")
        yield container


def _decoded_frames(path: Path, container: Any) -> Iterator[Any]:
    """The first video stream's frames in order (sequential, no seeks), up to the first decode error.

    A truncated file or trailing garbage ends in an error (invalid data, EAGAIN, EOF) after
    its last good frame; that is the end of the stream, as for players. An error before
    any frame is raised: nothing usable decodes.
    """
    import av

    decoded = 0
    try:
        for frame in container.decode(video=0):
            decoded += 1
            yield frame
    except av.error.FFmpegError as exc:
        if decoded == 0:
            raise
        logger.warning("%s: decoding stopped after %d frames (%s); sampling from those frames",
                       path, decoded, exc)


def _pyav_probe(path: Path) -> Timeline:
    """Count decodable frames by decoding (headers lie: XviD, cut files), with their times and the frame rate."""
    with _open_pyav(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or 0
        times = [frame.time for frame in _decoded_frames(path, container)]
    stamps = None if any(t is None for t in times) else times
    return Timeline.build(len(times), float(rate), stamps)


def _pyav_rgb(frame: Any, orientation: Orientation, max_pixels: int | None) -> np.ndarray:
    """One frame as upright RGB; over ``max_pixels`` it is scaled in the swscale conversion itself."""
    size = _capped_size(frame.height, frame.width, max_pixels)
    if size is None:
        rgb = frame.to_ndarray(format="rgb24")
    else:
        rgb = frame.to_ndarray(height=size[0], width=size[1], format="rgb24", interpolation="AREA")
    return orientation.apply(rgb)


def _read_pyav(path: Path, select: Selector, transform: Transform, max_pixels: int | None
               ) -> tuple[np.ndarray, np.ndarray]:
    timeline = _pyav_probe(path)
    if timeline.count == 0:
        raise VideoReadError(path, "no decodable frames")
    indices = select(timeline)
    wanted = {int(i) for i in indices}
    last = max(wanted)
    picked: dict[int, np.ndarray] = {}
    orientation: Orientation | None = None
    with _open_pyav(path) as container:
        for position, frame in enumerate(_decoded_frames(path, container)):
            if position in wanted:
                if orientation is None:  # the stream's; read once
                    orientation = Orientation.of_frame(frame)
                picked[position] = transform(_pyav_rgb(frame, orientation, max_pixels)[None])[0]
            if position >= last:
                break
    missing = wanted - picked.keys()
    if missing:
        raise VideoReadError(path, f"frames {sorted(missing)} not decodable on second pass")
    return np.stack([picked[int(i)] for i in indices]), indices


# ----------------------------------------------------------------------------- images

def _read_image(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise VideoReadError(path, "not a readable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# ----------------------------------------------------------------------------- public API

def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoReadError(path, "file does not exist")
    if not path.is_file():
        raise VideoReadError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise VideoReadError(path, "file is empty (0 bytes)")


def _with_backends(path: Path, backend: str, via_decord: Callable[[], BackendResult | None],
                   via_pyav: Callable[[], BackendResult]) -> tuple[BackendResult, str]:
    """Run decord first (unless told otherwise), PyAV where decord declines or fails; name the one that served."""
    decord_error: Exception | None = None
    if backend in ("auto", "decord"):
        try:
            result = via_decord()
            if result is not None:
                return result, "decord"
        except VideoReadError:
            raise
        except Exception as exc:  # decord raises bare RuntimeError/DECORDError subclasses
            if backend == "decord":
                raise VideoReadError(path, f"decord failed: {exc}") from exc
            decord_error = exc
            logger.debug("%s: decord failed (%s), trying PyAV", path, exc)
    try:
        return via_pyav(), "pyav"
    except VideoReadError:
        raise
    except Exception as exc:  # av.error.FFmpegError and friends
        detail = f"PyAV failed: {exc}"
        if decord_error is not None:
            detail = f"decord failed: {decord_error}; {detail}"
        raise VideoReadError(path, detail) from exc


def _decode(path: Path, select: Selector, backend: str, transform: Transform,
            max_pixels: int | None) -> tuple[np.ndarray, np.ndarray, str]:
    """Run the chosen backend(s); return (transformed) frames, indices and the backend that served them."""
    (frames, indices), used = _with_backends(
        path, backend,
        lambda: _read_decord(path, select, check_timestamps=backend == "auto", transform=transform,
                             max_pixels=max_pixels),
        lambda: _read_pyav(path, select, transform, max_pixels))
    return frames, indices, used


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")


def sample_frames(path: str | os.PathLike, num_frames: int | None = 8,
                  sampling: str = "uniform", fps: float | None = None,
                  height: int | None = None, width: int | None = None,
                  rng: np.random.Generator | int | None = None,
                  backend: str = "auto", start: float | None = None,
                  end: float | None = None, max_pixels: int | None = DEFAULT_MAX_DECODE_PIXELS,
                  min_frames: int | None = None, return_times: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read sampled frames of a video as uint8 RGB (T, H, W, 3) plus their int64 indices (or times).

    sampling: "uniform" takes the frame showing at the centre of each of ``num_frames``
    equal time slices (deterministic; captioning and evaluation; at a constant frame rate
    that is the centre frame of equal index ranges; see ``uniform_time_indices``);
    "headtail" is the random training sampling of the BLIP-2 video captioner (half from
    each half of the frames, see ``headtail_indices``; ``rng`` is a Generator or seed,
    None for fresh randomness). fps: when given, sample at that rate over the whole
    duration as the timestamps measure it (Qwen2-VL style): ``round(duration * fps)``
    frames, at least 1 (at least ``min_frames`` when given: Qwen3-VL's 4 for a short clip, spread over
    its duration), at most ``num_frames`` unless that is None, placed by ``sampling``.
    The count can be odd; a model that needs an even count (Qwen2-VL's temporal patch of 2)
    rounds it itself. ``num_frames=None`` without fps reads every frame. A video shorter
    than requested (or a frame showing longer than one slice) repeats indices (still
    sorted), so T is always the requested count. height/width resize (one alone keeps the aspect).
    start/end (seconds from the first frame; None: the video's start or end) restrict
    all of this to that segment, without cutting the file: the frames whose centre lies
    in ``[start, end)`` (see ``Timeline.frame_range``); indices stay those of the whole
    video. A segment outside the video or holding no frame raises SegmentError.
    A still image (.jpg .jpeg .png .bmp .webp) is a one-frame video: T copies of it
    (one copy under fps sampling), indices all 0; it has no segments. Frames are decoded
    in chunks and resized chunk by chunk, so memory stays at the output size plus one chunk.
    max_pixels: frames with more pixels (displayed height * width) are scaled down, aspect
    kept, inside the decoder before height/width apply (None: never; images are not capped).
    backend: "auto" (decord, PyAV where decord is unreliable or fails), "decord", "pyav".
    return_times: the second array is the frames' start times (float64 seconds, see ``Timeline``)
    instead of their indices, counted from the first frame of the segment (of the video when
    there is none): the segment is timed as a clip of its own, as Qwen's processors time the clip
    they are given. A still image, or a video with neither timestamps nor a frame rate, gives zeros.
    Raises VideoReadError for any unreadable file, ValueError for bad arguments.
    """
    check_sampling_args(num_frames, sampling, fps, max_pixels, min_frames)
    check_segment_args(start, end)
    _check_backend(backend)
    path = Path(path)
    _check_file(path)
    whole = start is None and end is None
    span: dict[str, Any] = {}  # the timeline and the span's first frame, for the times

    def select(timeline: Timeline) -> np.ndarray:
        lo, hi = (0, timeline.count) if whole else timeline.frame_range(path, start or 0.0, end)
        span.update(timeline=timeline, first=lo)
        duration = timeline.seconds(lo, hi)
        if fps is not None and duration is None:
            raise VideoReadError(path, "neither frame times nor a frame rate, so fps sampling is impossible")
        return select_indices(hi - lo, num_frames, sampling, fps, duration, rng,
                              timeline.uneven_starts(lo, hi), min_frames) + lo

    def transform(frames: np.ndarray) -> np.ndarray:
        return resize_frames(frames, height, width)

    if path.suffix.lower() in IMAGE_SUFFIXES:
        if not whole:
            raise SegmentError(path, "a still image has no time segments; leave start/end empty")
        image = transform(_read_image(path)[None])
        count = 1 if num_frames is None or fps is not None else num_frames  # fps: a still has no duration
        frames = np.repeat(image, count, axis=0)
        indices = np.zeros(count, dtype=np.int64)
        times = np.zeros(count)
    else:
        frames, indices, used = _decode(path, select, backend, transform, max_pixels)
        logger.debug("%s: %d frames via %s", path, len(indices), used)
        times = span["timeline"].times(indices, span["first"])
    return np.ascontiguousarray(frames), times if return_times else indices


def probe_duration(path: str | os.PathLike, backend: str = "auto") -> float:
    """The video's length in seconds (as segments count it), without decoding frames where decord serves.

    decord reads it from the container's index; PyAV, where "auto" falls back to it,
    decodes the stream once to count frames. A still image lasts 0 s.
    """
    _check_backend(backend)
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return 0.0
    timeline, _ = _with_backends(path, backend, lambda: _decord_timeline(path, backend == "auto"),
                                 lambda: _pyav_probe(path))
    if timeline.count == 0:
        raise VideoReadError(path, "no decodable frames")
    return timeline.duration(path)


def video_info(path: str | os.PathLike, backend: str = "auto") -> dict[str, Any]:
    """Frame count, frame rate, displayed size (rotation applied) and the backend that ``sample_frames`` would use.

    ``num_frames`` is what that backend can actually deliver (PyAV counts by decoding).
    """
    _check_backend(backend)
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        image = _read_image(path)
        return {"num_frames": 1, "fps": 0.0, "height": image.shape[0],
                "width": image.shape[1], "backend": "image"}
    seen: dict[str, Any] = {}

    def select(timeline: Timeline) -> np.ndarray:
        seen.update(num_frames=timeline.count, fps=float(timeline.fps))
        return np.zeros(1, dtype=np.int64)

    frames, _, used = _decode(path, select, backend, transform=lambda frames: frames, max_pixels=None)
    return {**seen, "height": frames.shape[1], "width": frames.shape[2], "backend": used}
