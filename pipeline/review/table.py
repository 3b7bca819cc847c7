"""The reviewed table in memory: filters as vectorised column operations, answered one page at a time.

The table is read once; the lower-cased captions and the flag columns are computed at start, so a
filter over 100k rows is a few numpy/pandas operations and only the page the browser shows is turned
into JSON.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd

from pipeline.captioning.results import REPETITION_COLUMN, TRUNCATED_COLUMN
from pipeline.datasets.metadata import CAPTION_COLUMN, PATH_COLUMN, STATUS_COLUMN
from pipeline.review.verdicts import VERDICTS, Verdicts

FLAG_COLUMNS = (REPETITION_COLUMN, TRUNCATED_COLUMN)
TRUE_CELLS = ("true", "1", "yes")
UNREVIEWED = "none"
DEFAULT_PAGE = 20
MAX_PAGE = 200


class QueryError(ValueError):
    """A filter or page the table cannot answer (the browser shows the message)."""


def _flag(value: str | None, name: str) -> bool | None:
    if value in (None, ""):
        return None
    if value not in ("1", "0"):
        raise QueryError(f"{name} is 1 (flagged), 0 (not flagged) or empty (any), not {value!r}")
    return value == "1"


def _count(value: str | None, name: str, default: int, low: int, high: int) -> int:
    try:
        number = default if value in (None, "") else int(value)
    except ValueError:
        raise QueryError(f"{name} must be a whole number, not {value!r}") from None
    if not low <= number <= high:
        raise QueryError(f"{name} must be between {low} and {high}, not {number}")
    return number


@dataclass(frozen=True)
class Query:
    """One filtered page: every set filter must hold (``None``/empty: any)."""

    status: str | None = None
    flags: tuple[tuple[str, bool], ...] = ()  # (flag column, wanted)
    review: str | None = None  # good, bad or none (unreviewed)
    text: str = ""  # case-insensitive substring of the caption
    column: str | None = None  # with value: rows whose cell in column equals value exactly
    value: str = ""
    offset: int = 0
    limit: int = DEFAULT_PAGE

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> Query:
        """A query from the page's URL parameters; QueryError names a bad one."""
        review = params.get("review") or None
        if review not in (None, *VERDICTS, UNREVIEWED):
            raise QueryError(f"review is one of {', '.join((*VERDICTS, UNREVIEWED))} or empty, not {review!r}")
        flags = tuple((name, wanted) for name in FLAG_COLUMNS
                      if (wanted := _flag(params.get(name), name)) is not None)
        return cls(status=params.get("status") or None, flags=flags, review=review, text=params.get("q", ""),
                   column=params.get("column") or None, value=params.get("value", ""),
                   offset=_count(params.get("offset"), "offset", 0, 0, 2 ** 62),
                   limit=_count(params.get("limit"), "limit", DEFAULT_PAGE, 1, MAX_PAGE))


class ReviewTable:
    """A table of text cells (as ``read_metadata`` gives it) with its verdicts."""

    def __init__(self, table: pd.DataFrame, verdicts: Verdicts) -> None:
        self.table = table
        self.verdicts = verdicts
        self.has_path = PATH_COLUMN in table.columns
        self._captions = table[CAPTION_COLUMN].str.lower() if CAPTION_COLUMN in table.columns else None
        self._flags = {name: table[name].str.strip().str.lower().isin(TRUE_CELLS).to_numpy()
                       for name in FLAG_COLUMNS if name in table.columns}

    def __len__(self) -> int:
        return len(self.table)

    def info(self) -> dict[str, Any]:
        """What the page needs before the first page: columns, filters that apply, counts."""
        statuses = (self.table[STATUS_COLUMN].value_counts().to_dict()
                    if STATUS_COLUMN in self.table.columns else {})
        return {"rows": len(self.table), "columns": list(self.table.columns), "has_path": self.has_path,
                "statuses": {str(k): int(v) for k, v in statuses.items()},
                "flags": {name: int(mask.sum()) for name, mask in self._flags.items()},
                "searchable": self._captions is not None, "reviews": self.verdicts.counts(),
                "key_columns": self.verdicts.key_columns, "sidecar": self.verdicts.path.name}

    def _column(self, name: str) -> np.ndarray:
        if name not in self.table.columns:
            raise QueryError(f"the table has no column {name!r}")
        return self.table[name].to_numpy()

    def matches(self, query: Query) -> np.ndarray:
        """Positions of the rows the query's filters keep, in table order."""
        keep = np.ones(len(self.table), dtype=bool)
        if query.status is not None:
            keep &= self._column(STATUS_COLUMN) == query.status
        for name, wanted in query.flags:
            if name not in self._flags:
                raise QueryError(f"the table has no column {name!r}")
            keep &= self._flags[name] == wanted
        if query.review is not None:
            keep &= self.verdicts.review == ("" if query.review == UNREVIEWED else query.review)
        if query.column is not None:
            keep &= self._column(query.column) == query.value
        if query.text:
            if self._captions is None:
                raise QueryError(f"the table has no {CAPTION_COLUMN!r} column to search")
            # only rows still kept are searched: the other filters usually leave fewer
            kept = np.flatnonzero(keep)
            found = self._captions.iloc[kept].str.contains(query.text.lower(), regex=False).to_numpy()
            return kept[found]
        return np.flatnonzero(keep)

    def page(self, query: Query) -> dict[str, Any]:
        """The query's page as JSON-ready data: every cell of each row, its verdict, and the match count."""
        found = self.matches(query)
        rows = found[query.offset:query.offset + query.limit]
        cells = self.table.iloc[rows].to_dict("records")
        return {"total": len(self.table), "matched": int(len(found)), "offset": query.offset,
                "rows": [{"row": int(i), "cells": c, "review": self.verdicts.review[i],
                          "reviewed_at": self.verdicts.reviewed_at[i]} for i, c in zip(rows, cells)]}

    def row(self, index: int) -> dict[str, str]:
        """One row's cells; IndexError when there is no such row."""
        if not 0 <= index < len(self.table):
            raise IndexError(f"no row {index} (the table has {len(self.table)})")
        return self.table.iloc[index].to_dict()
