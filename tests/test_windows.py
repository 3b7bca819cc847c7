"""--window_seconds: window times, one output row per window, and resume at window level."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.captioning import runner
from pipeline.datasets.metadata import format_seconds, write_csv_atomic
from pipeline.datasets.video import sample_frames, split_windows
from tests.colour_captioner import colour_caption, main as colour_main
from tests.msrun import count_lines, kill_when_written, run_msrun
from tests.video_factory import write_image, write_index_video

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "colour_captioner.py"
FPS = 10


@pytest.mark.parametrize(("start", "end", "seconds", "low", "windows"), [
    (0, 30, 10, 5, [(0, 10), (10, 20), (20, 30)]),
    (0, 34, 10, 5, [(0, 10), (10, 20), (20, 34)]),  # a 4 s rest joins the window before
    (0, 36, 10, 5, [(0, 10), (10, 20), (20, 30), (30, 36)]),
    (0, 12.5, 5, 2.5, [(0, 5), (5, 10), (10, 12.5)]),  # a rest of exactly the minimum stays
    (0, 7, 10, 5, [(0, 7)]),  # shorter than a window
    (0, 4, 10, 5, [(0, 4)]),  # shorter than the minimum
    (2.5, 14, 5, 2.5, [(2.5, 7.5), (7.5, 14)]),
    (0, 0.3, 0.1, 0.05, [(0, 0.1), (0.1, 0.2), (0.2, 0.3)]),
    (0, 0, 10, 5, [(0, 0)]),  # a still image
])
def test_split_windows(start, end, seconds, low, windows):
    got = split_windows(start, end, seconds, low)
    assert [edge for window in got for edge in window] == pytest.approx([edge for window in windows for edge in window])


def test_window_times_are_plain_cells():
    assert [format_seconds(x) for x in (12.5, 10.0, 0.0, 1 / 3, 3600.25)] == ["12.5", "10", "0", "0.333", "3600.25"]


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def make_dataset(folder: Path, frames: list[int]) -> Path:
    """Videos of the given frame counts at 10 fps, plus a still image."""
    rows = []
    for i, count in enumerate(frames):
        write_index_video(folder / f"v{i}.mp4", num_frames=count, fps=FPS)
        rows.append({"path": f"v{i}.mp4", "id": str(i)})
    write_image(folder / "still.png", index=9)
    rows.append({"path": "still.png", "id": "still"})
    csv_path = folder / "meta.csv"
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    return csv_path


@pytest.fixture
def probes(monkeypatch) -> list[str]:
    """Records every duration probe the runner makes (in its decoder processes, or in-process)."""
    calls: list[str] = []
    real, real_pooled = runner.probe_duration, runner.DecodePool.probe_duration

    def counting(path, *args, **kwargs):
        calls.append(Path(path).name)
        return real(path, *args, **kwargs)

    def counting_pooled(pool, path, *args, **kwargs):
        calls.append(Path(path).name)
        return real_pooled(pool, path, *args, **kwargs)

    monkeypatch.setattr(runner, "probe_duration", counting)
    monkeypatch.setattr(runner.DecodePool, "probe_duration", counting_pooled)
    return calls


def windows_of(rows: list[dict]) -> list[tuple[str, str, str, str, str]]:
    return [(r["path"], r["window"], r["num_windows"], r["start"], r["end"]) for r in rows]


def test_windows_are_rows_with_their_own_frames(tmp_path, probes):
    csv_path = make_dataset(tmp_path, [34, 4, 20])
    colour_main([str(csv_path), "--device", "CPU", "--bs", "2", "--window_seconds", "1"])
    rows = read_rows(tmp_path / "meta_caption.csv")
    assert list(rows[0]) == ["path", "id", "window", "num_windows", "start", "end", "text", "status", "error"]
    assert windows_of(rows) == [
        ("v0.mp4", "0", "3", "0", "1"), ("v0.mp4", "1", "3", "1", "2"), ("v0.mp4", "2", "3", "2", "3.4"),
        ("v1.mp4", "0", "1", "0", "0.4"),
        ("v2.mp4", "0", "2", "0", "1"), ("v2.mp4", "1", "2", "1", "2"),
        ("still.png", "0", "1", "0", "0"),
    ]
    for row in rows:
        assert row["status"] == "ok", row
        span = {} if row["path"] == "still.png" else {"start": float(row["start"]), "end": float(row["end"])}
        frames, _ = sample_frames(tmp_path / row["path"], num_frames=4, **span)
        assert row["text"] == colour_caption(frames)
    assert sorted(probes) == ["still.png", "v0.mp4", "v1.mp4", "v2.mp4"]


def test_resume_redoes_only_missing_windows_and_skips_finished_videos_unprobed(tmp_path, probes, monkeypatch):
    csv_path = make_dataset(tmp_path, [34, 25])
    args = [str(csv_path), "--device", "CPU", "--window_seconds", "1", "--window_min_seconds", "0.2"]
    colour_main(args)
    out = tmp_path / "meta_caption.csv"
    first = read_rows(out)
    assert len(first) == 4 + 3 + 1  # v0: 3 windows and a 0.4 s one; v1: a 0.5 s rest

    probes.clear()
    log = tmp_path / "calls.txt"
    monkeypatch.setenv("CAPTION_CALL_LOG", str(log))
    summary = colour_main(args)
    assert probes == [] and not log.exists() and summary.skipped == 3

    # Lose window 2 of v0 (as if its batch was in flight at a kill).
    kept = pd.DataFrame([r for r in first if (r["path"], r["window"]) != ("v0.mp4", "2")])
    write_csv_atomic(kept, out)
    summary = colour_main(args)
    assert probes == ["v0.mp4"] and summary.done == 1 and summary.skipped == 2
    assert log.read_text().splitlines() == [next(r["text"] for r in first if (r["path"], r["window"]) ==
                                                 ("v0.mp4", "2"))]
    assert read_rows(out) == first


def test_windows_of_input_segments_keep_the_segment(tmp_path, probes):
    write_index_video(tmp_path / "a.mp4", num_frames=60, fps=FPS)
    pd.DataFrame({"path": ["a.mp4", "a.mp4", "a.mp4"], "start": ["0.5", "4", "9"], "end": ["3", "", ""]}).to_csv(  # 6 s
        tmp_path / "seg.csv", index=False)
    colour_main([str(tmp_path / "seg.csv"), "--device", "CPU", "--window_seconds", "1"])
    rows = read_rows(tmp_path / "seg_caption.csv")
    assert list(rows[0])[:7] == ["path", "start", "end", "segment_start", "segment_end", "window", "num_windows"]
    got = [(r["segment_start"], r["segment_end"], r["window"], r["start"], r["end"], r["status"]) for r in rows]
    assert got == [
        ("0.5", "3", "0", "0.5", "1.5", "ok"), ("0.5", "3", "1", "1.5", "2.5", "ok"),
        ("0.5", "3", "2", "2.5", "3", "ok"),
        ("4", "", "0", "4", "5", "ok"), ("4", "", "1", "5", "6", "ok"),
        ("9", "", "", "9", "", "error"),
    ]
    assert "at or after the end of the video (6 s)" in rows[-1]["error"]
    assert probes == ["a.mp4", "a.mp4"], "a segment with an end needs no probe"

    probes.clear()
    summary = colour_main([str(tmp_path / "seg.csv"), "--device", "CPU", "--window_seconds", "1"])
    assert probes == [] and summary.skipped == 3


def test_a_video_that_failed_whole_is_windowed_on_retry(tmp_path):
    csv_path = make_dataset(tmp_path, [15])
    (tmp_path / "v0.mp4").rename(tmp_path / "moved.mp4")
    args = [str(csv_path), "--device", "CPU", "--window_seconds", "1"]
    colour_main(args)
    rows = read_rows(tmp_path / "meta_caption.csv")
    assert [(r["path"], r["window"], r["status"]) for r in rows] == [("v0.mp4", "", "error"),
                                                                     ("still.png", "0", "ok")]
    assert "does not exist" in rows[0]["error"]

    summary = colour_main(args)
    assert summary.skipped == 2, "an error row is kept unless retried"
    (tmp_path / "moved.mp4").rename(tmp_path / "v0.mp4")
    colour_main(args + ["--retry_errors"])
    rows = read_rows(tmp_path / "meta_caption.csv")
    assert [(r["path"], r["window"], r["status"]) for r in rows] == [
        ("v0.mp4", "0", "ok"), ("still.png", "0", "ok")], "the video's old error row is replaced"
    assert rows[0]["end"] == "1.5"


@pytest.mark.parametrize(("flags", "problem"), [
    (["--window_seconds", "0"], "--window_seconds must be positive"),
    (["--window_seconds", "2", "--window_min_seconds", "3"], "--window_min_seconds must be between 0 and"),
    (["--window_min_seconds", "1"], "--window_min_seconds needs --window_seconds"),
])
def test_bad_window_settings_fail_before_any_row(tmp_path, flags, problem):
    csv_path = make_dataset(tmp_path, [5])
    with pytest.raises(SystemExit) as err:
        colour_main([str(csv_path), "--device", "CPU", *flags])
    assert problem in str(err.value)
    assert not (tmp_path / "meta_caption.csv").exists()


def test_a_windowed_output_is_no_windowed_input(tmp_path):
    csv_path = make_dataset(tmp_path, [5])
    colour_main([str(csv_path), "--device", "CPU", "--window_seconds", "1"])
    with pytest.raises(SystemExit) as err:
        colour_main([str(tmp_path / "meta_caption.csv"), "--device", "CPU", "--window_seconds", "1"])
    assert "['window', 'num_windows']" in str(err.value) and "run without --window_seconds" in str(err.value)


def expected_windows(folder: Path, frames: list[int]) -> set[tuple[str, str]]:
    found = set()
    for i, count in enumerate(frames):
        spans = split_windows(0, count / FPS, 1.0, 0.5)
        found |= {(f"v{i}.mp4", str(w)) for w in range(len(spans))}
    return found | {("still.png", "0")}


def test_kill_mid_run_then_resume_gives_every_window_once(tmp_path):
    frames = [42, 30, 27, 51]
    csv_path = make_dataset(tmp_path, frames)
    out, part = tmp_path / "meta_caption.csv", tmp_path / "meta_caption.csv.part0.csv"
    first_log, second_log = tmp_path / "calls1.txt", tmp_path / "calls2.txt"
    cmd = [sys.executable, str(SCRIPT), str(csv_path), "--bs", "2", "--device", "CPU", "--window_seconds", "1"]
    env = dict(os.environ)
    kill_when_written(cmd, ROOT, {**env, "CAPTION_CALL_LOG": str(first_log), "CAPTION_SLEEP": "0.5"}, part,
                      7)  # header + 6 windows
    finished = read_rows(part)
    expected = expected_windows(tmp_path, frames)
    assert 6 <= len(finished) < len(expected), "the kill should land mid-run"

    subprocess.run(cmd, cwd=ROOT, env={**env, "CAPTION_CALL_LOG": str(second_log)}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    rows = read_rows(out)
    assert sorted((r["path"], r["window"]) for r in rows) == sorted(expected), "every window exactly once"
    assert all(r["status"] == "ok" for r in rows)
    assert count_lines(second_log) == len(expected) - len(finished), "finished windows are not captioned again"


def test_msrun_shards_the_windows_still_to_do(tmp_path):
    frames = [25, 31, 12, 40, 18]
    csv_path = make_dataset(tmp_path, frames)
    args = [str(csv_path), "--bs", "2", "--device", "CPU", "--window_seconds", "1"]
    colour_main(args)
    out = tmp_path / "meta_caption.csv"
    complete = read_rows(out)
    kept = [r for r in complete if r["path"] in ("v0.mp4", "v2.mp4") or (r["path"], r["window"]) == ("v3.mp4", "0")]
    write_csv_atomic(pd.DataFrame(kept), out)

    log = tmp_path / "calls.txt"
    os.environ["CAPTION_CALL_LOG"] = str(log)
    try:
        result = run_msrun(SCRIPT, args, cwd=tmp_path)
    finally:
        del os.environ["CAPTION_CALL_LOG"]
    assert result.returncode == 0, result.problems
    assert "rank 1 of 2" in result.logs, "both ranks must have joined"
    assert read_rows(out) == complete
    assert count_lines(log) == len(complete) - len(kept), "each missing window captioned once, on one rank"
    assert not list(tmp_path.glob("meta_caption.csv.part*.csv"))
