"""Windows: one input row (a video or a segment of one) captioned as several rows of fixed length.

Each window row carries ``window``, ``num_windows``, ``start`` and ``end``; an input's own
``start``/``end`` move to ``segment_start``/``segment_end`` so each window row still names its
input row. Recording ``num_windows`` lets a re-run tell that an input row is finished without
opening its video (see :func:`windows_complete`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import pandas as pd

from pipeline.datasets.metadata import (
    END_COLUMN,
    NUM_WINDOWS_COLUMN,
    SEGMENT_END_COLUMN,
    SEGMENT_START_COLUMN,
    START_COLUMN,
    WINDOW_COLUMN,
    RowKey,
    format_seconds,
    row_key,
    row_segment,
    source_keys,
)
from pipeline.datasets.video import split_windows

WINDOW_COLUMNS = (WINDOW_COLUMN, NUM_WINDOWS_COLUMN, START_COLUMN, END_COLUMN)


@dataclass(frozen=True)
class Windowing:
    """Split every input row into windows of ``seconds``; a last one shorter than ``min_seconds`` joins the one before."""

    seconds: float
    min_seconds: float


def has_segment_columns(columns: Sequence[str]) -> bool:
    """Whether an input's own start/end must move to segment_start/segment_end in windowed output."""
    return START_COLUMN in columns or END_COLUMN in columns


def _with_segment(record: Mapping[str, str], segment_columns: bool) -> dict[str, str]:
    """The input cells, with the input's own start/end copied to segment_start/segment_end."""
    row = dict(record)
    if segment_columns:
        row[SEGMENT_START_COLUMN] = record.get(START_COLUMN, "")
        row[SEGMENT_END_COLUMN] = record.get(END_COLUMN, "")
    return row


def window_rows(record: Mapping[str, str], spans: Sequence[tuple[float, float]],
                segment_columns: bool) -> list[dict[str, str]]:
    """The output cells (results aside) of an input row's windows: every input column plus the window's."""
    base = _with_segment(record, segment_columns)
    return [{**base, WINDOW_COLUMN: str(i), NUM_WINDOWS_COLUMN: str(len(spans)),
             START_COLUMN: format_seconds(begin), END_COLUMN: format_seconds(end)}
            for i, (begin, end) in enumerate(spans)]


def whole_row(record: Mapping[str, str], segment_columns: bool) -> dict[str, str]:
    """A windowed run's row for an input row it could not split (its error row): the input row's own key."""
    return {**_with_segment(record, segment_columns), WINDOW_COLUMN: "", NUM_WINDOWS_COLUMN: ""}


def recorded_windows(table: pd.DataFrame) -> dict[RowKey, dict[str, tuple[str, str]]]:
    """Per input row (source key): window number -> (num_windows, end) of its recorded window rows."""
    found: dict[RowKey, dict[str, tuple[str, str]]] = {}
    if WINDOW_COLUMN not in table.columns or not len(table):
        return found
    blank = [""] * len(table)
    counts = table[NUM_WINDOWS_COLUMN] if NUM_WINDOWS_COLUMN in table.columns else blank
    ends = table[END_COLUMN] if END_COLUMN in table.columns else blank
    for source, window, count, end in zip(source_keys(table), table[WINDOW_COLUMN], counts, ends):
        if window:
            found.setdefault(source, {})[window] = (count, end)
    return found


def recorded_end(windows: Mapping[str, tuple[str, str]]) -> float | None:
    """Where an input row's recorded windows say it ends: the end of window num_windows - 1."""
    counts = {count for count, _ in windows.values()}
    if len(counts) != 1:
        return None
    count = counts.pop()
    if not count.isdigit() or str(int(count) - 1) not in windows:
        return None
    try:
        return float(windows[str(int(count) - 1)][1])
    except ValueError:
        return None


def windows_complete(record: Mapping[str, str], recorded: Mapping[str, tuple[str, str]] | None,
                      finished: frozenset[RowKey], windowing: Windowing, segment_columns: bool) -> bool:
    """Whether every window of an input row is recorded, decided without opening its video."""
    try:
        segment = row_segment(record)
    except ValueError:
        return False
    begin, end = segment or (0.0, None)
    if end is None:
        end = recorded_end(recorded) if recorded else None
        if end is None:
            return False
    spans = split_windows(begin, end, windowing.seconds, windowing.min_seconds)
    return all(row_key(row) in finished for row in window_rows(record, spans, segment_columns))
