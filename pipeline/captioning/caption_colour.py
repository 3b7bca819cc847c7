"""A model-free baseline captioner: names each video's dominant colour.

It needs no checkpoint, so it checks a whole set-up end to end (install, video
decoding, resume, msrun, merge) in seconds; the tests build on it. It is not a
video captioner: use caption_blip2.py, caption_llava.py, caption_pllava.py or
caption_qwen2vl.py with a checkpoint for real captions.
"""
from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np

from pipeline.captioning.cli import common_parser, main_with
from pipeline.captioning.runner import FrameSpec, RunSummary

PALETTE = {
    "black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128),
    "red": (220, 30, 30), "green": (40, 170, 40), "blue": (30, 60, 220),
    "yellow": (240, 220, 40), "cyan": (40, 210, 220), "magenta": (210, 40, 200),
    "orange": (245, 140, 20), "purple": (120, 50, 160), "brown": (130, 80, 40),
    "pink": (245, 160, 190),
}


def colour_caption(frames: np.ndarray) -> str:
    """'a mostly <name> video (mean RGB r g b)' for (T,H,W,3) uint8 frames."""
    mean = frames.reshape(-1, 3).mean(axis=0)
    name = min(PALETTE, key=lambda k: float(np.sum((mean - np.array(PALETTE[k])) ** 2)))
    r, g, b = mean.round().astype(int)
    return f"a mostly {name} video (mean RGB {r} {g} {b})"


class ColourCaptioner:
    def __init__(self, num_frames: int = 4):
        self.frame_spec = FrameSpec(num_frames=num_frames)

    def prepare(self, frames: np.ndarray) -> str:
        return colour_caption(frames)

    def generate(self, batch: Sequence[str]) -> list[str]:
        return list(batch)


def build_parser() -> argparse.ArgumentParser:
    return common_parser(
        "Baseline: caption each video with its dominant colour (no model, no checkpoint).", model=False,
        epilog="example:\n  python -m pipeline.captioning.caption_colour examples/videos.csv")


def main(argv: Sequence[str] | None = None) -> RunSummary:
    return main_with(build_parser(), lambda args, dtype: ColourCaptioner(args.num_frames or 4), argv)


if __name__ == "__main__":
    main()
