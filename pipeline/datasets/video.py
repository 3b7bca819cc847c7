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
adjacent segments share no frame and together hold every frame. Every
failure (missing, empty, truncated beyond use, corrupt, undecodable) surfaces as
``VideoReadError`` naming the file; a truncated file whose beginning is still readable
(e.g. an AVI cut short) yields the frames of that beginning, as players do.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import cv2
import numpy as np

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
SAMPLINGS = ("uniform", "headtail")
BACKENDS = ("auto", "decord", "pyav")

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
        """How long the last frame shows: one frame period, or the last gap when the rate is unknown."""
        if self.fps > 0:
            return 1.0 / self.fps
        return float(starts[-1] - starts[-2]) if len(starts) > 1 else 0.0

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


def _frame_count_for_fps(num_available: int, video_fps: float, fps: float,
                         num_frames: int | None) -> int:
    """How many frames sampling at ``fps`` over the whole video gives (at least one)."""
    count = max(1, int(round(num_available / video_fps * fps)))
    return count if num_frames is None else min(count, num_frames)


def check_sampling_args(num_frames: int | None, sampling: str, fps: float | None) -> None:
    """Reject bad arguments up front, so they are never mistaken for a bad file."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; choose from {SAMPLINGS}")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")


def select_indices(num_available: int, num_frames: int | None, sampling: str,
                   fps: float | None, video_fps: float,
                   rng: np.random.Generator | int | None) -> np.ndarray:
    """Frame indices (sorted int64) for one video of ``num_available`` frames.

    ``video_fps`` is only used with ``fps`` and must then be positive.
    """
    check_sampling_args(num_frames, sampling, fps)
    if num_available < 1:
        raise ValueError("a video needs at least one frame")
    if fps is not None:
        if video_fps <= 0:
            raise ValueError("the video reports no frame rate, so fps sampling is impossible")
        count = _frame_count_for_fps(num_available, video_fps, fps, num_frames)
    elif num_frames is None:
        count = num_available
    else:
        count = num_frames
    if sampling == "uniform":
        return uniform_indices(num_available, count)
    return headtail_indices(num_available, count, np.random.default_rng(rng))


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

def _open_decord(path: Path) -> Any:
    import decord

    return decord.VideoReader(str(path), num_threads=1)


def _decord_starts(reader: Any) -> np.ndarray:
    count = len(reader)
    return reader.get_frame_timestamp(np.arange(count))[:, 0] if count else np.zeros(0)


def decord_timestamps_reliable(reader: Any) -> bool:
    """Say whether decord's per-frame start times exist and strictly increase.

    decord seeks by these timestamps; where the container gives none (AVI + MPEG-4 part 2
    with B-frames, e.g. XviD) they come back hugely negative and seeking goes wrong.
    """
    return _increasing(_decord_starts(reader))


def _open_decord_timeline(path: Path, check_timestamps: bool) -> tuple[Any, Timeline] | None:
    """decord's reader and timeline, or None when its random access cannot be trusted here."""
    reader = _open_decord(path)
    starts = _decord_starts(reader)
    if check_timestamps and not _increasing(starts):
        logger.debug("%s: decord timestamps missing or unordered, using PyAV", path)
        return None
    return reader, Timeline.build(len(reader), reader.get_avg_fps(), starts)


DECODE_CHUNK = 32  # frames decoded at full size at once; each chunk is resized before the next


def _read_decord(path: Path, select: Selector, check_timestamps: bool, transform: Transform
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """Frames via decord, or None when decord's random access cannot be trusted here."""
    opened = _open_decord_timeline(path, check_timestamps)
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

def _pyav_frames(path: Path) -> Iterator[Any]:
    """Yield the first video stream's decoded frames in order (sequential, no seeks)."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoReadError(path, "no video stream")
        for frame in container.decode(video=0):
            yield frame


def _pyav_probe(path: Path) -> Timeline:
    """Count decodable frames by decoding (headers lie, e.g. XviD), with their times and the frame rate."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoReadError(path, "no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or 0
        times = [frame.time for frame in container.decode(stream)]
    stamps = None if any(t is None for t in times) else times
    return Timeline.build(len(times), float(rate), stamps)


def _read_pyav(path: Path, select: Selector, transform: Transform) -> tuple[np.ndarray, np.ndarray]:
    timeline = _pyav_probe(path)
    if timeline.count == 0:
        raise VideoReadError(path, "no decodable frames")
    indices = select(timeline)
    wanted = {int(i) for i in indices}
    last = max(wanted)
    picked: dict[int, np.ndarray] = {}
    for position, frame in enumerate(_pyav_frames(path)):
        if position in wanted:
            picked[position] = transform(frame.to_ndarray(format="rgb24")[None])[0]
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


def _decode(path: Path, select: Selector, backend: str, transform: Transform
            ) -> tuple[np.ndarray, np.ndarray, str]:
    """Run the chosen backend(s); return (transformed) frames, indices and the backend that served them."""
    (frames, indices), used = _with_backends(
        path, backend,
        lambda: _read_decord(path, select, check_timestamps=backend == "auto", transform=transform),
        lambda: _read_pyav(path, select, transform))
    return frames, indices, used


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")


def sample_frames(path: str | os.PathLike, num_frames: int | None = 8,
                  sampling: str = "uniform", fps: float | None = None,
                  height: int | None = None, width: int | None = None,
                  rng: np.random.Generator | int | None = None,
                  backend: str = "auto", start: float | None = None,
                  end: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read sampled frames of a video as uint8 RGB (T, H, W, 3) plus their int64 indices.

    sampling: "uniform" takes the centre frame of ``num_frames`` equal segments
    (deterministic; captioning and evaluation); "headtail" is the random training
    sampling of the BLIP-2 video captioner (half from each half of the video, see
    ``headtail_indices``; ``rng`` is a Generator or seed, None for fresh randomness).
    fps: when given, sample at that rate over the whole duration (Qwen2-VL style):
    ``round(duration * fps)`` frames, at least 1, at most ``num_frames`` unless that is
    None, placed by ``sampling``. The count can be odd; a model that needs an even count
    (Qwen2-VL's temporal patch of 2) rounds it itself. ``num_frames=None`` without fps
    reads every frame. A video shorter than requested repeats indices (still sorted), so
    T is always the requested count. height/width resize (one alone keeps the aspect).
    start/end (seconds from the first frame; None: the video's start or end) restrict
    all of this to that segment, without cutting the file: the frames whose centre lies
    in ``[start, end)`` (see ``Timeline.frame_range``); indices stay those of the whole
    video. A segment outside the video or holding no frame raises SegmentError.
    A still image (.jpg .jpeg .png .bmp .webp) is a one-frame video: T copies of it
    (one copy under fps sampling), indices all 0; it has no segments. Frames are decoded
    in chunks and resized chunk by chunk, so memory stays at the output size plus one chunk.
    backend: "auto" (decord, PyAV where decord is unreliable or fails), "decord", "pyav".
    Raises VideoReadError for any unreadable file, ValueError for bad arguments.
    """
    check_sampling_args(num_frames, sampling, fps)
    check_segment_args(start, end)
    _check_backend(backend)
    path = Path(path)
    _check_file(path)
    whole = start is None and end is None

    def select(timeline: Timeline) -> np.ndarray:
        if fps is not None and timeline.fps <= 0:
            raise VideoReadError(path, "no frame rate, so fps sampling is impossible")
        lo, hi = (0, timeline.count) if whole else timeline.frame_range(path, start or 0.0, end)
        return select_indices(hi - lo, num_frames, sampling, fps, timeline.fps, rng) + lo

    def transform(frames: np.ndarray) -> np.ndarray:
        return resize_frames(frames, height, width)

    if path.suffix.lower() in IMAGE_SUFFIXES:
        if not whole:
            raise SegmentError(path, "a still image has no time segments; leave start/end empty")
        image = transform(_read_image(path)[None])
        count = 1 if num_frames is None or fps is not None else num_frames  # fps: a still has no duration
        frames = np.repeat(image, count, axis=0)
        indices = np.zeros(count, dtype=np.int64)
    else:
        frames, indices, used = _decode(path, select, backend, transform)
        logger.debug("%s: %d frames via %s", path, len(indices), used)
    return np.ascontiguousarray(frames), indices


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
    """Frame count, frame rate, size and the backend that ``sample_frames`` would use.

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

    frames, _, used = _decode(path, select, backend, transform=lambda frames: frames)
    return {**seen, "height": frames.shape[1], "width": frames.shape[2], "backend": used}
