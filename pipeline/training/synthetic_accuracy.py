"""How often captions of the synthetic dataset name the clip's colour, shape and action.

CIDEr rewards wording; this says what a captioner of ``pipeline.datasets.synthetic`` clips
actually sees. Each caption is read by keyword into (colour, shape, action); the truth is
the same reading of the clip's first reference caption (every template of the generator
reads back to its clip, which the tests check). Colour is the first colour named, so a
colour change counts by its starting colour.

    python -m pipeline.training.synthetic_accuracy --references data/test.csv \\
        --predictions test_scst.csv [--output_json accuracy.json]

The predictions are the captioning runner's output (``path``, ``text``, ``status``), matched
to the references as ``pipeline.training.evaluate`` matches them.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, Optional

from pipeline.datasets.captions import CaptionFormatError, load_captions, references
from pipeline.datasets.metadata import MetadataError, read_metadata
from pipeline.datasets.synthetic import ACTIONS, COLOURS, SHAPES
from pipeline.training.evaluate import match_predictions

MOTIONS = ("left", "right", "up", "down", "grows", "shrinks", "bounces")

# Checked in order: "bouncing up and down" is a bounce, "becomes bigger" is growth, and a
# colour change is only tested once the size words have had their turn.
_ACTION_PATTERNS = (
    ("bounces", r"\bbounc|\bup and down\b"),
    ("grows", r"\bgrow|\bbigger\b|\blarger\b"),
    ("shrinks", r"\bshrink|\bsmaller\b"),
    ("appears", r"\bappears?\b|\bshows up\b|\bpops into view\b"),
    ("still", r"\bstill\b|\bdoes not move\b|\bstays in place\b"),
    ("recolour", r"\bturns\b|\bchanges colou?r\b|\bchanges into\b|\bswitches\b|\bbecomes (%s)\b" % "|".join(COLOURS)),
    ("left", r"\bleft\b"),
    ("right", r"\bright\b"),
    ("up", r"\bup\b|\bupwards\b"),
    ("down", r"\bdown\b|\bdownwards\b"),
)


class Reading(NamedTuple):
    colour: Optional[str]
    shape: Optional[str]
    action: Optional[str]


def read_caption(caption: str) -> Reading:
    """The colour, shape and action a caption names (None where it names none)."""
    text = caption.lower()
    colours = [(m.start(), m.group(0)) for m in re.finditer(r"\b(%s)\b" % "|".join(COLOURS), text)]
    shapes = re.search(r"\b(%s)s?\b" % "|".join(SHAPES), text)
    action = next((name for name, pattern in _ACTION_PATTERNS if re.search(pattern, text)), None)
    return Reading(min(colours)[1] if colours else None, shapes.group(1) if shapes else None, action)


def accuracy(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict:
    """Per-attribute accuracy over the videos with a prediction, and motion and action breakdowns."""
    right: Counter = Counter()
    per_action: Counter = Counter()
    per_action_right: Counter = Counter()
    videos = [v for v in references if v in predictions]
    if not videos:
        raise ValueError("no prediction matches a reference video")
    for video in videos:
        truth, guess = read_caption(references[video][0]), read_caption(predictions[video])
        for field in Reading._fields:
            right[field] += getattr(truth, field) == getattr(guess, field)
        per_action[truth.action] += 1
        per_action_right[truth.action] += truth.action == guess.action
    motion_total = sum(per_action[a] for a in MOTIONS)
    return {
        "num_videos": len(videos),
        "colour": right["colour"] / len(videos),
        "shape": right["shape"] / len(videos),
        "action": right["action"] / len(videos),
        "motion": sum(per_action_right[a] for a in MOTIONS) / motion_total if motion_total else None,
        "per_action": {a: {"videos": per_action[a], "right": per_action_right[a] / per_action[a]}
                       for a in ACTIONS if per_action[a]},
    }


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--references", required=True, help="a split CSV written by pipeline.datasets.synthetic")
    p.add_argument("--predictions", required=True, help="captions of that split (the runner's output CSV)")
    p.add_argument("--output_json", help="also write the accuracies here")
    args = p.parse_args(argv)
    try:
        records = load_captions(args.references)
        table = read_metadata(args.predictions, required=("text",))
        predictions = match_predictions(table, records, Path(args.predictions).resolve().parent)
    except (CaptionFormatError, MetadataError) as exc:
        sys.exit(f"error: {exc}")
    try:
        result = accuracy(predictions, references(records))
    except ValueError as exc:
        sys.exit(f"error: {args.predictions}: {exc} of {args.references}")
    for name in ("colour", "shape", "action", "motion"):
        print(f"{name:>8}: {100 * result[name]:5.1f} %")
    for action, row in result["per_action"].items():
        print(f"{action:>8}: {100 * row['right']:5.1f} % of {row['videos']}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
