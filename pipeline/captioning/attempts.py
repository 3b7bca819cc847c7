"""Rows that kill the process: counted across runs, captioned alone, then recorded as errors.

A segfault in a kernel or an out-of-memory kill ends the process at the same row on
every re-run, so without this that row would never be recorded and the run never done.

Before a batch goes to the model, its rows' cells are written to the rank's in-flight
file ``<output name>.part<rank>.inflight`` (one JSON line each); once they are in the part
file it is emptied again. A process that dies leaves its batch there. At the next start
rank 0 (holding the output's lock, so no live run writes these files) adds one attempt
per such row to ``<output name>.attempts.json``. A row with an attempt is captioned alone,
with nothing else in flight, so a second death blames exactly that row. A row that reaches
``max_attempts`` is written as an error row instead of being tried again. A CSV output
also settles the files an earlier version named after its stem (``out_part0.inflight``,
``out.attempts.json``; see ``metadata.takes_stem_named_files``), and removes them.

A Python exception never counts: the runner empties the in-flight file when one
propagates, because the row did not kill the process.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.datasets.metadata import RowKey, row_key, takes_stem_named_files

logger = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 2


class ProcessDiedError(RuntimeError):
    """The error recorded for a row the process died on ``max_attempts`` times."""


def inflight_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.part{rank}.inflight")


def attempts_path(output: Path) -> Path:
    return output.with_name(f"{output.name}.attempts.json")


def _stem_named_attempts(output: Path) -> list[Path]:
    """The attempts file an earlier version named after a CSV output's stem, where there is one (an output
    without a suffix had the name it has now)."""
    path = output.with_name(f"{output.stem}.attempts.json")
    return [path] if takes_stem_named_files(output) and path != attempts_path(output) and path.is_file() else []


class InflightFile:
    """This rank's rows in the model right now; what a dead process leaves behind."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "w", encoding="utf-8")

    def set(self, rows: list[dict[str, str]]) -> None:
        self._rewrite("".join(json.dumps(row) + "\n" for row in rows))

    def clear(self) -> None:
        self._rewrite("")

    def _rewrite(self, text: str) -> None:
        # Flushed, not fsynced: this guards against the process dying, not the machine.
        self._file.seek(0)
        self._file.truncate()
        self._file.write(text)
        self._file.flush()

    def close(self) -> None:
        """Close and remove: whatever was in flight has been written or has failed in Python."""
        self._file.close()
        self.path.unlink(missing_ok=True)


def _read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of an in-flight file; a line torn by the death is skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            logger.warning("%s: skipping a torn line", path)
    return rows


def _find_inflight(output: Path) -> list[Path]:
    pattern = rf"{re.escape(output.name)}\.part\d+\.inflight"
    if takes_stem_named_files(output):
        pattern += rf"|{re.escape(output.stem)}_part\d+\.inflight"
    pattern = re.compile(pattern)
    return sorted(p for p in output.parent.iterdir() if pattern.fullmatch(p.name)) if output.parent.is_dir() else []


@dataclass
class Suspect:
    """A row a process died on: its cells (to write its error row) and how many times."""

    cells: dict[str, str]
    attempts: int


def load_suspects(output: Path) -> dict[RowKey, Suspect]:
    """The rows with recorded deaths (read by every rank after rank 0 has settled them)."""
    return _load(attempts_path(output))


def _load(path: Path) -> dict[RowKey, Suspect]:
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        return {row_key(e["cells"]): Suspect(dict(e["cells"]), int(e["attempts"])) for e in entries}
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is damaged ({exc}); delete it to forget which rows killed earlier runs") from exc


def _save(output: Path, suspects: dict[RowKey, Suspect]) -> None:
    path = attempts_path(output)
    if not suspects:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps([{"cells": s.cells, "attempts": s.attempts} for s in suspects.values()], indent=1),
                   encoding="utf-8")
    os.replace(tmp, path)


def pending(output: Path) -> bool:
    """Whether earlier processes left rows to settle (in-flight files or recorded deaths)."""
    return attempts_path(output).is_file() or bool(_stem_named_attempts(output) or _find_inflight(output))


def settle(output: Path, recorded: frozenset[RowKey], max_attempts: int) -> list[Suspect]:
    """Rank 0 at start: count the deaths that in-flight files show, and return the rows that are out of attempts.

    Rows recorded since (captioned, or failed in Python) are forgotten. The returned
    rows leave the attempts file, so the caller must write them as error rows.
    """
    old = _stem_named_attempts(output)
    suspects = {key: s for path in [*old, attempts_path(output)] for key, s in _load(path).items()
                if key not in recorded}
    files = _find_inflight(output)
    for path in files:
        for cells in _read_rows(path):
            key = row_key(cells)
            if key in recorded:
                continue
            suspect = suspects.setdefault(key, Suspect(cells, 0))
            suspect.attempts += 1
            logger.warning("the process died while captioning %s (attempt %d of %d)", cells.get("path"),
                           suspect.attempts, max_attempts)
    out_of_attempts = [key for key, s in suspects.items() if s.attempts >= max_attempts]
    spent = [suspects.pop(key) for key in out_of_attempts]
    _save(output, suspects)
    for path in [*old, *files]:
        path.unlink()
    return spent


def forget_recorded(output: Path, recorded: frozenset[RowKey]) -> None:
    """Rank 0 after the merge: drop the rows that have a result now."""
    suspects = load_suspects(output)
    kept = {key: s for key, s in suspects.items() if key not in recorded}
    if len(kept) < len(suspects):
        _save(output, kept)


def died_error(attempts: int) -> ProcessDiedError:
    return ProcessDiedError(f"the process died while captioning this row {attempts} times (a crash or an "
                            f"out-of-memory kill, see --max_attempts); re-run with --retry_errors to try again")
