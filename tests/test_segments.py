"""Segments of a file: parsing start/end/timestamp cells, exact frames per segment, and segment rows in a run."""
from __future__ import annotations

import csv
import logging
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.datasets.metadata import parse_time, parse_timestamp, row_segment
from pipeline.datasets.video import SegmentError, probe_duration, sample_frames
from tests.colour_captioner import colour_caption, main as colour_main
from tests.video_factory import (decoded_indices, ffmpeg_path, make_index_frame, read_index, write_image,
                                 write_index_video)

NUM_FRAMES, FPS = 40, 10  # 4 s
VARIANTS = {"h264": ("h264", False), "h264-bframes": ("h264", True), "xvid": ("xvid", True),
            "vp9": ("vp9", False), "mjpeg": ("mjpeg", False)}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("segments")
    return {name: write_index_video(folder / name, NUM_FRAMES, codec=codec, bframes=bframes, fps=FPS)
            for name, (codec, bframes) in VARIANTS.items()}


def in_segment(count: int, fps: float, start: float | None, end: float | None) -> list[int]:
    """Frames whose centre (i + 0.5) / fps lies in [start, end), written independently of the module."""
    low, high = start or 0.0, np.inf if end is None else end
    return [i for i in range(count) if low <= (i + 0.5) / fps < high]


def uniform_of(frames: list[int], count: int) -> list[int]:
    return [frames[int(np.floor((k + 0.5) * len(frames) / count))] for k in range(count)]


# ---------------------------------------------------------------- cells


@pytest.mark.parametrize(("text", "seconds"), [("12.5", 12.5), ("0", 0.0), (" 7 ", 7.0), ("00:00:01.000", 1.0),
                                               ("01:02:03.250", 3723.25), ("1:02.5", 62.5)])
def test_parse_time_accepts_seconds_and_timecodes(text, seconds):
    assert parse_time(text, "start") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["-1", "abc", "nan", "inf", "1:2:3:4", ""])
def test_parse_time_rejects_non_times_naming_the_cell(text):
    with pytest.raises(ValueError, match=r"start .* is not a time; write seconds >= 0"):
        parse_time(text, "start")


@pytest.mark.parametrize(("cell", "segment"), [
    ("('00:00:01.000', '00:00:05.500')", (1.0, 5.5)),
    ("[('00:00:01.000', '00:00:05.500')]", (1.0, 5.5)),
    ("(2, 3.5)", (2.0, 3.5)),
    ("('1.5', '2')", (1.5, 2.0)),
])
def test_parse_timestamp(cell, segment):
    assert parse_timestamp(cell) == pytest.approx(segment)


def test_parse_timestamp_errors_say_what_to_do():
    with pytest.raises(ValueError, match="holds 2 scenes.*--split-timestamp"):
        parse_timestamp("[('00:00:00.000', '00:00:01.000'), ('00:00:01.000', '00:00:02.000')]")
    with pytest.raises(ValueError, match="is not a \\(start, end\\) pair"):
        parse_timestamp("00:00:01.000")
    with pytest.raises(ValueError, match="is not a time"):
        parse_timestamp("('soon', '00:00:02.000')")


@pytest.mark.parametrize(("row", "segment"), [
    ({"path": "a"}, None),
    ({"path": "a", "start": "", "end": ""}, None),
    ({"path": "a", "start": "2", "end": ""}, (2.0, None)),
    ({"path": "a", "start": "", "end": "3"}, (0.0, 3.0)),
    ({"path": "a", "start": "1", "end": "3", "timestamp": ""}, (1.0, 3.0)),
    ({"path": "a", "timestamp": "('00:00:01.000', '00:00:02.500')", "start": ""}, (1.0, 2.5)),
    ({"path": "a", "timestamp": "(1, 3)", "window": "1", "start": "2", "end": "3"}, (2.0, 3.0)),  # a window row
])
def test_row_segment(row, segment):
    assert row_segment(row) == segment


@pytest.mark.parametrize(("row", "problem"), [
    ({"start": "5", "end": "2"}, "end 2 s is not after its start 5 s; fix the row's start/end"),
    ({"start": "5", "end": "5"}, "is not after its start"),
    ({"timestamp": "(3, 1)"}, "fix the row's timestamp"),
    ({"timestamp": "(1, 3)", "start": "1"}, "both a timestamp and start/end"),
])
def test_bad_row_segments(row, problem):
    with pytest.raises(ValueError, match=problem.replace("(", "\\(").replace(")", "\\)")):
        row_segment({"path": "a", **row})


# ---------------------------------------------------------------- frames


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(("start", "end"), [(0.3, 0.6), (1.0, None), (None, 0.55), (2.04, 2.14), (0.0, 3.5)])
def test_segment_returns_exactly_its_frames(videos, variant, start, end):
    path = videos[variant]
    truth = decoded_indices(path)
    expected = in_segment(len(truth), FPS, start, end)
    frames, indices = sample_frames(path, num_frames=None, start=start, end=end)
    assert indices.tolist() == expected
    assert [read_index(f) for f in frames] == [truth[i] for i in expected]
    frames, indices = sample_frames(path, num_frames=4, start=start, end=end)
    assert indices.tolist() == uniform_of(expected, 4)
    assert [read_index(f) for f in frames] == [truth[i] for i in indices]


@pytest.mark.parametrize("variant", ["h264", "xvid"])
def test_fps_sampling_counts_the_segment_only(videos, variant):
    frames, indices = sample_frames(videos[variant], num_frames=None, fps=2, start=1.0, end=3.0)
    assert indices.tolist() == uniform_of(list(range(10, 30)), 4)  # 2 s at 2 fps
    assert [read_index(f) for f in frames] == [decoded_indices(videos[variant])[i] for i in indices]


def test_adjacent_segments_share_no_frame_and_miss_none(videos):
    bounds = [0.0, 1.23, 2.71, None]
    pieces = [sample_frames(videos["h264"], num_frames=None, start=a, end=b)[1].tolist()
              for a, b in zip(bounds[:-1], bounds[1:])]
    assert sum(pieces, []) == list(range(NUM_FRAMES))


def write_vfr_video(path: Path) -> Path:
    """Frames 0-19 at 10 fps (0.0-1.9 s), then 20-39 at 5 fps (2.0-5.8 s)."""
    if ffmpeg_path() is None:
        pytest.skip("ffmpeg is not installed")
    raw = b"".join(make_index_frame(i).tobytes() for i in range(NUM_FRAMES))
    subprocess.run([ffmpeg_path(), "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo",
                    "-pix_fmt", "rgb24", "-s", "96x64", "-r", "10", "-i", "-",
                    "-vf", "settb=1/1000,setpts='if(lt(N,20),N*100,2000+(N-20)*200)'", "-fps_mode", "passthrough",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-bf", "0", str(path)],
                   input=raw, check=True, capture_output=True, timeout=60)
    return path


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_variable_frame_rate_uses_real_timestamps(tmp_path, backend):
    path = write_vfr_video(tmp_path / "vfr.mp4")
    frames, indices = sample_frames(path, num_frames=None, start=2.0, end=3.0, backend=backend)
    assert indices.tolist() == [20, 21, 22, 23, 24]  # at 2.0, 2.2, ... 2.8 s; not 2 s of the average rate
    assert [read_index(f) for f in frames] == [20, 21, 22, 23, 24]
    assert probe_duration(path, backend=backend) == pytest.approx(5.8, abs=0.25)


@pytest.mark.parametrize(("start", "end", "problem"), [
    (4.0, None, "starts after the video's last frame \\(the video lasts 4 s\\)"),
    (3.96, None, "starts after the video's last frame"),
    (5.0, 6.0, "starts after the video's last frame"),
    (3.0, 4.2, "ends after the end of the video \\(4 s\\)"),
    (0.31, 0.34, "holds no frame"),
])
def test_segment_outside_the_video_is_a_segment_error(videos, start, end, problem):
    path = videos["h264"]
    with pytest.raises(SegmentError, match=problem) as err:
        sample_frames(path, num_frames=4, start=start, end=end)
    assert str(path) in str(err.value)


def test_end_within_one_frame_of_the_video_end_is_the_end(videos):
    _, indices = sample_frames(videos["h264"], num_frames=None, start=3.5, end=4.05)
    assert indices.tolist() == list(range(35, 40))


def test_segment_arguments_and_images(tmp_path, videos):
    with pytest.raises(ValueError, match="not after its start"):
        sample_frames(videos["h264"], start=2.0, end=1.0)
    with pytest.raises(ValueError, match="start must be a finite number"):
        sample_frames(videos["h264"], start=-1.0)
    image = write_image(tmp_path / "still.png", index=5)
    with pytest.raises(SegmentError, match="still image has no time segments"):
        sample_frames(image, start=0.0, end=1.0)
    assert probe_duration(image) == 0.0
    assert probe_duration(videos["h264"]) == pytest.approx(4.0, abs=1e-6)
    assert probe_duration(videos["xvid"]) == pytest.approx(len(decoded_indices(videos["xvid"])) / FPS)


# ---------------------------------------------------------------- in a run


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_run_captions_each_segment_of_a_shared_file(tmp_path, monkeypatch, caplog):
    write_index_video(tmp_path / "a.mp4", NUM_FRAMES, fps=FPS)
    write_index_video(tmp_path / "b.mp4", 20, fps=FPS)
    rows = [
        {"path": "a.mp4", "start": "0", "end": "1", "timestamp": "", "id": "1"},
        {"path": "a.mp4", "start": "1", "end": "", "timestamp": "", "id": "2"},
        {"path": "a.mp4", "start": "", "end": "", "timestamp": "('00:00:02.000', '00:00:03.500')", "id": "3"},
        {"path": "a.mp4", "start": "0", "end": "1", "timestamp": "", "id": "dup"},
        {"path": "a.mp4", "start": "", "end": "", "timestamp": "", "id": "whole"},
        {"path": "a.mp4", "start": "3", "end": "2", "timestamp": "", "id": "backwards"},
        {"path": "b.mp4", "start": "2.5", "end": "", "timestamp": "", "id": "outside"},
    ]
    csv_path = tmp_path / "meta.csv"
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    log = tmp_path / "calls.txt"
    monkeypatch.setenv("CAPTION_CALL_LOG", str(log))
    with caplog.at_level(logging.WARNING):
        colour_main([str(csv_path), "--device", "CPU", "--bs", "2"])
    assert any("1 duplicate row(s)" in r.message for r in caplog.records)

    out = read_rows(tmp_path / "meta_caption.csv")
    assert [r["id"] for r in out] == ["1", "2", "3", "whole", "backwards", "outside"]
    spans = {"1": (0.0, 1.0), "2": (1.0, None), "3": (2.0, 3.5), "whole": (None, None)}
    for row in out[:4]:
        start, end = spans[row["id"]]
        frames, _ = sample_frames(tmp_path / "a.mp4", num_frames=4, start=start, end=end)
        assert row["status"] == "ok" and row["text"] == colour_caption(frames), row["id"]
    assert out[0]["text"] != out[1]["text"]
    assert out[4]["status"] == "error" and "end 2 s is not after its start 3 s" in out[4]["error"]
    assert out[5]["status"] == "error" and "starts after the video's last frame (the video lasts 2 s)" in out[5]["error"]
    assert "b.mp4" in out[5]["error"]

    log.unlink()
    summary = colour_main([str(csv_path), "--device", "CPU"])
    assert summary.skipped == 6 and not log.exists(), "every segment is recorded under its own key"
