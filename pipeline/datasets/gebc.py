"""Kinetic-GEBC (generic event boundary captioning, LOVEU@CVPR) annotations as a boundary table.

The annotation JSON is the per-boundary one of the GEBC challenge, as LLMVA-GEBC ships it
(``valset_highest_f1.json``, ``val.json``, ``test.json``)::

    {"<video_id>": [{"boundary_id": "<video_id>_0", "timestamp": 2.58, "prev_timestamp": 0,
                     "next_timestamp": 9.98, "label": "Change of Action", "subject": "human hands",
                     "status_before": "holding the page", "status_after": "lift the page", ...}, ...]}

The test split has no ``subject``/``status_before``/``status_after``. A video's last
``next_timestamp`` is its end. Each boundary becomes one row: ``path`` (from
``video_template``), ``video_id``, ``boundary`` (its index in the video), ``boundary_id``,
``boundary_time`` (the annotation's ``timestamp``; the runner reads a ``timestamp`` column
as an Open-Sora segment, so the name differs), ``label``, ``start``/``end`` (the boundary
+- ``window`` seconds, clamped to the video) and the references ``ref_subject``,
``ref_status_before``, ``ref_status_after`` (empty when the file has none).

    python -m pipeline.datasets.gebc ANNOTATION.json --output boundaries.csv [--window 2]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Collection, Sequence

import pandas as pd

from pipeline.config import CONFIG_DIR, ConfigError, load_yaml
from pipeline.datasets.captions import CaptionFormatError, CaptionRecord
from pipeline.datasets.metadata import resolve_video_path, write_csv_atomic

logger = logging.getLogger(__name__)

FIELDS = ("subject", "status_before", "status_after")
REFERENCE_PREFIX = "ref_"
DEFAULT_WINDOW = 2.0
DEFAULT_TEMPLATE = "{video_id}.mp4"
DEFAULT_QUESTIONS = CONFIG_DIR / "captioning" / "gebc_questions.yaml"
_EXPECTED = '{"<video_id>": [{"boundary_id", "timestamp", "subject", "status_before", "status_after", ...}]}'


def boundary_caption(subject: str, status_before: str, status_after: str) -> str:
    """The three captions in one line, as the annotation's ``caption`` field writes them."""
    return f"Subject: {subject} //Status_Before: {status_before} //Status_After: {status_after}"


def _fail(path: Path, problem: str) -> CaptionFormatError:
    return CaptionFormatError(f"{path}: {problem}; expected Kinetic-GEBC's {_EXPECTED}")


def _seconds(path: Path, boundary: dict, key: str, where: str) -> float:
    value = boundary.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _fail(path, f"{where}: '{key}' must be a number of seconds, got {value!r}")
    return float(value)


def _time(seconds: float) -> str:
    return f"{seconds:.3f}"


def _boundary_rows(path: Path, video_id: str, boundaries: Any, window: float, video_template: str) -> list[dict]:
    if not isinstance(boundaries, list) or not all(isinstance(b, dict) for b in boundaries):
        raise _fail(path, f"video {video_id!r}: expected a list of boundary objects, got {type(boundaries).__name__}")
    ends = [_seconds(path, b, "next_timestamp", f"video {video_id!r}") for b in boundaries if "next_timestamp" in b]
    video_end = max(ends, default=math.inf)
    rows = []
    for index, boundary in enumerate(boundaries):
        where = f"video {video_id!r} boundary {index}"
        time = _seconds(path, boundary, "timestamp", where)
        start, end = max(0.0, time - window), min(time + window, video_end)
        if end <= start:
            raise _fail(path, f"{where}: timestamp {time:g} s is not before the video's end {video_end:g} s")
        refs = {}
        for field in FIELDS:
            text = boundary.get(field, "")
            if not isinstance(text, str):
                raise _fail(path, f"{where}: '{field}' must be a string, got {text!r}")
            refs[REFERENCE_PREFIX + field] = text.strip()
        rows.append({"path": video_template.format(video_id=video_id), "video_id": video_id, "boundary": str(index),
                     "boundary_id": str(boundary.get("boundary_id", f"{video_id}_{index}")),
                     "boundary_time": f"{time:g}", "label": str(boundary.get("label") or ""),
                     "start": _time(start), "end": _time(end), **refs})
    return rows


def read_boundaries(path: str | Path, window: float = DEFAULT_WINDOW,
                    video_template: str = DEFAULT_TEMPLATE) -> pd.DataFrame:
    """One row per boundary of a Kinetic-GEBC annotation file (see the module docstring), in file order."""
    path = Path(path)
    if not window > 0:
        raise ValueError(f"the window around a boundary must be positive seconds (got {window})")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise _fail(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise _fail(path, f"the top level is {type(data).__name__ if data else 'empty'}, not an object of videos")
    rows = [row for video_id, boundaries in data.items()
            for row in _boundary_rows(path, video_id, boundaries, window, video_template)]
    if not rows:
        raise _fail(path, "no boundaries")
    ids = pd.Series([row["boundary_id"] for row in rows])
    if ids.duplicated().any():
        raise _fail(path, f"boundary_id {ids[ids.duplicated()].iloc[0]!r} appears more than once")
    return pd.DataFrame(rows)


def read_questions(path: str | Path) -> dict[str, str]:
    """The GEBC questions, in ``FIELDS`` order."""
    questions = load_yaml(path)
    if not isinstance(questions, dict) or sorted(questions) != sorted(FIELDS) or \
            not all(isinstance(q, str) and q.strip() for q in questions.values()):
        raise ConfigError(f"{path}: expected one question (text) for each of {', '.join(FIELDS)}, "
                          f"got {questions!r}")
    return {field: questions[field] for field in FIELDS}


def caption_records(path: str | Path, video_root: str | Path | None = None, video_template: str | None = None,
                    questions: str | Path | None = None, window: float | None = None,
                    video_ids: Collection[str] | None = None) -> list[CaptionRecord]:
    """Training and evaluation samples: per boundary, one record per caption type that has a reference.

    A record's ``video_id`` is ``<boundary_id>:<type>``, its frames come from the boundary's
    window, its ``question`` is that type's (``questions``: a YAML as
    configs/captioning/gebc_questions.yaml) and its ``group`` is the type. Videos are files in
    ``video_root`` (default: the annotation's folder) named by ``video_template``.
    """
    path = Path(path)
    asked = read_questions(questions or DEFAULT_QUESTIONS)
    table = read_boundaries(path, DEFAULT_WINDOW if window is None else window, video_template or DEFAULT_TEMPLATE)
    if video_ids is not None:
        table = table[table["video_id"].isin(video_ids)]
    root = Path(video_root) if video_root is not None else path.parent
    records = [CaptionRecord(f"{row.boundary_id}:{field}", resolve_video_path(row.path, root),
                             (getattr(row, REFERENCE_PREFIX + field),), float(row.start), float(row.end),
                             asked[field], field)
               for row in table.itertuples(index=False) for field in FIELDS if getattr(row, REFERENCE_PREFIX + field)]
    missing = sorted({rec.path for rec in records if not os.path.exists(rec.path)})
    if missing:
        logger.warning("%s: %d videos not found, e.g. %s (the loader will skip them)", path, len(missing), missing[0])
    return records


def references(boundaries: pd.DataFrame) -> dict[str, dict[str, list[str]]]:
    """Per caption type, boundary_id -> its reference captions (boundaries without one are left out)."""
    return {field: {bid: [text] for bid, text in zip(boundaries["boundary_id"], boundaries[REFERENCE_PREFIX + field])
                    if text}
            for field in FIELDS}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write a Kinetic-GEBC annotation's boundaries as a captioning CSV.")
    p.add_argument("annotation", help="Kinetic-GEBC annotation JSON")
    p.add_argument("--output", required=True, help="boundary CSV to write")
    p.add_argument("--window", type=float, default=DEFAULT_WINDOW, help="seconds before and after each boundary")
    p.add_argument("--video_template", default=DEFAULT_TEMPLATE,
                   help="video file name from its id (relative: caption with --video_root the videos' folder)")
    args = p.parse_args(argv)
    try:
        write_csv_atomic(read_boundaries(args.annotation, args.window, args.video_template), args.output)
    except (ValueError, OSError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
