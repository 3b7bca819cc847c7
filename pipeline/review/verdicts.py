"""Reviewers' good/bad verdicts, kept in a sidecar CSV beside the table so the table itself is never written.

The sidecar ``<table>.review.csv`` has the row key columns (``path`` and, where the table has them,
``start``/``end``/``timestamp``/``window``, as resume and merge key rows; a table without ``path`` is
keyed by ``row``, the row's position), ``review`` (``good`` or ``bad``) and ``reviewed_at`` (UTC). Rows
sharing a key share a verdict. Verdicts whose key is not in the table (a sidecar kept across a re-run
that dropped rows) are kept and written back. Every change rewrites the file atomically (temporary file,
fsync, rename), one change at a time.
"""
from __future__ import annotations

import datetime
import logging
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.datasets.metadata import KEY_COLUMNS, PATH_COLUMN, write_csv_atomic

logger = logging.getLogger(__name__)

REVIEW_COLUMN = "review"
TIME_COLUMN = "reviewed_at"
ROW_COLUMN = "row"
VERDICTS = ("good", "bad")
Key = tuple[str, ...]


class VerdictsError(ValueError):
    """The sidecar cannot be read back; the message names the file and the fix."""


def sidecar_path(table: Path) -> Path:
    """Where a table's verdicts live: ``out.csv`` -> ``out.csv.review.csv`` (no part-file name pattern)."""
    return table.with_name(f"{table.name}.review.csv")


class Verdicts:
    """The verdict of every row (``review``/``reviewed_at`` arrays for vectorised filters) and the sidecar."""

    def __init__(self, table: pd.DataFrame, sidecar: Path) -> None:
        self.path = sidecar
        if PATH_COLUMN in table.columns:
            self.key_columns = [col for col in KEY_COLUMNS if col in table.columns]
            self._keys: list[Key] = list(zip(*(table[col].to_numpy() for col in self.key_columns)))
        else:
            self.key_columns = [ROW_COLUMN]
            self._keys = [(str(i),) for i in range(len(table))]
        self._rows: dict[Key, list[int]] = {}
        for i, key in enumerate(self._keys):
            self._rows.setdefault(key, []).append(i)
        self._marks: dict[Key, tuple[str, str]] = {}
        self.review = np.full(len(table), "", dtype=object)
        self.reviewed_at = np.full(len(table), "", dtype=object)
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            saved = pd.read_csv(self.path, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise VerdictsError(f"{self.path}: not a readable verdicts CSV ({exc}); move it away to start afresh"
                                ) from None
        missing = [col for col in (*self.key_columns, REVIEW_COLUMN, TIME_COLUMN) if col not in saved.columns]
        if missing:
            raise VerdictsError(f"{self.path}: missing column(s) {', '.join(missing)} (this table's verdicts are "
                                f"keyed by {', '.join(self.key_columns)}); move the file away to start afresh")
        valid = saved[REVIEW_COLUMN].isin(VERDICTS)
        if not valid.all():
            logger.warning("%s: %d row(s) with a review other than good/bad ignored", self.path, int((~valid).sum()))
        saved = saved[valid]
        keys = zip(*(saved[col].to_numpy() for col in self.key_columns))
        for key, verdict, when in zip(keys, saved[REVIEW_COLUMN], saved[TIME_COLUMN]):
            self._set(key, verdict, when)
        unknown = sum(key not in self._rows for key in self._marks)
        logger.info("%s: %d verdict(s) loaded", self.path, len(self._marks) - unknown)
        if unknown:
            logger.warning("%s: %d verdict(s) name rows not in the table; they stay in the file", self.path, unknown)

    def _set(self, key: Key, verdict: str, when: str) -> None:
        if verdict:
            self._marks[key] = (verdict, when)
        else:
            self._marks.pop(key, None)
        rows = self._rows.get(key, [])
        self.review[rows] = verdict
        self.reviewed_at[rows] = when

    def counts(self) -> dict[str, int]:
        """Rows of the table per verdict."""
        return {verdict: int((self.review == verdict).sum()) for verdict in VERDICTS}

    def mark(self, row: int, verdict: str) -> str:
        """Give row ``row`` (and rows sharing its key) ``verdict`` (``""`` clears it), save; the time written."""
        if verdict not in (*VERDICTS, ""):
            raise ValueError(f"a review is one of {', '.join(VERDICTS)} or empty (to clear), not {verdict!r}")
        when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds") if verdict else ""
        with self._lock:  # one change and its write at a time, so the file always holds every change
            self._set(self._keys[row], verdict, when)
            records = [(*key, kind, stamp) for key, (kind, stamp) in self._marks.items()]
            columns = [*self.key_columns, REVIEW_COLUMN, TIME_COLUMN]
            write_csv_atomic(pd.DataFrame(records, columns=columns, dtype=str), self.path)
        return when
