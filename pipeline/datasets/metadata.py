"""CSV metadata: read and validate video lists, resolve paths, part files, merge and resume.

Every cell is kept as a string, so ids such as ``007``, empty captions and values such
as ``1.50`` go through the pipeline unchanged. Rows are identified by their raw ``path``
value as written in the CSV (not the resolved file path), so resume and merge work no
matter where the videos live.

Result rows carry ``text`` (caption), ``status`` (``ok`` or ``error``) and ``error``. When
a path has several rows (a retried error, a re-run, the final output merged again with
its parts), the last ``ok`` row wins; a path without any ``ok`` row keeps its last row.
"""

from __future__ import annotations

import io
import logging
import os
import re
import uuid
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

PATH_COLUMN = "path"
CAPTION_COLUMN = "text"
STATUS_COLUMN = "status"
ERROR_COLUMN = "error"
RESULT_COLUMNS = (CAPTION_COLUMN, STATUS_COLUMN, ERROR_COLUMN)
STATUS_OK = "ok"
STATUS_ERROR = "error"

StrPath = str | os.PathLike


class MetadataError(ValueError):
    """A metadata CSV cannot be used; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class Progress:
    """What earlier runs already wrote for one output: the merged rows and their outcome."""

    table: pd.DataFrame
    done: frozenset[str]
    failed: frozenset[str]


def _parse_csv(source: StrPath | io.BytesIO, label: str) -> pd.DataFrame:
    """Parse CSV text as strings; turn every pandas parse problem into a MetadataError."""
    try:
        with warnings.catch_warnings():
            # With index_col=False pandas only warns (and drops data) on a too-long first row.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(
                source, dtype=str, keep_default_na=False, index_col=False, encoding="utf-8-sig"
            )
    except pd.errors.EmptyDataError:
        raise MetadataError(
            f"{label}: the file has no header line; write a CSV whose first line names "
            f"the columns (at least '{PATH_COLUMN}')"
        ) from None
    except (pd.errors.ParserError, pd.errors.ParserWarning) as exc:
        raise MetadataError(
            f"{label}: not a valid CSV ({exc}); check quoting and that every row has as "
            f"many fields as the header"
        ) from None
    except UnicodeDecodeError as exc:
        raise MetadataError(f"{label}: not UTF-8 text ({exc}); save the CSV as UTF-8") from None
    # Rows shorter than the header leave NaN in the missing cells.
    return df.fillna("")


def _validate(df: pd.DataFrame, label: str, required: Sequence[str]) -> pd.DataFrame:
    missing = [col for col in required if col not in df.columns]
    if missing:
        found = ", ".join(repr(col) for col in df.columns) or "none"
        raise MetadataError(
            f"{label}: missing required column(s) {', '.join(repr(c) for c in missing)}; "
            f"columns found: {found}. Rename the video column to '{PATH_COLUMN}' in the header"
        )
    if PATH_COLUMN in required:
        empty = df.index[df[PATH_COLUMN].str.strip() == ""]
        if len(empty):
            lines = ", ".join(str(i + 2) for i in empty[:5])
            raise MetadataError(
                f"{label}: {len(empty)} row(s) with an empty '{PATH_COLUMN}' (line {lines}); "
                f"fill in or delete those rows"
            )
    return df


def _warn_duplicates(df: pd.DataFrame, label: str) -> None:
    if PATH_COLUMN not in df.columns:
        return
    dup = df[PATH_COLUMN].duplicated()
    if dup.any():
        logger.warning(
            "%s: %d duplicate '%s' value(s), e.g. %r; later steps keep one row per path",
            label, int(dup.sum()), PATH_COLUMN, df.loc[dup, PATH_COLUMN].iloc[0],
        )


def read_metadata(
    csv_path: StrPath, required: Sequence[str] = (PATH_COLUMN,), *, warn_duplicates: bool = True
) -> pd.DataFrame:
    """Read a metadata CSV with every column as a string and check it is usable.

    A header-only file gives an empty table (valid for merging; nothing to caption).
    A missing, 0-byte or unparseable file, a missing required column or an empty
    ``path`` value raise MetadataError. Duplicate paths only log a warning.
    """
    label = os.fspath(csv_path)
    if not os.path.exists(label):
        raise MetadataError(f"{label}: file not found; check the path (relative paths are from {os.getcwd()})")
    if os.path.isdir(label):
        raise MetadataError(f"{label}: is a directory; give the CSV file inside it")
    if os.path.getsize(label) == 0:
        raise MetadataError(
            f"{label}: the file is empty (0 bytes); write a header line with at least '{PATH_COLUMN}'"
        )
    df = _validate(_parse_csv(label, label), label, required)
    if warn_duplicates:
        _warn_duplicates(df, label)
    return df


def resolve_video_path(path_value: str, csv_dir: StrPath, video_root: StrPath | None = None) -> str:
    """Turn a ``path`` cell into a file path: absolute stays, relative joins video_root or csv_dir."""
    if os.path.isabs(path_value):
        return path_value
    base = video_root if video_root is not None else csv_dir
    return os.path.abspath(os.path.join(os.fspath(base), path_value))


def write_csv_atomic(df: pd.DataFrame, out_path: StrPath) -> None:
    """Write a CSV so readers see the old file or the complete new one, never a partial one."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    # os.open with 0o666 lets the umask decide permissions, as for a plain open().
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, "w", encoding="utf-8", newline="") as fh:
            df.to_csv(fh, index=False, lineterminator="\r\n")  # as csv.writer: quotes a lone \r too
            fh.flush()
            os.fsync(fh.fileno())
        if out.exists():
            os.chmod(tmp, out.stat().st_mode & 0o7777)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(out.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; some filesystems refuse to open directories, which is harmless."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def part_path(output: StrPath, rank: int) -> Path:
    """Part file of one rank: ``out.csv`` -> ``out_part{rank}.csv`` in the same folder."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be a non-negative int, got {rank!r}")
    out = Path(output)
    return out.with_name(f"{out.stem}_part{rank}.csv")


def find_part_files(output: StrPath) -> list[Path]:
    """Existing part files of an output (``<stem>_part<digits>.csv``), sorted by rank number."""
    out = Path(output)
    pattern = re.compile(rf"{re.escape(out.stem)}_part(\d+)\.csv")
    folder = out.parent
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return [entry for _, entry in sorted(found)]


def merge_tables(tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate tables and keep one row per path: the last ``ok`` row, else the last row.

    Columns are the union in first-seen order, cells a table lacks become "". Paths
    keep the order in which they first appear. Without a ``status`` column no row
    counts as ok, so simply the last row per path is kept.
    """
    columns: list[str] = []
    for table in tables:
        columns.extend(col for col in table.columns if col not in columns)
    if PATH_COLUMN not in columns:
        columns.insert(0, PATH_COLUMN)
    parts = [table.reindex(columns=columns, fill_value="") for table in tables if len(table)]
    if not parts:
        return pd.DataFrame({col: pd.Series(dtype=object) for col in columns})
    data = pd.concat(parts, ignore_index=True).fillna("")
    ok = (data[STATUS_COLUMN] == STATUS_OK).to_numpy() if STATUS_COLUMN in data.columns \
        else np.zeros(len(data), bool)
    # One pass, no helper columns (so no user column can collide): a dict keeps each path
    # at its first-seen position while the row it points to moves to the last ok (else last) row.
    kept: dict[str, int] = {}
    for row, path in enumerate(data[PATH_COLUMN].to_numpy()):
        if ok[row] or path not in kept or not ok[kept[path]]:
            kept[path] = row
    return data.iloc[list(kept.values())][columns].reset_index(drop=True)


def merge_csvs(inputs: Sequence[StrPath], output: StrPath, remove_inputs: bool = False) -> pd.DataFrame:
    """Read CSVs, merge them with merge_tables, write the result atomically and return it.

    With remove_inputs, the inputs (never the output itself) are deleted only after
    the output was written.
    """
    tables = [read_metadata(path, warn_duplicates=False) for path in inputs]
    merged = merge_tables(tables)
    write_csv_atomic(merged, output)
    if remove_inputs:
        _remove_files(inputs, keep=output)
    return merged


def _remove_files(paths: Iterable[StrPath], keep: StrPath) -> None:
    keep_path = os.path.abspath(keep)
    for path in paths:
        if os.path.abspath(path) != keep_path:
            os.remove(path)
            logger.info("removed merged file %s", path)


def complete_prefix_length(data: bytes) -> int:
    """Length of the leading complete CSV records in data (quote-aware; captions may hold newlines).

    A record is complete when it ends in a newline outside quotes. Anything after
    the last such newline is a record cut short by a crash.
    """
    total_quotes = data.count(b'"')
    if data.endswith(b"\n") and total_quotes % 2 == 0:
        return len(data)
    quotes_after = 0
    end = len(data)
    while True:
        newline = data.rfind(b"\n", 0, end)
        if newline < 0:
            return 0
        quotes_after += data.count(b'"', newline + 1, end)
        end = newline
        if (total_quotes - quotes_after) % 2 == 0:
            return newline + 1


def trim_incomplete_record(path: StrPath) -> int:
    """Cut a record left half-written by a crash from the end of a part file before appending.

    Returns the number of bytes removed (0 when the file ends cleanly or does not exist).
    """
    if not os.path.exists(path):
        return 0
    with open(path, "rb+") as fh:
        data = fh.read()
        keep = complete_prefix_length(data)
        if keep < len(data):
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
            logger.warning("%s: removed %d bytes of an incomplete last record", path, len(data) - keep)
    return len(data) - keep


def _read_part(path: Path) -> pd.DataFrame | None:
    """Read a part file that its rank may still be writing or that a crash cut short."""
    label = os.fspath(path)
    data = path.read_bytes()
    keep = complete_prefix_length(data)
    if keep < len(data):
        logger.warning("%s: ignoring %d bytes of an incomplete last record", label, len(data) - keep)
    if keep == 0:
        logger.info("%s: no complete header yet, skipped", label)
        return None
    return _validate(_parse_csv(io.BytesIO(data[:keep]), label), label, (PATH_COLUMN,))


def read_table(path: StrPath) -> pd.DataFrame:
    """``read_metadata`` for ordinary CSVs; a part file (``*_part<N>.csv``), which a crash may
    have cut short, loses only its torn last record."""
    path = Path(path)
    if re.search(r"_part\d+\.csv$", path.name):
        table = _read_part(path)
        return table if table is not None else pd.DataFrame({PATH_COLUMN: pd.Series(dtype=object)})
    return read_metadata(path, warn_duplicates=False)


def read_progress(output: StrPath) -> Progress:
    """Merge the final output (if present) and all its part files, and say which paths are settled.

    ``done``: paths with an ``ok`` row. ``failed``: paths whose kept row has status
    ``error`` (a re-run may retry them). Paths absent from both still need captioning.
    """
    tables = []
    out = Path(output)
    if out.exists():
        tables.append(read_metadata(out, warn_duplicates=False))
    for part in find_part_files(out):
        table = _read_part(part)
        if table is not None:
            tables.append(table)
    merged = merge_tables(tables)
    status = merged[STATUS_COLUMN] if STATUS_COLUMN in merged.columns else pd.Series("", index=merged.index)
    paths = merged[PATH_COLUMN]
    return Progress(
        table=merged,
        done=frozenset(paths[status == STATUS_OK]),
        failed=frozenset(paths[status == STATUS_ERROR]),
    )


def finalize_output(output: StrPath, order: Sequence[str] | None = None, remove_parts: bool = True) -> pd.DataFrame:
    """Merge the final output and its part files into the final output atomically.

    ``order`` (e.g. the input's path column) sorts rows like the input; paths not in
    it follow in first-seen order. Part files are deleted only after the write. Call
    it when no rank writes anymore (after a barrier). Running it again is harmless.
    """
    parts = find_part_files(output)
    merged = read_progress(output).table
    if order is not None:
        rank = {path: i for i, path in enumerate(dict.fromkeys(order))}
        key = merged[PATH_COLUMN].map(rank).fillna(len(rank))
        merged = merged.iloc[key.argsort(kind="stable")].reset_index(drop=True)
    write_csv_atomic(merged, output)
    if remove_parts:
        _remove_files(parts, keep=output)
    return merged


def _path_values(other: pd.DataFrame | Iterable[str]) -> set[str]:
    if isinstance(other, pd.DataFrame):
        if PATH_COLUMN not in other.columns:
            raise MetadataError(f"table has no '{PATH_COLUMN}' column; columns found: {list(other.columns)}")
        return set(other[PATH_COLUMN])
    return set(other)


def difference(data: pd.DataFrame, done: pd.DataFrame | Iterable[str]) -> pd.DataFrame:
    """Rows of data whose path is not in done (a table or path values), in data's order."""
    return data[~data[PATH_COLUMN].isin(_path_values(done))].reset_index(drop=True)


def intersection(data: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """Rows of data whose path is also in other, with other's extra columns joined on.

    As in Open-Sora: data's rows, order and values win for shared columns; columns
    only other has are added (from other's last row for a path, so no row is doubled).
    """
    if PATH_COLUMN not in other.columns:
        raise MetadataError(f"table has no '{PATH_COLUMN}' column; columns found: {list(other.columns)}")
    extra = [col for col in other.columns if col not in data.columns]
    right = other.drop_duplicates(PATH_COLUMN, keep="last")[[PATH_COLUMN, *extra]]
    return data.merge(right, on=PATH_COLUMN, how="inner", sort=False).reset_index(drop=True)


def remove_empty_caption(df: pd.DataFrame, column: str = CAPTION_COLUMN) -> pd.DataFrame:
    """Drop rows whose caption is empty, whitespace or NaN (they are useless for training)."""
    if column not in df.columns:
        raise MetadataError(f"no caption column '{column}'; columns found: {list(df.columns)}")
    text = df[column].fillna("").astype(str).str.strip()
    return df[text != ""].reset_index(drop=True)
