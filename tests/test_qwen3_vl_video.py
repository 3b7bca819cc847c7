"""Qwen3-VL video in Qwen's way (issue 27): the sampled frames' real times reach the prompt's timestamps on
every runner path (a variable-frame-rate clip, a segment, windows with --num_frames, the out-of-memory
retry), qwen-vl-utils' minimum of 4 frames, and a budget below that minimum as an error row naming the numbers.
Qwen3.5 (issue 31) takes Qwen3-VL's video rules, so every test runs on a tiny checkpoint of each.

Expected times never come from the code under test: each frame carries its index as a barcode
(``tests.video_factory``), and ffprobe gives that frame's presentation time."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.test_qwen2vl import read_rows  # noqa: E402
from tests.test_qwen3_vl import CLI, captioner, save_checkpoint  # noqa: E402,F401 - module fixtures
from tests.video_factory import read_index, write_image, write_index_video, write_vfr_index_video  # noqa: E402

# The tiny word-level tokenizer's tokens of "<1.5 seconds>" before a vision run. transformers loads the Qwen3.5 one
# as Qwen3_5Tokenizer, which has no "seconds" token for it, so that word may be missing there.
TIMESTAMP = re.compile(r"<(\d+\.\d)(?:seconds)?><\|vision_start\|>")
# 10 frames at 10 fps, then 10 at 5 fps: 3 s whose frame times the muxer also rounds (see ffprobe_starts)
VFR_PIECES = ((10, 10.0), (10, 5.0))
RUN = [*CLI, "--max_new_tokens", "2", "--num_workers", "1"]  # one decoding thread: prepare sees rows in order


def ffprobe_starts(path: Path) -> np.ndarray:
    """Every frame's presentation time by ffprobe, from the first frame's (seconds)."""
    if shutil.which("ffprobe") is None:
        pytest.skip("ffprobe is not installed")
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "frame=pts_time",
                          "-of", "json", str(path)], capture_output=True, text=True, check=True).stdout
    times = np.array([float(frame["pts_time"]) for frame in json.loads(out)["frames"]])
    return times - times[0]


def expected_stamps(starts: np.ndarray, barcodes: list[int], segment_start: float = 0.0) -> list[str]:
    """Qwen3-VL's timestamps for frames ``barcodes``: per pair of frames (the last repeated to fill a pair) the
    mean of their times, from the first frame at or after ``segment_start`` (segments start on a frame here)."""
    first = starts[int(np.searchsorted(starts, segment_start - 1e-6))]
    times = starts[barcodes] - first
    times = np.append(times, times[-1:]) if len(times) % 2 else times
    means = (times[0::2] + times[1::2]) / 2
    assert np.all(np.abs(means * 10 % 1 - 0.5) > 1e-3), f"{means}: a one-decimal tie would be ambiguous"
    return [f"{t:.1f}" for t in means]


def prompt_stamps(tokenizer, ids: list[int]) -> list[str]:
    """The timestamps the prompt ids write before each temporal patch."""
    return TIMESTAMP.findall("".join(tokenizer.convert_ids_to_tokens(ids)))


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen3_5"])
def checkpoint(request, tmp_path_factory) -> Path:
    """The tiny checkpoint of each family (tests.test_qwen3_vl's ``captioner`` fixture loads it)."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "qwen3_vl":
        return save_checkpoint(folder)
    pytest.importorskip("transformers.models.qwen3_5")
    from tests.test_qwen3_5_vl import save_qwen3_5

    return save_qwen3_5(folder)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("qwen3_vl_video")
    vfr, _ = write_vfr_index_video(folder / "vfr.mp4", VFR_PIECES)
    return {"vfr": vfr, "short": write_index_video(folder / "short.mp4", 10, fps=10),  # 1 s
            "still": write_image(folder / "still.png", 7)}


Call = tuple[list[int], np.ndarray | None, object]  # the frames' barcodes, the times given, the prepared video


def recording_prepare(calls: list[Call]):
    """A patch of ``Qwen2VLCaptioner.prepare`` that appends to ``calls`` what each call got and gave."""
    from pipeline.captioning.caption_qwen2vl import Qwen2VLCaptioner

    original = Qwen2VLCaptioner.prepare

    def prepare(captioner, frames, budget=None, frame_times=None):
        video = original(captioner, frames, budget, frame_times)
        calls.append(([read_index(f) for f in frames], frame_times, video))
        return video

    return mock.patch.object(Qwen2VLCaptioner, "prepare", prepare)


def caption(checkpoint: Path, media: dict[str, Path], rows: list[dict], out: Path, *flags: str
            ) -> tuple[list[dict], list[Call]]:
    """caption_qwen2vl.py over ``rows`` (paths in the media folder); the output rows and the prepare calls."""
    from pipeline.captioning.caption_qwen2vl import main

    table = out.with_name("meta.csv")
    pd.DataFrame(rows).to_csv(table, index=False)
    calls: list[Call] = []
    with recording_prepare(calls):
        main([str(table), "--pretrained_model_name_or_path", str(checkpoint), "--output", str(out),
              "--video_root", str(media["vfr"].parent), *RUN, *flags])
    return read_rows(out), calls


def test_real_times_reach_the_prompt_and_a_short_clip_gets_four_frames(checkpoint, captioner, media, tmp_path):
    """At 2 fps (qwen3_vl.yaml): the variable-rate clip's 6 frames, a segment from 1 s and a 1 s clip, each
    given 4 frames by the minimum, are written at their real times, the segment's from its own start; the
    rows record the frames, tokens (6 per temporal patch) and budget."""
    table = [{"path": "vfr.mp4", "start": "", "end": ""}, {"path": "vfr.mp4", "start": 1.0, "end": 2.6},
             {"path": "short.mp4", "start": "", "end": ""}]
    rows, calls = caption(checkpoint, media, table, tmp_path / "out.csv")
    assert [r["status"] for r in rows] == ["ok"] * 3, rows
    whole, segment, short = calls
    vfr, clip = ffprobe_starts(media["vfr"]), ffprobe_starts(media["short"])
    assert len(np.unique(np.diff(vfr).round(3))) > 1 and len(whole[0]) == 6  # the rate varies
    assert min(segment[0]) >= 10 and len(segment[0]) == 4  # 1.6 s at 2 fps is 3 frames: the minimum, 4
    assert len(short[0]) == 4 and len(set(short[0])) == 4  # 2 frames at 2 fps: 4 distinct ones instead
    for (barcodes, times, video), starts, begin in [(whole, vfr, 0.0), (segment, vfr, 1.0), (short, clip, 0.0)]:
        assert times is not None
        assert prompt_stamps(captioner.tokenizer, video.inputs.input_ids) == expected_stamps(starts, barcodes, begin)
    assert [int(r["num_frames_used"]) for r in rows] == [6, 4, 4]
    assert [int(r["visual_tokens"]) for r in rows] == [18, 12, 12]
    budget = {r["visual_token_budget"] for r in rows}
    assert len(budget) == 1 and int(budget.pop()) > 18


def test_windows_with_num_frames_are_timed_from_each_window(checkpoint, captioner, media, tmp_path):
    """--num_frames 5 over 1.4 s windows of the variable-rate clip: each window's frames (uniform in time) are
    written at their times from the window's first frame, and the minimum does not add frames to a count
    asked for (5 frames: 3 temporal patches, the last frame repeated)."""
    rows, calls = caption(checkpoint, media, [{"path": "vfr.mp4"}], tmp_path / "out.csv", "--num_frames", "5",
                          "--window_seconds", "1.4")
    assert [(r["status"], float(r["start"])) for r in rows] == [("ok", 0.0), ("ok", 1.4)], rows
    starts = ffprobe_starts(media["vfr"])
    for (barcodes, times, video), row in zip(calls, rows):
        assert len(barcodes) == 5 and int(row["num_frames_used"]) == 5
        assert float(row["start"]) <= starts[min(barcodes)] and starts[max(barcodes)] < float(row["end"])
        stamps = prompt_stamps(captioner.tokenizer, video.inputs.input_ids)
        assert stamps == expected_stamps(starts, barcodes, float(row["start"])) and len(stamps) == 3


def test_budget_below_the_minimum_is_an_error_row_naming_the_numbers(checkpoint, media, tmp_path):
    """--max_visual_tokens 8 cannot hold 4 frames at 6 tokens per temporal patch (12): the 1 s clip's row is an
    error saying so, and the still image in the same run (one frame, 6 tokens) is captioned."""
    rows, _ = caption(checkpoint, media, [{"path": "short.mp4"}, {"path": "still.png"}], tmp_path / "out.csv",
                      "--max_visual_tokens", "8")
    assert [r["status"] for r in rows] == ["error", "ok"], rows
    error = rows[0]["error"]
    assert error.startswith("BudgetError: the budget of 8 visual tokens is too small for the minimum of 4 frames")
    assert "2 temporal patches of at least 6 tokens need 12" in error and "--max_visual_tokens to 12" in error
    assert (rows[1]["num_frames_used"], rows[1]["visual_tokens"], rows[1]["visual_token_budget"]) == ("1", "6", "8")


def test_out_of_memory_retry_keeps_the_real_times(captioner, media):
    """A video that runs out of memory is prepared again at half its budget from the frames it kept: fewer
    frames, still written at their own times (not re-spread at the sampling rate)."""
    from pipeline.captioning.results import caption_batch
    from pipeline.datasets.video import sample_frames

    frames, times = sample_frames(media["vfr"], num_frames=768, fps=4, height=64, width=96, return_times=True)
    first = captioner.prepare(frames, budget=36, frame_times=times)
    assert first.num_frames_used == 12 and first.visual_tokens == 36
    tried = []
    real_generate = captioner.generate

    def generate(batch, *args, **kwargs):
        tried.append(batch[0])
        if len(tried) == 1:
            raise MemoryError("out of memory")
        return real_generate(batch, *args, **kwargs)

    with mock.patch.object(captioner, "generate", generate):
        result, = caption_batch(captioner, [first], captioner.extra_columns)
    assert result.error is None and result.columns["num_frames_used"] == "6" and len(tried) == 2
    starts = ffprobe_starts(media["vfr"])
    for video, count in zip(tried, (12, 6)):
        barcodes = [read_index(f) for f in video.frames]
        assert len(barcodes) == count
        assert prompt_stamps(captioner.tokenizer, video.inputs.input_ids) == expected_stamps(starts, barcodes)
    assert prompt_stamps(captioner.tokenizer, tried[1].inputs.input_ids) != prompt_stamps(
        captioner.tokenizer, captioner.prepare(tried[1].frames).inputs.input_ids)  # the sampling rate's differ
