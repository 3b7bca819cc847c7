"""A synthetic video-caption dataset: one coloured shape doing one thing, captioned several ways.

Small enough to train a BLIP-2-shaped captioner on CPU in minutes, and hard enough that
the caption needs the video: the colour, the shape, and an action that can only be
seen across frames (which way it moves, whether it grows or shrinks, changes colour,
bounces, or appears). Each clip gets several reference captions in varied wording, so
CIDEr behaves as on real caption data.

    python -m pipeline.datasets.synthetic --output data/synthetic --num_videos 600

writes ``videos/*.mp4`` and ``train.csv`` / ``val.csv`` / ``test.csv`` (columns ``path``,
``text``; one row per reference caption).
"""
from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import av
import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.datasets.metadata import write_csv_atomic

logger = logging.getLogger(__name__)

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230), "yellow": (235, 215, 40),
           "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
ACTIONS = ("left", "right", "up", "down", "grows", "shrinks", "recolour", "bounces", "appears", "still")
BACKGROUNDS = ((30, 30, 30), (70, 70, 90), (200, 200, 190), (20, 50, 40))


@dataclass(frozen=True)
class Clip:
    colour: str
    shape: str
    action: str
    second_colour: str  # the colour after a "recolour"; unused otherwise
    background: int


def _draw(frame: np.ndarray, shape: str, centre: tuple[float, float], radius: float, colour: tuple) -> None:
    x, y, r = int(round(centre[0])), int(round(centre[1])), max(2, int(round(radius)))
    if shape == "circle":
        cv2.circle(frame, (x, y), r, colour, thickness=-1, lineType=cv2.LINE_AA)
    elif shape == "square":
        cv2.rectangle(frame, (x - r, y - r), (x + r, y + r), colour, thickness=-1)
    else:
        points = np.array([[x, y - r], [x - r, y + r], [x + r, y + r]], np.int32)
        cv2.fillPoly(frame, [points], colour, lineType=cv2.LINE_AA)


def render(clip: Clip, num_frames: int = 16, size: int = 96, rng: np.random.Generator | None = None) -> np.ndarray:
    """(T, size, size, 3) uint8 RGB frames of the clip."""
    rng = rng or np.random.default_rng(0)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    margin = size * 0.22
    start = rng.uniform(margin, size - margin, 2)
    base = size * rng.uniform(0.13, 0.17)
    for t in range(num_frames):
        a = t / max(1, num_frames - 1)
        frame = frames[t]
        frame[:] = BACKGROUNDS[clip.background]
        centre, radius, colour = start.copy(), base, COLOURS[clip.colour]
        span = size - 2 * margin
        if clip.action in ("left", "right"):
            centre[0] = margin + span * (a if clip.action == "right" else 1 - a)
        elif clip.action in ("up", "down"):
            centre[1] = margin + span * (a if clip.action == "down" else 1 - a)
        elif clip.action == "grows":
            radius = base * (0.5 + 1.6 * a)
        elif clip.action == "shrinks":
            radius = base * (2.1 - 1.6 * a)
        elif clip.action == "recolour" and a >= 0.5:
            colour = COLOURS[clip.second_colour]
        elif clip.action == "bounces":
            centre[1] = margin + span * abs(np.sin(np.pi * 2 * a))
        if clip.action == "appears" and a < 0.4:
            continue
        _draw(frame, clip.shape, tuple(centre), radius, colour)
    return frames


def captions(clip: Clip, rng: np.random.Generator, count: int = 5) -> list[str]:
    """``count`` different wordings of what happens in the clip."""
    c, s = clip.colour, clip.shape
    direction = {"left": "to the left", "right": "to the right", "up": "upwards", "down": "downwards"}
    templates = {
        "move": [f"a {c} {s} moves {direction.get(clip.action, '')}", f"a {c} {s} is moving {clip.action}",
                 f"the {c} {s} slides {direction.get(clip.action, '')}", f"a {s} in {c} travels {clip.action}",
                 f"a {c} {s} goes {clip.action} across the screen", f"the {s} moves {clip.action}, it is {c}"],
        "grows": [f"a {c} {s} grows", f"a {c} {s} gets bigger", f"the {c} {s} is growing larger",
                  f"a {s} in {c} becomes bigger", f"a small {c} {s} grows into a big one"],
        "shrinks": [f"a {c} {s} shrinks", f"a {c} {s} gets smaller", f"the {c} {s} is shrinking",
                    f"a {s} in {c} becomes smaller", f"a big {c} {s} shrinks to a small one"],
        "recolour": [f"a {c} {s} turns {clip.second_colour}",
                     f"a {s} changes colour from {c} to {clip.second_colour}",
                     f"the {c} {s} becomes {clip.second_colour}",
                     f"a {c} {s} changes into a {clip.second_colour} {s}",
                     f"the {s} switches from {c} to {clip.second_colour}"],
        "bounces": [f"a {c} {s} bounces", f"a {c} {s} is bouncing up and down", f"the {c} {s} bounces around",
                    f"a {s} in {c} jumps up and down", f"a bouncing {c} {s}"],
        "appears": [f"a {c} {s} appears", f"a {c} {s} suddenly appears", f"the {c} {s} shows up",
                    f"a {s} in {c} appears on the screen", f"a {c} {s} pops into view"],
        "still": [f"a {c} {s} stays still", f"a {c} {s} does not move", f"the {c} {s} is standing still",
                  f"a still {c} {s}", f"a {s} in {c} stays in place"],
    }
    key = "move" if clip.action in direction else clip.action
    options = templates[key]
    picks = rng.choice(len(options), size=min(count, len(options)), replace=False)
    return [re.sub(r"\ba (?=[aeiou])", "an ", options[i]) for i in picks]


def write_video(path: Path, frames: np.ndarray, fps: int = 8) -> None:
    """H.264 MP4 through PyAV (no ffmpeg command line needed)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def random_clip(rng: np.random.Generator) -> Clip:
    colour, second = rng.choice(list(COLOURS), size=2, replace=False)
    return Clip(colour=str(colour), shape=str(rng.choice(SHAPES)), action=str(rng.choice(ACTIONS)),
                second_colour=str(second), background=int(rng.integers(len(BACKGROUNDS))))


def generate(output: str | Path, num_videos: int = 600, seed: int = 0, num_frames: int = 16, size: int = 96,
             splits: Sequence[float] = (0.8, 0.1, 0.1), captions_per_video: int = 5) -> dict[str, Path]:
    """Write the clips and the split CSVs; returns the CSV path of each split."""
    output = Path(output)
    (output / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in tqdm(range(num_videos), desc="synthetic clips", unit="clip"):
        clip = random_clip(rng)
        name = f"videos/clip{i:05d}.mp4"
        write_video(output / name, render(clip, num_frames, size, rng))
        rows += [{"path": name, "text": text, "video_id": f"clip{i:05d}"}
                 for text in captions(clip, rng, captions_per_video)]
    table = pd.DataFrame(rows)
    bounds = np.cumsum([0, *splits]) / sum(splits) * num_videos
    written = {}
    for name, lo, hi in zip(("train", "val", "test"), bounds[:-1], bounds[1:]):
        ids = {f"clip{i:05d}" for i in range(int(round(lo)), int(round(hi)))}
        part = table[table["video_id"].isin(ids)]
        write_csv_atomic(part, output / f"{name}.csv")
        written[name] = output / f"{name}.csv"
        logger.info("%s: %d clips, %d captions", name, len(ids), len(part))
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder for videos/ and the split CSVs")
    parser.add_argument("--num_videos", type=int, default=600, help="clips to make (split 80/10/10)")
    parser.add_argument("--num_frames", type=int, default=16, help="frames per clip (8 fps)")
    parser.add_argument("--size", type=int, default=96, help="frame width and height in pixels")
    parser.add_argument("--captions_per_video", type=int, default=5, help="reference captions per clip")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same dataset")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    written = generate(args.output, args.num_videos, args.seed, args.num_frames, args.size,
                       captions_per_video=args.captions_per_video)
    print("wrote " + ", ".join(f"{k}: {v}" for k, v in written.items()))


if __name__ == "__main__":
    main()
