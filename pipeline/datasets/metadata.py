"""Metadata tables: read and validate video lists, resolve paths, part files, merge and resume.

Tables are CSV, Parquet (``.parquet``) or JSON Lines (``.jsonl``), chosen by the file's
suffix (anything else is CSV). Inside the pipeline every cell is a string, so ids such
as ``007``, empty captions and values such as ``1.50`` go through unchanged. A Parquet
or JSONL table also has a ``Schema``: each column's type, with which its cells were
turned into text (``read_schema``) and are turned back when a Parquet or JSONL file is
written (``write_table_atomic``). A CSV has no schema: its columns stay text everywhere.
Dates, times and decimals read as their ISO/plain text, bytes as base64; a Parquet output
gets a Parquet input's exact column types back. A column type with no text form (a
duration, a map, dates or bytes inside lists) is refused in one line naming the column.

Row keys. A row is identified by its raw cells as written in the CSV (not the resolved
file path), so resume and merge work no matter where the videos live: by ``path`` alone
when the row names the whole file, else by ``(path, start, end, timestamp, window)`` (a
segment or window of it; missing columns count as empty). So several rows may share a
path, and a table without those columns behaves exactly as when rows were keyed by
path. A window row (``window`` set) also knows the input row it came from, its source
key (see ``source_keys``).

Result rows carry ``text`` (caption), ``status`` (``ok`` or ``error``) and ``error``. When
a key has several rows (a retried error, a re-run, the final output merged again with
its parts), the last ``ok`` row wins; a key without any ``ok`` row keeps its last row.
"""

from __future__ import annotations

import ast
import base64
import datetime
import decimal
import io
import json
import logging
import math
import os
import re
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

PATH_COLUMN = "path"
CAPTION_COLUMN = "text"
STATUS_COLUMN = "status"
ERROR_COLUMN = "error"
RESULT_COLUMNS = (CAPTION_COLUMN, STATUS_COLUMN, ERROR_COLUMN)
STATUS_OK = "ok"
STATUS_ERROR = "error"
START_COLUMN = "start"
END_COLUMN = "end"
TIMESTAMP_COLUMN = "timestamp"
WINDOW_COLUMN = "window"
NUM_WINDOWS_COLUMN = "num_windows"
# A windowed run writes each window's times to start/end; an input's own start/end move here.
SEGMENT_START_COLUMN = "segment_start"
SEGMENT_END_COLUMN = "segment_end"
KEY_COLUMNS = (PATH_COLUMN, START_COLUMN, END_COLUMN, TIMESTAMP_COLUMN, WINDOW_COLUMN)

StrPath = str | os.PathLike
RowKey = str | tuple[str, ...]  # a bare path, or the cells of KEY_COLUMNS


class MetadataError(ValueError):
    """A metadata CSV cannot be used; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class Progress:
    """What earlier runs already wrote for one output: the merged rows and their outcome."""

    table: pd.DataFrame
    done: frozenset[RowKey]
    failed: frozenset[RowKey]


# ----------------------------------------------------------------------------- row keys

def _canonical(cells: tuple[str, ...]) -> RowKey:
    """A bare path when the row names the whole file, so path-keyed callers keep working."""
    return cells if any(cells[1:]) else cells[0]


def row_key(row: Mapping[str, object]) -> RowKey:
    """The key of one row given as a mapping of column to cell (see the module docstring)."""
    return _canonical(tuple(str(row.get(col, "")) for col in KEY_COLUMNS))


def _column(table: pd.DataFrame, column: str) -> Sequence[str]:
    return table[column].to_numpy() if column in table.columns else [""] * len(table)


def row_keys(table: pd.DataFrame) -> list[RowKey]:
    """Every row's key, in table order."""
    return [_canonical(cells) for cells in zip(*(_column(table, col) for col in KEY_COLUMNS))]


def source_keys(table: pd.DataFrame) -> list[RowKey]:
    """The key of the input row each row stands for: a window row's parent, any other row itself.

    A window row's parent has the row's path and timestamp and, where the input had its
    own start/end, the ``segment_start``/``segment_end`` the windowed run moved them to.
    """
    path, start, end, timestamp, window = (_column(table, col) for col in KEY_COLUMNS)
    seg_start, seg_end = _column(table, SEGMENT_START_COLUMN), _column(table, SEGMENT_END_COLUMN)
    return [_canonical((p, ss, se, t, "")) if w else _canonical((p, s, e, t, w))
            for p, s, e, t, w, ss, se in zip(path, start, end, timestamp, window, seg_start, seg_end)]


def _key_columns(df: pd.DataFrame) -> list[str]:
    return [col for col in KEY_COLUMNS if col in df.columns]


# ----------------------------------------------------------------------------- segments

_CLOCK = re.compile(r"(?:(\d+):)?(\d+):(\d+(?:\.\d*)?)")


def parse_time(text: str, what: str) -> float:
    """Seconds from a cell: plain seconds ("12.5") or a timecode ("00:01:02.500", "1:02.5")."""
    text = text.strip()
    match = _CLOCK.fullmatch(text)
    if match:
        hours, minutes, seconds = match.groups()
        value = int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds)
    else:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{what} {text!r} is not a time; write seconds >= 0 (e.g. 12.5) or HH:MM:SS.mmm")
    return value


def format_seconds(value: float) -> str:
    """Seconds as a plain cell: at most millisecond precision, no trailing zeros ("12.5", "10")."""
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _literal(cell: str) -> object:
    try:
        return ast.literal_eval(cell)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def _is_pair(value: object) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and not isinstance(value[0], (tuple, list))


def parse_timestamp(cell: str) -> tuple[float, float]:
    """(start, end) seconds from an Open-Sora style ``timestamp`` cell.

    Accepts one pair, "('00:00:01.000', '00:00:05.500')" or "(1.0, 5.5)", and a list
    holding one pair (what Open-Sora's scene_detect writes for a one-scene video).
    """
    value = _literal(cell)
    if isinstance(value, list) and len(value) != 1 and all(_is_pair(v) for v in value):
        raise ValueError(f"timestamp holds {len(value)} scenes, not one; split them into one row per "
                         f"scene first (datautil meta.csv --split-timestamp --output scenes.csv)")
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not _is_pair(value):
        raise ValueError(f"timestamp {cell[:80]!r} is not a (start, end) pair such as "
                         f"\"('00:00:01.000', '00:00:05.500')\"")
    start, end = (parse_time(str(v), "timestamp time") for v in value)
    return start, end


def row_segment(row: Mapping[str, object]) -> tuple[float, float | None] | None:
    """The part of its file a row names: None for the whole file, else (start, end), end None for the file's end.

    From ``timestamp``, or from ``start``/``end`` (either may be empty: the file's start
    or end); a window row of a windowed output names its window's ``start``/``end``.
    Raises ValueError, naming the cells and the fix, for unreadable times, both kinds
    given at once, or an end not after the start.
    """
    start, end, timestamp, window = (str(row.get(col, "")).strip()
                                     for col in (START_COLUMN, END_COLUMN, TIMESTAMP_COLUMN, WINDOW_COLUMN))
    if timestamp and not window:
        if start or end:
            raise ValueError("the row has both a timestamp and start/end; keep only one of them")
        begin, finish = parse_timestamp(timestamp)
    elif not start and not end:
        return None
    else:
        begin = parse_time(start, "start") if start else 0.0
        finish = parse_time(end, "end") if end else None
    if finish is not None and finish <= begin:
        raise ValueError(f"segment end {finish:g} s is not after its start {begin:g} s; fix the row's "
                         f"{'timestamp' if timestamp else 'start/end'}")
    return begin, finish


def _scenes(cell: str, row: int) -> list[str]:
    """The scenes of one ``timestamp`` cell, each as a one-pair cell in Open-Sora's notation."""
    value = _literal(cell)
    if _is_pair(value):
        return [cell]
    if not isinstance(value, list) or not all(_is_pair(v) for v in value):
        raise MetadataError(f"row {row}: timestamp {cell[:80]!r} is not a list of (start, end) pairs")
    return [str(tuple(scene)) for scene in value]


def split_timestamps(df: pd.DataFrame) -> pd.DataFrame:
    """One row per scene of list-valued ``timestamp`` cells (Open-Sora's scene_detect puts a video's
    scenes in one cell); other columns are repeated, an empty cell stays one whole-video row."""
    if TIMESTAMP_COLUMN not in df.columns:
        raise MetadataError(f"no '{TIMESTAMP_COLUMN}' column to split; columns found: {list(df.columns)}")
    records = []
    for row, record in enumerate(df.to_dict("records"), start=1):
        cell = str(record[TIMESTAMP_COLUMN]).strip()
        for scene in _scenes(cell, row) if cell else [cell]:
            records.append({**record, TIMESTAMP_COLUMN: scene})
    return pd.DataFrame(records, columns=df.columns)


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


# ----------------------------------------------------------------------------- formats

PARQUET_SUFFIX = ".parquet"
JSONL_SUFFIX = ".jsonl"
# "number": a JSONL column mixing integers and floats, each cell keeping its own; "json": lists, dicts or
# other mixed values, held as JSON text.
KINDS = ("string", "int", "float", "number", "bool", "datetime", "date", "time", "decimal", "binary", "json")


@dataclass(frozen=True)
class ColumnType:
    """A Parquet or JSONL column's type: how its cells read as text and what they turn back into."""

    kind: str  # one of KINDS
    dtype: Any  # the pandas dtype a Parquet file gets back, e.g. Int64, float32, datetime64[ns, UTC]
    arrow: pa.DataType | None = None  # a Parquet input's column type, given back exactly where the cells fit


Schema = dict[str, ColumnType]


def table_format(path: StrPath) -> str:
    """The format a file name asks for: ``.parquet``, ``.jsonl`` or (any other suffix) ``.csv``."""
    suffix = Path(path).suffix.lower()
    return suffix if suffix in (PARQUET_SUFFIX, JSONL_SUFFIX) else ".csv"


def _scalar_arrow_kind(arrow: pa.DataType) -> str | None:
    """The kind of the Arrow types read as their own text (pandas gives date, time, Decimal, bytes objects)."""
    if pa.types.is_date(arrow):
        return "date"
    if pa.types.is_time(arrow):
        return "time"
    if pa.types.is_decimal(arrow):
        return "decimal"
    if pa.types.is_binary(arrow) or pa.types.is_large_binary(arrow) or pa.types.is_fixed_size_binary(arrow):
        return "binary"
    return None


def _has_text_form(arrow: pa.DataType, nested: bool = False) -> bool:
    """Whether cells of this Arrow type can be pipeline text and back: JSON values inside lists and structs,
    and at the top also timestamps, dates, times, decimals and bytes."""
    if pa.types.is_dictionary(arrow):
        return _has_text_form(arrow.value_type, nested)
    if (pa.types.is_string(arrow) or pa.types.is_large_string(arrow) or pa.types.is_integer(arrow)
            or pa.types.is_floating(arrow) or pa.types.is_boolean(arrow) or pa.types.is_null(arrow)):
        return True
    if pa.types.is_list(arrow) or pa.types.is_large_list(arrow) or pa.types.is_fixed_size_list(arrow):
        return _has_text_form(arrow.value_type, True)
    if pa.types.is_struct(arrow):
        return all(_has_text_form(arrow.field(i).type, True) for i in range(arrow.num_fields))
    return not nested and (pa.types.is_timestamp(arrow) or _scalar_arrow_kind(arrow) is not None)


def _dtype_kind(series: pd.Series) -> str:
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_integer_dtype(dtype):
        return "int"
    if pd.api.types.is_float_dtype(dtype):
        return "float"
    if pd.api.types.is_datetime64_any_dtype(dtype):
        return "datetime"
    return _value_kind(series.tolist())


def _value_kind(values: Sequence[object]) -> str:
    """The kind of a column from its Python values (nulls ignored)."""
    present = [v for v in values if not _is_null(v)]
    if all(isinstance(v, str) for v in present):
        return "string"
    if all(isinstance(v, bool) for v in present):
        return "bool"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "int"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return "number" if any(isinstance(v, int) for v in present) else "float"
    return "json"


# "number": a Parquet column holds one type, so mixed integers and floats go there as floats
_JSONL_DTYPES = {"string": "object", "int": "Int64", "float": "float64", "number": "float64", "bool": "boolean",
                 "datetime": "datetime64[ns]", "json": "object"}
_INTEGER_TEXT = re.compile(r"[+-]?\d+")


def _plain(value: object) -> object:
    """A JSON-serialisable copy of a cell (Parquet lists come back as numpy arrays)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value.item() if isinstance(value, np.generic) else value


def _is_null(value: object) -> bool:
    return value is None or (np.ndim(value) == 0 and bool(pd.isna(value)))


def _cell_text(value: object, column: ColumnType) -> str:
    """One typed cell as pipeline text: "" for a null, JSON for json columns, "true"/"false", ISO times."""
    if _is_null(value):
        return ""
    if column.kind == "json":
        return json.dumps(_plain(value), ensure_ascii=False)
    if column.kind == "bool":
        return "true" if value else "false"
    if column.kind == "datetime":
        return pd.Timestamp(value).isoformat()
    if column.kind in ("date", "time"):
        return value.isoformat()
    if column.kind == "decimal":
        return format(value, "f")
    if column.kind == "binary":
        return base64.b64encode(bytes(value)).decode("ascii")
    if column.kind == "float":  # the shortest text that reads back as the same value of its precision
        dtype = pd.api.types.pandas_dtype(column.dtype)
        return str(getattr(dtype, "numpy_dtype", dtype).type(value))
    return str(value)


def _column_text(values: Sequence[object], column: ColumnType, label: str, name: str) -> pd.Series:
    """A column's cells as text; values nested past Python's recursion limit are refused in one line."""
    try:
        return pd.Series([_cell_text(v, column) for v in values], dtype=object)
    except RecursionError:
        raise MetadataError(f"{label}: column {name!r} nests lists or objects too deeply to read; "
                            f"flatten it or drop the column") from None


def _typed_to_text(df: pd.DataFrame, schema: Schema, label: str) -> pd.DataFrame:
    return pd.DataFrame({col: _column_text(df[col].tolist(), schema[col], label, col) for col in df.columns})


def _text_value(text: str, kind: str) -> object:
    """A text cell back as a Python value of its kind (None for an empty non-string cell)."""
    if kind == "string":
        return text
    if text == "":
        return None
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    if kind == "number":
        return int(text) if _INTEGER_TEXT.fullmatch(text) else float(text)
    if kind == "bool":
        if text not in ("true", "false"):
            raise ValueError(f"{text!r} is not true or false")
        return text == "true"
    return json.loads(text) if kind == "json" else text


def _decimal(text: str) -> decimal.Decimal:
    try:
        return decimal.Decimal(text)
    except decimal.InvalidOperation:
        raise ValueError(f"{text!r} is not a decimal number") from None


# text back to the objects pandas and pyarrow write as dates, times, decimals and bytes
_OBJECT_VALUES: dict[str, Callable[[str], object]] = {
    "date": datetime.date.fromisoformat, "time": datetime.time.fromisoformat, "decimal": _decimal,
    "binary": lambda text: base64.b64decode(text, validate=True)}


def _typed_series(texts: Sequence[str], column: ColumnType) -> pd.Series:
    """Text cells as a pandas column of the schema's dtype (a nullable one where cells are empty)."""
    if column.kind in _OBJECT_VALUES:
        return pd.Series([_OBJECT_VALUES[column.kind](t) if t else None for t in texts], dtype=object)
    values = [_text_value(t, column.kind) for t in texts]
    dtype = pd.api.types.pandas_dtype(column.dtype)
    if column.kind == "datetime":
        tz = getattr(dtype, "tz", None)
        parsed = pd.to_datetime(pd.Series(values, dtype=object), utc=tz is not None)
        return (parsed.dt.tz_convert(tz) if tz is not None else parsed).astype(dtype)
    if column.kind in ("int", "bool") and isinstance(dtype, np.dtype) and None in values:
        dtype = pd.api.types.pandas_dtype("Int64" if column.kind == "int" else "boolean")
    return pd.Series(values, dtype=dtype)


def _restore(df: pd.DataFrame, schema: Schema, label: str, convert: Callable[[list[str], ColumnType], Any]
             ) -> dict[str, Any]:
    """Each column converted by its schema type; a column whose cells no longer fit stays text (warned)."""
    columns: dict[str, Any] = {}
    for col in df.columns:
        texts = ["" if _is_null(v) else str(v) for v in df[col].tolist()]
        column = schema.get(col)
        try:
            columns[col] = convert(texts, column) if column is not None else texts
        except (ValueError, TypeError, OverflowError) as exc:
            logger.warning("%s: column %r does not fit its input type %s (%s); written as text",
                           label, col, column.dtype, exc)
            columns[col] = texts
    return columns


# Where a row is in its file, for messages: ("line", each row's line number) or ("row", its 1-based number).
Positions = tuple[str, Sequence[int]]


def _check_text_forms(types: dict[str, pa.DataType], label: str) -> None:
    """Refuse, before any cell is read, a column whose type has no text form."""
    for name, arrow in types.items():
        if not _has_text_form(arrow):
            raise MetadataError(f"{label}: column {name!r} is {arrow}, which the pipeline cannot hold as text "
                                f"(it keeps text, numbers, booleans, timestamps, dates, times, decimals, bytes, "
                                f"and lists/structs of text, numbers and booleans); cast it or drop the column")


def _read_parquet(label: str) -> tuple[pd.DataFrame, Schema, Positions]:
    invalid = f"{label}: not a valid Parquet file ({{}}); write it with pandas or pyarrow"
    try:
        types = {field.name: field.type for field in pq.read_schema(label)}
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise MetadataError(invalid.format(exc)) from None
    _check_text_forms(types, label)
    try:
        typed = pd.read_parquet(label, dtype_backend="numpy_nullable")
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise MetadataError(invalid.format(exc)) from None
    typed.columns = [str(col) for col in typed.columns]
    schema = {}
    for col in typed.columns:
        arrow = types.get(col)
        kind = (_scalar_arrow_kind(arrow) if arrow is not None else None) or _dtype_kind(typed[col])
        schema[col] = ColumnType(kind, typed[col].dtype, arrow)
    return _typed_to_text(typed, schema, label), schema, ("row", range(1, len(typed) + 1))


def _read_jsonl(label: str) -> tuple[pd.DataFrame, Schema, Positions]:
    """One JSON object per line (blank lines skipped); keys are columns, in first-seen order."""
    try:
        text = Path(label).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MetadataError(f"{label}: not UTF-8 text ({exc}); save the JSONL file as UTF-8") from None
    records, lines = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MetadataError(f"{label}: line {number} is not valid JSON ({exc}); write one JSON object "
                                f"per line") from None
        except RecursionError:
            raise MetadataError(f"{label}: line {number} nests lists or objects too deeply to read; "
                                f"flatten that value") from None
        if not isinstance(record, dict):
            raise MetadataError(f"{label}: line {number} is a JSON {type(record).__name__}, not an object; "
                                f"write one object per line, e.g. {{\"path\": \"a.mp4\"}}")
        records.append(record)
        lines.append(number)
    columns = list(dict.fromkeys(key for record in records for key in record))
    values = {col: [record.get(col) for record in records] for col in columns}
    schema = {}
    for col in columns:
        kind = _value_kind(values[col])
        schema[col] = ColumnType(kind, _JSONL_DTYPES[kind])
    table = pd.DataFrame({col: _column_text(values[col], schema[col], label, col) for col in columns})
    return table, schema, ("line", lines)


def _read_any(label: str) -> tuple[pd.DataFrame, Schema, Positions | None]:
    """A table as text cells, its column types (none for a CSV) and where its rows are (None: CSV lines)."""
    fmt = table_format(label)
    if fmt == PARQUET_SUFFIX:
        return _read_parquet(label)
    if fmt == JSONL_SUFFIX:
        return _read_jsonl(label)
    if os.path.getsize(label) == 0:
        raise MetadataError(
            f"{label}: the file is empty (0 bytes); write a header line with at least '{PATH_COLUMN}'"
        )
    return _parse_csv(label, label), {}, None


def _check_file(label: str) -> None:
    if not os.path.exists(label):
        raise MetadataError(f"{label}: file not found; check the path (relative paths are from {os.getcwd()})")
    if os.path.isdir(label):
        raise MetadataError(f"{label}: is a directory; give the file inside it")


def read_schema(path: StrPath) -> Schema:
    """The column types of a Parquet or JSONL table (empty for a CSV, whose columns are text)."""
    label = os.fspath(path)
    if table_format(label) == ".csv":
        return {}
    _check_file(label)
    return _read_any(label)[1]


def _validate(df: pd.DataFrame, label: str, required: Sequence[str], where: Positions | None = None
              ) -> pd.DataFrame:
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
            unit, numbers = where or ("line", range(2, len(df) + 2))  # a CSV row i is on line i + 2
            lines = ", ".join(str(numbers[i]) for i in empty[:5])
            raise MetadataError(
                f"{label}: {len(empty)} row(s) with an empty '{PATH_COLUMN}' ({unit} {lines}); "
                f"fill in or delete those rows"
            )
    return df


def _warn_duplicates(df: pd.DataFrame, label: str) -> None:
    if PATH_COLUMN not in df.columns:
        return
    columns = _key_columns(df)
    dup = df.duplicated(subset=columns)
    if dup.any():
        logger.warning(
            "%s: %d duplicate row(s) with the same %s, e.g. %r; later steps keep one row per key",
            label, int(dup.sum()), "/".join(f"'{col}'" for col in columns), df.loc[dup, PATH_COLUMN].iloc[0],
        )


def read_metadata(
    csv_path: StrPath, required: Sequence[str] = (PATH_COLUMN,), *, warn_duplicates: bool = True
) -> pd.DataFrame:
    """Read a metadata table (CSV, Parquet or JSONL by suffix) with every cell as text; check it is usable.

    A header-only CSV, a row-less Parquet file and an empty JSONL file give an empty table
    (valid for merging; nothing to caption). A missing, 0-byte (CSV) or unparseable file, a
    missing required column or an empty ``path`` value raise MetadataError. Duplicate row
    keys only log a warning. Typed cells become text as ``read_schema`` describes.
    """
    label = os.fspath(csv_path)
    _check_file(label)
    df, _, where = _read_any(label)
    if not len(df) and table_format(label) == JSONL_SUFFIX:
        df = pd.DataFrame({col: pd.Series(dtype=object) for col in dict.fromkeys([*df.columns, *required])})
    df = _validate(df, label, required, where)
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
    def write(fh: BinaryIO) -> None:
        text = io.TextIOWrapper(fh, encoding="utf-8", newline="", write_through=True)
        df.to_csv(text, index=False, lineterminator="\r\n")  # as csv.writer: quotes a lone \r too
        text.detach()

    write_atomic(out_path, write)


def write_table_atomic(df: pd.DataFrame, out_path: StrPath, schema: Schema | None = None) -> None:
    """Write a table of text cells atomically in the format its suffix names (CSV, Parquet or JSONL).

    Parquet and JSONL columns in ``schema`` get their type back (a column whose cells no
    longer fit it stays text, with a warning); other columns, and every CSV cell, are text.
    """
    fmt, schema, label = table_format(out_path), schema or {}, os.fspath(out_path)
    if fmt == ".csv":
        write_csv_atomic(df, out_path)
    elif fmt == PARQUET_SUFFIX:
        typed = pd.DataFrame(_restore(df, schema, label, _typed_series), columns=list(df.columns))
        table = _input_types(pa.Table.from_pandas(typed, preserve_index=False), schema, label)
        write_atomic(out_path, lambda fh: pq.write_table(table, fh))
    else:
        def values(texts: list[str], column: ColumnType) -> list[object]:
            return [_text_value(t, column.kind) for t in texts]

        columns = _restore(df, schema, label, values)
        lines = (json.dumps(dict(zip(columns, record)), ensure_ascii=False, allow_nan=False) + "\n"
                 for record in zip(*columns.values()))
        write_atomic(out_path, lambda fh: fh.writelines(line.encode("utf-8") for line in lines))


def _input_types(table: pa.Table, schema: Schema, label: str) -> pa.Table:
    """Columns cast back to their Parquet input's exact type (decimal precision, int8, time32, large_string,
    dictionary, null ...); a column whose cells no longer fit keeps the type its values give (warned)."""
    for i, name in enumerate(table.column_names):
        column = schema.get(name)
        target = column.arrow if column is not None else None
        if target is None or table.schema.field(i).type == target:
            continue
        values = table.column(i)
        if pa.types.is_null(target) and all(v in (None, "") for v in values.to_pylist()):
            table = table.set_column(i, pa.field(name, target), pa.nulls(len(table)))
            continue
        try:
            table = table.set_column(i, pa.field(name, target), values.cast(target))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            if not pa.types.is_string(values.type):  # text: _restore has said the column does not fit
                logger.warning("%s: column %r does not fit its input type %s (%s); written as %s",
                               label, name, target, exc, values.type)
    return table


def write_atomic(out_path: StrPath, write: Callable[[BinaryIO], object]) -> None:
    """Have ``write`` fill a temporary file beside ``out_path``, force it to disk, rename it into place."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    # os.open with 0o666 lets the umask decide permissions, as for a plain open().
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, "wb") as fh:
            write(fh)
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
    """Part file of one rank, named after the whole output file name: ``out.parquet`` ->
    ``out.parquet.part{rank}.csv`` in the same folder, so ``out.csv``, ``out.parquet`` and
    ``out.jsonl`` never share one."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be a non-negative int, got {rank!r}")
    out = Path(output)
    return out.with_name(f"{out.name}.part{rank}.csv")


def takes_stem_named_files(output: StrPath) -> bool:
    """Whether the output owns the files earlier versions named after its stem: ``out_part0.csv``,
    ``out_part0.inflight``, ``out.attempts.json``.

    ``out.csv``, ``out.parquet`` and ``out.jsonl`` in one folder all wrote those names. A CSV
    output, the usual one, takes them as its own, so a run interrupted under that naming resumes;
    its next start merges them in and removes them. A Parquet or JSONL output cannot tell whose
    they are and leaves them (the runner warns). New part and in-flight names end in
    ``.part<N>.csv``/``.part<N>.inflight`` where the old ones end in ``_part<N>...``, so no output
    takes another run's current part files for old ones.
    """
    return table_format(output) == ".csv"


def stem_named_part_files(output: StrPath) -> list[Path]:
    """Part files an earlier version named after the output's stem (``<stem>_part<digits>.csv``),
    whatever the output's format, sorted by rank number."""
    out = Path(output)
    return _numbered_files(out.parent, rf"{re.escape(out.stem)}_part(\d+)\.csv")


def find_part_files(output: StrPath) -> list[Path]:
    """Existing part files of an output (``<name>.part<digits>.csv``), sorted by rank number; a CSV
    output's stem-named ones (see ``takes_stem_named_files``) come first, so where both hold a row key the
    current naming's row wins."""
    out = Path(output)
    old = stem_named_part_files(out) if takes_stem_named_files(out) else []
    return old + _numbered_files(out.parent, rf"{re.escape(out.name)}\.part(\d+)\.csv")


def _numbered_files(folder: Path, pattern: str) -> list[Path]:
    """Files in folder whose whole name matches pattern, sorted by the number its group captures."""
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(pattern, entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return [entry for _, entry in sorted(found)]


def merge_tables(tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate tables and keep one row per row key: the last ``ok`` row, else the last row.

    Columns are the union in first-seen order, cells a table lacks become "". Keys
    keep the order in which they first appear. Without a ``status`` column no row
    counts as ok, so simply the last row per key is kept.
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
    # One pass, no helper columns (so no user column can collide): a dict keeps each key
    # at its first-seen position while the row it points to moves to the last ok (else last) row.
    kept: dict[RowKey, int] = {}
    for row, key in enumerate(row_keys(data)):
        if ok[row] or key not in kept or not ok[kept[key]]:
            kept[key] = row
    return data.iloc[list(kept.values())][columns].reset_index(drop=True)


def merge_csvs(inputs: Sequence[StrPath], output: StrPath, remove_inputs: bool = False,
               schema: Schema | None = None) -> pd.DataFrame:
    """Read tables (any format), merge them with merge_tables, write the result atomically and return it.

    The output's suffix picks its format; ``schema`` types its Parquet/JSONL columns.

    With remove_inputs, the inputs (never the output itself) are deleted only after
    the output was written.
    """
    tables = [read_metadata(path, warn_duplicates=False) for path in inputs]
    merged = merge_tables(tables)
    write_table_atomic(merged, output, schema)
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
    """``read_metadata`` for ordinary tables; a part file (``*.part<N>.csv``, or ``*_part<N>.csv`` as
    earlier versions named them), which a crash may have cut short, loses only its torn last record."""
    path = Path(path)
    if re.search(r"[._]part\d+\.csv$", path.name):
        table = _read_part(path)
        return table if table is not None else pd.DataFrame({PATH_COLUMN: pd.Series(dtype=object)})
    return read_metadata(path, warn_duplicates=False)


def drop_superseded_errors(table: pd.DataFrame) -> pd.DataFrame:
    """Drop whole-row error rows of input rows that now have window rows.

    A video whose probe failed has one error row; once a retry windows it, that row
    would contradict its windows.
    """
    if WINDOW_COLUMN not in table.columns or STATUS_COLUMN not in table.columns:
        return table
    windowed = (table[WINDOW_COLUMN] != "").to_numpy()
    if not windowed.any():
        return table
    parents = {key for key, is_window in zip(source_keys(table), windowed) if is_window}
    stale = np.array([not is_window and status == STATUS_ERROR and key in parents
                      for key, is_window, status in zip(row_keys(table), windowed, table[STATUS_COLUMN])],
                     dtype=bool)
    return table[~stale].reset_index(drop=True)


def read_progress(output: StrPath) -> Progress:
    """Merge the final output (if present) and all its part files, and say which row keys are settled.

    ``done``: keys with an ``ok`` row. ``failed``: keys whose kept row has status
    ``error`` (a re-run may retry them). Keys absent from both still need captioning.
    """
    tables = []
    out = Path(output)
    if out.exists():
        tables.append(read_metadata(out, warn_duplicates=False))
    for part in find_part_files(out):
        table = _read_part(part)
        if table is not None:
            tables.append(table)
    merged = drop_superseded_errors(merge_tables(tables))
    status = _column(merged, STATUS_COLUMN)
    keys = row_keys(merged)
    return Progress(
        table=merged,
        done=frozenset(key for key, st in zip(keys, status) if st == STATUS_OK),
        failed=frozenset(key for key, st in zip(keys, status) if st == STATUS_ERROR),
    )


def _sorted_like(merged: pd.DataFrame, order: pd.DataFrame | Iterable[RowKey]) -> pd.DataFrame:
    """Rows in the order of ``order``'s keys (a row not in it by its source key), then by window."""
    order_keys = row_keys(order) if isinstance(order, pd.DataFrame) else list(order)
    rank = {key: i for i, key in enumerate(dict.fromkeys(order_keys))}
    missing = len(rank)
    ranks = [rank.get(key, rank.get(source, missing))
             for key, source in zip(row_keys(merged), source_keys(merged))]
    windows = [int(w) if str(w).isdigit() else -1 for w in _column(merged, WINDOW_COLUMN)]
    return merged.iloc[np.lexsort((windows, ranks))].reset_index(drop=True)


def finalize_output(output: StrPath, order: pd.DataFrame | Iterable[RowKey] | None = None,
                    remove_parts: bool = True, schema: Schema | None = None) -> pd.DataFrame:
    """Merge the final output and its part files into the final output atomically.

    ``order`` (the input table, or its row keys, e.g. paths) sorts rows like the input,
    the windows of one input row by window number; rows not in it follow in first-seen
    order. Part files are deleted only after the write. Call it when no rank writes
    anymore (after a barrier). Running it again is harmless. The output's suffix picks its
    format (part files are always CSV); ``schema`` types its Parquet/JSONL columns.
    """
    parts = find_part_files(output)
    merged = read_progress(output).table
    if order is not None:
        merged = _sorted_like(merged, order)
    write_table_atomic(merged, output, schema)
    if remove_parts:
        _remove_files(parts, keep=output)
    return merged


def _recorded_keys(other: pd.DataFrame | Iterable[RowKey]) -> set[RowKey]:
    """Keys a table has rows for, its windows' input rows included; or the given keys (bare paths too)."""
    if isinstance(other, pd.DataFrame):
        if PATH_COLUMN not in other.columns:
            raise MetadataError(f"table has no '{PATH_COLUMN}' column; columns found: {list(other.columns)}")
        return set(row_keys(other)) | set(source_keys(other))
    return set(other)


def difference(data: pd.DataFrame, done: pd.DataFrame | Iterable[RowKey]) -> pd.DataFrame:
    """Rows of data whose key is not in done (a table, or keys such as paths), in data's order.

    A windowed ``done`` table covers every input row it has at least one window of.
    """
    recorded = _recorded_keys(done)
    return data[np.array([key not in recorded for key in row_keys(data)], dtype=bool)].reset_index(drop=True)


def intersection(data: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """Rows of data whose key is also in other, with other's extra columns joined on.

    As in Open-Sora: data's rows, order and values win for shared columns; columns
    only other has are added (from other's last row for a key, so no row is doubled;
    a window row also stands for its input row).
    """
    if PATH_COLUMN not in other.columns:
        raise MetadataError(f"table has no '{PATH_COLUMN}' column; columns found: {list(other.columns)}")
    extra = [col for col in other.columns if col not in data.columns]
    last: dict[RowKey, int] = {}
    for row, (key, source) in enumerate(zip(row_keys(other), source_keys(other))):
        last[key] = last[source] = row
    picks = [last.get(key) for key in row_keys(data)]
    left = data[np.array([pick is not None for pick in picks], dtype=bool)].reset_index(drop=True)
    right = other.iloc[[pick for pick in picks if pick is not None]][extra].reset_index(drop=True)
    return pd.concat([left, right], axis=1)


def remove_empty_caption(df: pd.DataFrame, column: str = CAPTION_COLUMN) -> pd.DataFrame:
    """Drop rows whose caption is empty, whitespace or NaN (they are useless for training)."""
    if column not in df.columns:
        raise MetadataError(f"no caption column '{column}'; columns found: {list(df.columns)}")
    text = df[column].fillna("").astype(str).str.strip()
    return df[text != ""].reset_index(drop=True)
