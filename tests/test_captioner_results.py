"""What a captioner's generate may return (extra columns) and the runner's out-of-memory retry."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import pandas as pd
import pytest

from pipeline.captioning.caption_colour import ColourCaptioner
from pipeline.captioning.results import is_out_of_memory
from pipeline.captioning.runner import RunError, RunOptions, run
from tests.colour_captioner import BudgetCaptioner
from tests.video_factory import write_index_video

# (file, width, height): budgets are a quarter of the pixels
SIZES = {"small": (48, 32), "medium": (64, 48), "large": (192, 128)}


def make_videos(folder: Path, names: Sequence[str]) -> Path:
    rows = []
    for i, name in enumerate(names):
        if name in SIZES:
            width, height = SIZES[name]
            write_index_video(folder / f"{name}.mp4", num_frames=8, width=width, height=height)
        rows.append({"path": f"{name}.mp4", "id": str(i)})
    csv_path = folder / "meta.csv"
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    return csv_path


def caption(captioner, csv_path: Path, bs: int = 4) -> dict[str, dict]:
    out = csv_path.with_name("out.csv")
    run(captioner, RunOptions(input=str(csv_path), output=str(out), bs=bs, num_workers=1))
    with open(out, newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def test_out_of_memory_retries_once_at_half_the_budget(tmp_path):
    csv_path = make_videos(tmp_path, ["small", "medium", "large", "missing"])
    captioner = BudgetCaptioner(fits=600)
    rows = caption(captioner, csv_path)

    assert list(rows["small.mp4"]) == ["path", "id", "text", "status", "error", "visual_token_budget"]
    assert rows["small.mp4"]["status"] == "ok" and rows["small.mp4"]["visual_token_budget"] == "384"
    medium = rows["medium.mp4"]
    assert medium["status"] == "ok" and medium["text"].startswith("a mostly")
    assert medium["visual_token_budget"] == "384", "the retried row records the halved budget"
    large = rows["large.mp4"]
    assert large["status"] == "error" and large["text"] == ""
    assert "out of memory at both attempts" in large["error"] and "Memory not enough" in large["error"]
    assert large["visual_token_budget"] == "3072", "the second error carries the budget it ran out at"
    missing = rows["missing.mp4"]
    assert missing["status"] == "error" and missing["visual_token_budget"] == ""
    # One batch of three ran out of memory, then each video alone; only medium and large shrank.
    assert captioner.calls == [[384, 768, 6144], [384], [768], [384], [6144], [3072]]
    assert captioner.shrunk == [768, 6144]


def test_a_video_that_cannot_shrink_is_an_error_row(tmp_path):
    csv_path = make_videos(tmp_path, ["medium"])
    captioner = BudgetCaptioner(fits=100, floor=500)
    row = caption(captioner, csv_path)["medium.mp4"]
    assert row["status"] == "error" and "cannot be shrunk further" in row["error"]
    assert row["visual_token_budget"] == "768"
    assert captioner.calls == [[768]]


def test_other_errors_are_not_retried_smaller(tmp_path):
    csv_path = make_videos(tmp_path, ["small", "medium"])
    probe = BudgetCaptioner(fits=10_000)
    medium_caption = caption(probe, csv_path)["medium.mp4"]["text"]
    csv_path.with_name("out.csv").unlink()

    captioner = BudgetCaptioner(fits=10_000, fail_on=medium_caption)
    rows = caption(captioner, csv_path, bs=1)
    assert rows["small.mp4"]["status"] == "ok"
    assert rows["medium.mp4"]["status"] == "error" and "model failure" in rows["medium.mp4"]["error"]
    assert captioner.shrunk == [] and captioner.calls == [[384], [768]]


class OutOfMemoryColour(ColourCaptioner):
    """Runs out of memory on every call and cannot shrink."""

    def generate(self, batch):
        raise MemoryError("cannot allocate")


class DictCaptioner(ColourCaptioner):
    """Answers in the dict form, optionally with a mistake."""

    extra_columns = ("num_frames_used",)

    def __init__(self, answer: str):
        super().__init__(num_frames=3)
        self.answer = answer

    def generate(self, batch):
        answers = {"good": {"text": "t", "num_frames_used": 3}, "no_text": {"num_frames_used": 3},
                   "undeclared": {"text": "t", "visual_tokens": 5}, "number": 7}
        return [answers[self.answer] for _ in batch]


@pytest.mark.parametrize(("answer", "status", "problem"), [
    ("good", "ok", ""), ("no_text", "error", "expected a caption string or a dict with a 'text'"),
    ("undeclared", "error", "undeclared column(s) ['visual_tokens']"), ("number", "error", "returned int")])
def test_dict_answers_fill_extra_columns_or_fail_clearly(tmp_path, answer, status, problem):
    csv_path = make_videos(tmp_path, ["small"])
    row = caption(DictCaptioner(answer), csv_path)["small.mp4"]
    assert row["status"] == status and problem in row["error"]
    assert row["num_frames_used"] == ("3" if status == "ok" else "")


def test_out_of_memory_without_shrink_keeps_the_error(tmp_path):
    csv_path = make_videos(tmp_path, ["small"])
    row = caption(OutOfMemoryColour(), csv_path)["small.mp4"]
    assert row["status"] == "error" and row["error"] == "MemoryError: cannot allocate"


def test_extra_columns_must_not_clash(tmp_path):
    csv_path = make_videos(tmp_path, ["small"])
    data = pd.read_csv(csv_path, dtype=str)
    data["num_frames_used"] = "x"
    data.to_csv(csv_path, index=False)
    with pytest.raises(RunError, match="num_frames_used"):
        caption(DictCaptioner("good"), csv_path)


def test_out_of_memory_detection():
    assert is_out_of_memory(RuntimeError("For 'MatMul', Memory not enough: malloc 4GB failed"))
    assert is_out_of_memory(RuntimeError("CUDA Out Of Memory"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("memory layout is wrong"))
