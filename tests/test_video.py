"""Frame-correctness tests for pipeline.datasets.video, on videos whose frames carry their index."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from pipeline.datasets import video
from pipeline.datasets.video import (
    DEFAULT_MAX_DECODE_PIXELS,
    VideoReadError,
    decord_timestamps_reliable,
    headtail_indices,
    sample_frames,
    video_info,
)
from tests.video_factory import (
    append_ts_garbage,
    decoded_indices,
    ffmpeg_decode,
    read_index,
    remux,
    write_corrupt,
    write_display_matrix,
    write_empty,
    write_image,
    write_index_video,
    write_test_pattern,
    write_truncated,
    write_vfr_index_video,
)

NUM_FRAMES = 40
WIDTH, HEIGHT = 96, 64

# variant -> (codec, bframes); the backend "auto" should pick for it
VARIANTS = {
    "h264": ("h264", False),
    "h264-bframes": ("h264", True),
    "mpeg4": ("mpeg4", False),
    "mpeg4-bframes": ("mpeg4", True),
    "xvid": ("xvid", True),
    "vp9": ("vp9", False),
    "mjpeg": ("mjpeg", False),
}
EXPECTED_BACKEND = {"mpeg4-bframes": "pyav", "xvid": "pyav"}
# AVI + MPEG-4 part 2 + B-frames: no timestamps, decord's random access goes wrong
DECORD_UNRELIABLE = ("mpeg4-bframes", "xvid")


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("videos")


@pytest.fixture(scope="session")
def make_video(video_dir: Path):
    """Encode each variant once per session."""
    cache: dict[str, Path] = {}

    def make(variant: str) -> Path:
        if variant not in cache:
            codec, bframes = VARIANTS[variant]
            cache[variant] = write_index_video(video_dir / variant, NUM_FRAMES, codec=codec,
                                               bframes=bframes, width=WIDTH, height=HEIGHT)
        return cache[variant]

    return make


def expected_uniform(num_available: int, count: int) -> list[int]:
    """Centre of each of ``count`` equal segments, written independently of the module."""
    return [int(np.floor((k + 0.5) * num_available / count)) for k in range(count)]


def barcodes(frames: np.ndarray) -> list[int]:
    return [read_index(frame) for frame in frames]


def check_truth(variant: str, truth: list[int]) -> None:
    """The ground truth itself is sane: all frames in order (xvid may lose 1-2 at the end)."""
    if variant == "xvid":
        assert NUM_FRAMES - 2 <= len(truth) <= NUM_FRAMES
        assert truth == sorted(set(truth)) and truth[:NUM_FRAMES - 4] == list(range(NUM_FRAMES - 4))
    else:
        assert truth == list(range(NUM_FRAMES))


@pytest.mark.parametrize("count", [1, 4, 8, 50])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_uniform_returns_exactly_the_requested_frames(make_video, variant: str, count: int) -> None:
    path = make_video(variant)
    truth = decoded_indices(path)
    check_truth(variant, truth)
    frames, indices = sample_frames(path, num_frames=count)
    assert frames.shape == (count, HEIGHT, WIDTH, 3) and frames.dtype == np.uint8
    assert indices.dtype == np.int64
    assert indices.tolist() == expected_uniform(len(truth), count)
    assert barcodes(frames) == [truth[i] for i in indices]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pyav_backend_is_correct_everywhere(make_video, variant: str) -> None:
    path = make_video(variant)
    truth = decoded_indices(path)
    frames, indices = sample_frames(path, num_frames=8, sampling="headtail", rng=3,
                                    backend="pyav")
    assert barcodes(frames) == [truth[i] for i in indices]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_auto_backend_choice(make_video, variant: str) -> None:
    import decord

    path = make_video(variant)
    reader = decord.VideoReader(str(path), num_threads=1)
    assert decord_timestamps_reliable(reader) == (variant not in DECORD_UNRELIABLE)
    info = video_info(path)
    assert info["backend"] == EXPECTED_BACKEND.get(variant, "decord")
    assert info["num_frames"] == len(decoded_indices(path))
    assert (info["height"], info["width"], info["fps"]) == (HEIGHT, WIDTH, 10.0)


@pytest.mark.parametrize("variant", DECORD_UNRELIABLE)
def test_decord_alone_returns_wrong_frames_here(make_video, variant: str) -> None:
    """Documents why "auto" avoids decord on these files: its answer is not the frame asked for."""
    path = make_video(variant)
    truth = decoded_indices(path)
    frames, indices = sample_frames(path, num_frames=8, backend="decord")
    wrong = [(int(i), got) for i, got in zip(indices, barcodes(frames)) if got != truth[i]]
    if not wrong:
        pytest.skip(f"decord happened to return the right frames for {variant}")
    assert len(wrong) >= 1


def test_headtail_properties(make_video) -> None:
    path = make_video("h264")
    frames, indices = sample_frames(path, num_frames=8, sampling="headtail", rng=0)
    assert indices.tolist() == sorted(indices.tolist())
    assert len(set(indices.tolist())) == 8
    assert all(0 <= i < NUM_FRAMES for i in indices)
    assert sum(i < NUM_FRAMES // 2 for i in indices) == 4
    assert barcodes(frames) == indices.tolist()
    _, same = sample_frames(path, num_frames=8, sampling="headtail", rng=0)
    assert same.tolist() == indices.tolist()
    draws = {tuple(sample_frames(path, num_frames=8, sampling="headtail", rng=seed)[1])
             for seed in range(1, 6)}
    assert len(draws | {tuple(indices)}) > 1


def test_headtail_odd_count_and_short_videos() -> None:
    rng = np.random.default_rng(0)
    odd = headtail_indices(40, 5, rng)
    assert len(odd) == 5 and sum(odd < 20) == 2 and odd.tolist() == sorted(odd.tolist())
    short = headtail_indices(3, 8, rng)
    assert len(short) == 8 and short.tolist() == sorted(short.tolist())
    assert set(short.tolist()) == {0, 1, 2} and sum(short < 1) == 4
    assert headtail_indices(1, 4, rng).tolist() == [0, 0, 0, 0]


def test_short_video_repeats_sorted_indices(video_dir: Path) -> None:
    path = write_index_video(video_dir / "three", 3, codec="h264")
    frames, indices = sample_frames(path, num_frames=8)
    assert indices.tolist() == [0, 0, 0, 1, 1, 2, 2, 2] == expected_uniform(3, 8)
    assert barcodes(frames) == indices.tolist()
    frames, indices = sample_frames(path, num_frames=8, sampling="headtail", rng=1)
    assert indices.tolist() == sorted(indices.tolist()) and barcodes(frames) == indices.tolist()


@pytest.mark.parametrize(("fps", "num_frames", "count"),
                         [(2, None, 8), (2, 5, 5), (10, None, 40), (0.1, None, 1), (2.5, 16, 10)])
def test_fps_sampling_count(make_video, fps: float, num_frames: int | None, count: int) -> None:
    path = make_video("h264")  # 40 frames at 10 fps: 4 s
    frames, indices = sample_frames(path, num_frames=num_frames, fps=fps)
    assert len(indices) == count == len(frames)
    assert indices.tolist() == expected_uniform(NUM_FRAMES, count)
    assert barcodes(frames) == indices.tolist()


def test_all_frames_when_no_count(make_video) -> None:
    frames, indices = sample_frames(make_video("vp9"), num_frames=None)
    assert indices.tolist() == list(range(NUM_FRAMES)) == barcodes(frames)


@pytest.mark.parametrize(("height", "width", "shape"),
                         [(32, 48, (32, 48)), (32, None, (32, 48)), (None, 192, (128, 192)),
                          (50, 50, (50, 50))])
def test_resize(make_video, height: int | None, width: int | None,
                shape: tuple[int, int]) -> None:
    frames, indices = sample_frames(make_video("xvid"), num_frames=4, height=height, width=width)
    assert frames.shape == (4, *shape, 3)
    truth = decoded_indices(make_video("xvid"))
    assert barcodes(frames) == [truth[i] for i in indices]


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".png", ".bmp", ".webp"])
def test_image_is_a_repeated_single_frame(tmp_path: Path, suffix: str) -> None:
    path = write_image(tmp_path / f"still{suffix}", index=613)
    frames, indices = sample_frames(path, num_frames=4, height=32)
    assert frames.shape == (4, 32, 48, 3) and indices.tolist() == [0, 0, 0, 0]
    assert barcodes(frames) == [613] * 4
    assert video_info(path)["num_frames"] == 1


def _bad_files(tmp_path: Path, good_mp4: Path, good_avi: Path) -> dict[str, Path]:
    return {
        "missing": tmp_path / "missing.mp4",
        "empty": write_empty(tmp_path / "empty.mp4"),
        "empty-image": write_empty(tmp_path / "empty.jpg"),
        "truncated-mp4": write_truncated(good_mp4, tmp_path / "cut.mp4",
                                         good_mp4.stat().st_size // 2),
        "truncated-avi-header": write_truncated(good_avi, tmp_path / "cut.avi", 300),
        "corrupt-mp4": write_corrupt(tmp_path / "noise.mp4"),
        "corrupt-avi": write_corrupt(tmp_path / "noise.avi", seed=1),
        "corrupt-webm": write_corrupt(tmp_path / "noise.webm", seed=2),
        "corrupt-jpg": write_corrupt(tmp_path / "noise.jpg", seed=3),
        "directory": tmp_path,
    }


@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
def test_unreadable_files_raise_video_read_error(tmp_path: Path, make_video,
                                                 backend: str) -> None:
    bad = _bad_files(tmp_path, make_video("h264"), make_video("xvid"))
    for name, path in bad.items():
        start = time.monotonic()
        with pytest.raises(VideoReadError) as info:
            sample_frames(path, num_frames=4, backend=backend)
        assert str(path) in str(info.value), name
        assert info.value.path == str(path)
        assert time.monotonic() - start < 5, f"{name} took too long"


def test_bad_arguments_are_value_errors(make_video) -> None:
    path = make_video("h264")
    for kwargs in ({"sampling": "random"}, {"num_frames": 0}, {"fps": 0}, {"backend": "cv2"},
                   {"max_pixels": 0}):
        with pytest.raises(ValueError):
            sample_frames(path, **kwargs)


def test_truncated_avi_with_readable_start_gives_its_frames(tmp_path: Path, make_video) -> None:
    """As players do: an AVI cut in half still yields the frames of its first half."""
    good = make_video("xvid")
    path = write_truncated(good, tmp_path / "half.avi", good.stat().st_size // 2)
    truth = decoded_indices(path)
    assert 5 < len(truth) < NUM_FRAMES
    frames, indices = sample_frames(path, num_frames=4)
    assert indices.tolist() == expected_uniform(len(truth), 4)
    assert barcodes(frames) == [truth[i] for i in indices]


# ----------------------------------------------------------------------------- rotation

def assert_looks_like(frames: np.ndarray, reference: np.ndarray, tolerance: float = 3.0) -> None:
    """Same shape and, frame by frame, a mean absolute difference under ``tolerance``.

    Decoders' YUV-to-RGB conversions differ slightly, so pixels are not compared exactly.
    """
    assert frames.shape == reference.shape
    diffs = np.abs(frames.astype(np.int16) - reference.astype(np.int16)).mean(axis=(1, 2, 3))
    assert diffs.max() < tolerance, diffs


@pytest.fixture(scope="module")
def rotated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 96x64 test pattern with B-frames; rotated 90 degrees by metadata; and that cut by an MP4 edit list.

    (decord 0.6 fails on rotated frames 48 rows high, where "auto" falls back to PyAV.)
    """
    folder = tmp_path_factory.mktemp("rotated")
    src = write_test_pattern(folder / "src.mp4", 96, 64, seconds=2)
    rot = remux(src, folder / "rot.mp4", ["-metadata:s:v:0", "rotate=90"])
    return {"src": src, "rot": rot, "rot_edit": remux(rot, folder / "rot_edit.mp4", input_args=["-ss", "0.5"])}


@pytest.mark.parametrize(("name", "backend"), [("rot", "auto"), ("rot", "decord"), ("rot", "pyav"),
                                               ("rot_edit", "auto"), ("rot_edit", "pyav")])
def test_rotated_video_comes_back_upright(rotated, name: str, backend: str) -> None:
    """As ffmpeg displays it, whichever backend decodes (auto uses PyAV for the edit list)."""
    path = rotated[name]
    frames, _ = sample_frames(path, num_frames=None, backend=backend)
    assert_looks_like(frames, ffmpeg_decode(path))
    info = video_info(path, backend=backend)
    assert (info["height"], info["width"]) == (96, 64)
    if name == "rot_edit":
        assert info["backend"] == "pyav"
        whole, _ = sample_frames(rotated["rot"], num_frames=None)
        assert_looks_like(frames, whole[len(whole) - len(frames):])  # the edit list cuts the start


@pytest.mark.parametrize(("degrees", "hflip", "vflip"),
                         [(180, False, False), (270, False, False), (0, True, False), (0, False, True),
                          (90, True, False), (90, False, True)])
def test_display_matrix_rotations_and_flips_match_ffmpeg(rotated, tmp_path: Path, degrees: int,
                                                         hflip: bool, vflip: bool) -> None:
    path = write_display_matrix(rotated["src"], tmp_path / "matrix.mp4", degrees, hflip, vflip)
    reference = ffmpeg_decode(path)
    unrotated, _ = sample_frames(rotated["src"], num_frames=None)
    assert reference.shape != unrotated.shape or np.abs(reference.astype(int) - unrotated).mean() > 20
    for backend in ("pyav",) if hflip or vflip else ("pyav", "decord"):  # decord ignores mirror flips
        frames, _ = sample_frames(path, num_frames=None, backend=backend)
        assert_looks_like(frames, reference)


# ----------------------------------------------------------------------------- variable frame rate

VFR_PIECES = ((50, 25), (30, 5))  # frames 0-49 over 0-2 s, frames 50-79 over 2-8 s


@pytest.fixture(scope="module")
def vfr_videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[float]]]:
    folder = tmp_path_factory.mktemp("vfr")
    return {suffix: write_vfr_index_video(folder / f"vfr{suffix}", VFR_PIECES) for suffix in (".mp4", ".mkv")}


def showing_at(starts: list[float], instants: list[float]) -> list[int]:
    """The frame on screen at each instant, written independently of the module."""
    return [max(i for i, t in enumerate(starts) if t <= s) for s in instants]


def centres(begin: float, end: float, count: int) -> list[float]:
    return [begin + (k + 0.5) * (end - begin) / count for k in range(count)]


@pytest.mark.parametrize("backend", ["auto", "pyav"])
@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_variable_frame_rate_is_sampled_evenly_in_time(vfr_videos, suffix: str, backend: str) -> None:
    path, starts = vfr_videos[suffix]
    end = starts[-1] + (starts[-1] - starts[-2])  # 8 s: the last frame lasts as long as the one before
    frames, indices = sample_frames(path, num_frames=8, backend=backend)
    assert indices.tolist() == showing_at(starts, centres(0, end, 8)) == [12, 37, 52, 57, 62, 67, 72, 77]
    assert barcodes(frames) == indices.tolist()
    frames, indices = sample_frames(path, num_frames=None, fps=4, backend=backend)
    assert indices.tolist() == showing_at(starts, centres(0, end, 32))  # 8 s at 4 fps, not 80 frames / 25 fps
    assert barcodes(frames) == indices.tolist()
    _, indices = sample_frames(path, num_frames=5, start=1.0, end=6.0, backend=backend)
    assert indices.tolist() == showing_at(starts, centres(1.0, 6.0, 5))  # frames 25-69 span 1-6 s


@pytest.fixture(scope="module")
def mkv_30fps(video_dir: Path) -> Path:
    """Constant 30 fps whose times MKV rounds to milliseconds (0, 33, 67, 100 ...)."""
    return write_index_video(video_dir / "cfr30.mkv", 60, fps=30)


@pytest.mark.parametrize("backend", ["auto", "pyav"])
@pytest.mark.parametrize("count", [6, 8, 20])
def test_constant_rate_with_rounded_times_keeps_index_uniform(mkv_30fps: Path, backend: str, count: int) -> None:
    """Count 6 puts the instants exactly on frame starts, where rounded times alone would pick the frame before."""
    frames, indices = sample_frames(mkv_30fps, num_frames=count, backend=backend)
    assert indices.tolist() == expected_uniform(60, count)
    assert barcodes(frames) == indices.tolist()


# ----------------------------------------------------------------------------- truncated files, trailing garbage

def test_cut_mp4_is_sampled_over_the_frames_that_decode(tmp_path: Path, make_video, caplog) -> None:
    """Index first (as streamed files are), so the container still lists 40 frames after the cut."""
    whole = remux(make_video("h264"), tmp_path / "whole.mp4", ["-movflags", "+faststart"])
    path = write_truncated(whole, tmp_path / "cut.mp4", whole.stat().st_size - 400)
    truth = decoded_indices(path, stop_at_error=True)
    assert 20 < len(truth) < NUM_FRAMES
    for backend in ("auto", "pyav"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.datasets.video"):
            frames, indices = sample_frames(path, num_frames=32, backend=backend)
        assert indices.tolist() == expected_uniform(len(truth), 32)
        assert barcodes(frames) == [truth[i] for i in indices]
        assert f"decoding stopped after {len(truth)} frames" in caplog.text


def test_mp4_cut_before_its_first_frame_is_an_error(tmp_path: Path, make_video) -> None:
    whole = remux(make_video("h264"), tmp_path / "whole.mp4", ["-movflags", "+faststart"])
    data = whole.read_bytes()
    path = write_truncated(whole, tmp_path / "cut.mp4", data.index(b"mdat") + 20)
    for backend in ("auto", "decord", "pyav"):
        with pytest.raises(VideoReadError, match="cut.mp4"):
            sample_frames(path, num_frames=4, backend=backend)


def test_ts_with_trailing_garbage_ends_at_the_garbage(tmp_path: Path, caplog) -> None:
    path = append_ts_garbage(write_index_video(tmp_path / "clip.ts", NUM_FRAMES, codec="h264"), seed=1)
    with pytest.raises(av.error.FFmpegError):  # the garbage does reach the decoder
        decoded_indices(path)
    truth = decoded_indices(path, stop_at_error=True)
    assert truth == list(range(NUM_FRAMES))
    for backend in ("auto", "pyav"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.datasets.video"):
            frames, indices = sample_frames(path, num_frames=8, backend=backend)
        assert indices.tolist() == expected_uniform(NUM_FRAMES, 8)
        assert barcodes(frames) == indices.tolist()
        assert "decoding stopped after 40 frames" in caplog.text


# ----------------------------------------------------------------------------- max_pixels

@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three 2560x1440 frames, and the same shown as portrait (rotate=90)."""
    folder = tmp_path_factory.mktemp("large")
    src = write_test_pattern(folder / "large.mp4", 2560, 1440, seconds=0.3, bframes=False)
    return {"landscape": src, "portrait": remux(src, folder / "portrait.mp4", ["-metadata:s:v:0", "rotate=90"])}


@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize("name", ["landscape", "portrait"])
def test_max_pixels_scales_frames_inside_the_decode(large, monkeypatch, name: str, backend: str) -> None:
    path, cap = large[name], 100_000
    full, _ = sample_frames(path, num_frames=2, backend=backend, max_pixels=None)
    height, width = full.shape[1:3]
    assert height * width == 2560 * 1440
    frames, _ = sample_frames(path, num_frames=2, backend=backend, max_pixels=cap)
    h, w = frames.shape[1:3]
    assert h * w <= cap < (h + 1) * (w + 1)
    assert abs(h * width / height - w) <= 1  # aspect kept to a pixel
    reference = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in full])
    assert_looks_like(frames, reference, tolerance=4)

    seen: list[tuple[int, ...]] = []
    resize = video.resize_frames

    def recording(chunk: np.ndarray, *args) -> np.ndarray:
        seen.append(chunk.shape[1:3])
        return resize(chunk, *args)

    monkeypatch.setattr(video, "resize_frames", recording)
    resized, _ = sample_frames(path, num_frames=2, backend=backend, max_pixels=cap, height=100)
    assert resized.shape[1] == 100 and set(seen) == {(h, w)}  # decoded small: full frames never reach a chunk
    default, _ = sample_frames(path, num_frames=1, backend=backend)
    assert default.shape[1] * default.shape[2] == DEFAULT_MAX_DECODE_PIXELS
    assert default.shape[1] < default.shape[2] if name == "landscape" else default.shape[1] > default.shape[2]


def test_decoding_does_not_import_mindspore(make_video) -> None:
    """Decode runs in spawned worker processes, which must stay light."""
    code = ("import sys; from pipeline.datasets.video import sample_frames; "
            "[sample_frames(sys.argv[1], num_frames=2, backend=b) for b in ('decord', 'pyav')]; "
            "assert 'mindspore' not in sys.modules, 'mindspore imported'")
    subprocess.run([sys.executable, "-c", code, str(make_video("h264"))], check=True,
                   cwd=Path(__file__).resolve().parent.parent, timeout=120)
