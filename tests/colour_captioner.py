"""The baseline colour captioner with hooks for runner tests; runs as a script (also under msrun).

CAPTION_CALL_LOG appends one line per captioned video to a file (to count calls across
a killed process); CAPTION_EXIT_ON ends the process with os._exit(3), as a crash would,
on a batch holding that exact caption; CAPTION_SLEEP sleeps per batch (only on rank CAPTION_SLEEP_RANK when
that is set, once); CAPTION_HOLD holds every batch after the first until that file exists (so a test can
look at a run mid-way); --fail_on makes generate raise.

``BudgetCaptioner`` stands in for Qwen2-VL/LLaVA in out-of-memory tests: each video has
a visual-token budget (a quarter of its pixel count) and generating a video whose budget
is above ``fits`` raises MindSpore's CPU out-of-memory error.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.captioning.caption_colour import ColourCaptioner, build_parser, colour_caption
from pipeline.captioning.cli import main_with

__all__ = ["BudgetCaptioner", "colour_caption", "main"]


class InstrumentedCaptioner(ColourCaptioner):
    def __init__(self, num_frames: int, fail_on: str | None):
        super().__init__(num_frames)
        self.fail_on = fail_on
        self.slept = False
        self.batches = 0

    def generate(self, batch: Sequence[str]) -> list[str]:
        if os.environ.get("CAPTION_EXIT_ON") in batch:
            os._exit(3)
        log = os.environ.get("CAPTION_CALL_LOG")
        if log:
            with open(log, "a") as f:
                f.writelines(f"{caption}\n" for caption in batch)
        hold = os.environ.get("CAPTION_HOLD")
        while hold and self.batches and not os.path.exists(hold):
            time.sleep(0.05)
        self.batches += 1
        only_rank = os.environ.get("CAPTION_SLEEP_RANK")
        if only_rank is None or (only_rank == os.environ.get("RANK_ID") and not self.slept):
            time.sleep(float(os.environ.get("CAPTION_SLEEP", "0")))
            self.slept = True
        if self.fail_on and any(self.fail_on in caption for caption in batch):
            raise RuntimeError(f"model failure on {self.fail_on}")
        return super().generate(batch)


class DeviceMemoryError(RuntimeError):
    """MindSpore's CPU out-of-memory error, carrying the budget that did not fit."""

    def __init__(self, budget: int):
        super().__init__(f"Memory not enough: the prompt of {budget} visual tokens does not fit the device")
        self.columns = {"visual_token_budget": budget}


@dataclass(frozen=True)
class BudgetVideo:
    caption: str
    budget: int


class BudgetCaptioner(ColourCaptioner):
    """Out of memory whenever a video's budget is above ``fits``; ``shrink`` halves it down to ``floor``."""

    extra_columns = ("visual_token_budget",)

    def __init__(self, fits: int, floor: int = 1, fail_on: str | None = None):
        super().__init__(num_frames=2)
        self.fits = fits
        self.floor = floor
        self.fail_on = fail_on
        self.calls: list[list[int]] = []  # the budgets of each generate call
        self.shrunk: list[int] = []  # the budgets shrink was asked to halve

    def prepare(self, frames: np.ndarray) -> BudgetVideo:
        return BudgetVideo(colour_caption(frames), frames.shape[1] * frames.shape[2] // 4)

    def shrink(self, video: BudgetVideo) -> BudgetVideo | None:
        self.shrunk.append(video.budget)
        half = video.budget // 2
        return BudgetVideo(video.caption, half) if half >= self.floor else None

    def generate(self, batch: Sequence[BudgetVideo]) -> list[dict]:
        self.calls.append([video.budget for video in batch])
        if self.fail_on and any(self.fail_on in video.caption for video in batch):
            raise RuntimeError(f"model failure on {self.fail_on}")
        too_big = [video.budget for video in batch if video.budget > self.fits]
        if too_big:
            raise DeviceMemoryError(max(too_big))
        return [{"text": video.caption, "visual_token_budget": video.budget} for video in batch]


def main(argv: Sequence[str] | None = None):
    parser = build_parser()
    parser.add_argument("--fail_on", help="raise in generate when a caption contains this text")
    return main_with(parser, lambda args, dtype: InstrumentedCaptioner(args.num_frames or 4, args.fail_on), argv)


if __name__ == "__main__":
    main()
