"""``datautil``: merge, scene splitting, difference, intersection and caption filtering of metadata tables.

Flags follow Open-Sora's ``tools/datasets/datautil.py`` so existing habits carry over,
but duplicate row keys (see ``pipeline.datasets.metadata``) keep their last successful
row and the output is written atomically. Inputs and output are CSV, Parquet or JSONL
(by suffix), so it also converts between them: a Parquet/JSONL output keeps the types of
Parquet/JSONL inputs' columns (the first input that has a column decides its type);
columns from CSV inputs, and columns a step adds, are text.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from models.checkpoint import CheckpointError, load_tokenizer
from pipeline.datasets.caption_text import default_openings, strip_opening, word_count
from pipeline.datasets.metadata import (
    STATUS_COLUMN,
    MetadataError,
    difference,
    intersection,
    merge_tables,
    Schema,
    read_schema,
    read_table,
    remove_empty_caption,
    split_timestamps,
    table_format,
    write_table_atomic,
)

EPILOG = """\
examples:
  merge part files of a captioning run (duplicate row keys keep their last 'ok' row):
    datautil out.csv 'out.csv.part*.csv' --output out.csv
  one row per scene of Open-Sora's scene_detect output, to caption each scene:
    datautil meta_timestamp.csv --split-timestamp --output scenes.csv
  rows still to caption:
    datautil meta.csv --difference out.csv --output remaining.csv
  keep rows present in both, adding the other file's extra columns:
    datautil meta.csv --intersection scores.csv --output meta_scores.csv
  convert a captioning output to Parquet (or JSONL: --output captions.jsonl):
    datautil out.csv --output captions.parquet
  drop rows without a caption:
    datautil out.csv --remove-empty-caption --output captions.csv
  training captions: successful rows, boilerplate openings stripped, no duplicates, 5 to 120
  words, with their T5 token count:
    datautil out.csv --filter-status ok --text-remove-prefix --text-dedup --min-words 5 \\
      --max-words 120 --count-num-token /models/t5-v1_1-xxl --output train.csv

Without --output the result goes next to the first input, in its format, as
<first input stem>_<steps>.csv, e.g. meta_merged.csv, meta_difference.csv,
out_noempty.csv (steps: merged when there are several inputs or no other step,
then split, difference, intersection, status, noprefix, noempty, noduptext, words,
ntoken). Exit status is 1 on bad input.
"""


def _natural_key(path: str) -> list:
    """Sort out.csv.part2.csv before out.csv.part10.csv."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", path)]


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Expand glob patterns the shell left quoted; an existing file name is taken literally."""
    files: list[str] = []
    for pattern in patterns:
        if os.path.exists(pattern) or not glob.has_magic(pattern):
            files.append(pattern)
            continue
        matches = sorted(glob.glob(pattern), key=_natural_key)
        if not matches:
            raise MetadataError(f"{pattern}: no file matches this pattern; check the path")
        files.extend(matches)
    return files


def default_output(inputs: Sequence[str], args: argparse.Namespace) -> str:
    """Name the output after the first input and the steps applied, in the first input's folder."""
    steps = []
    if len(inputs) > 1:
        steps.append("merged")
    if args.split_timestamp:
        steps.append("split")
    if args.difference:
        steps.append("difference")
    if args.intersection:
        steps.append("intersection")
    if args.filter_status:
        steps.append(args.filter_status)
    if args.text_remove_prefix is not None:
        steps.append("noprefix")
    if args.remove_empty_caption:
        steps.append("noempty")
    if args.remove_text_duplication:
        steps.append("noduptext")
    if args.min_words is not None or args.max_words is not None:
        steps.append("words")
    if args.count_num_token:
        steps.append("ntoken")
    first = Path(inputs[0])
    return str(first.with_name(f"{first.stem}_{'_'.join(steps or ['merged'])}{table_format(first)}"))


def input_schema(paths: Sequence[str]) -> Schema:
    """The column types of the Parquet/JSONL inputs; the first input with a column decides its type."""
    schema: Schema = {}
    for path in paths:
        for column, kind in read_schema(path).items():
            schema.setdefault(column, kind)
    return schema


def _read_side_table(pattern: str) -> pd.DataFrame:
    """Read the file given to --difference/--intersection (a quoted glob merges its matches)."""
    tables = []
    for path in expand_inputs([pattern]):
        tables.append(read_table(path))
        print(f"read {len(tables[-1])} rows from {path}")
    return merge_tables(tables)


def run(args: argparse.Namespace) -> pd.DataFrame:
    """Apply the requested steps in a fixed order: merge, split, difference, intersection, caption filters."""
    inputs = expand_inputs(args.input)
    tables = []
    for path in inputs:
        tables.append(read_table(path))
        print(f"read {len(tables[-1])} rows from {path}")
    total = sum(len(table) for table in tables)
    data = merge_tables(tables)
    print(f"dropped {total - len(data)} duplicate rows ({len(data)} unique row keys)")

    if args.split_timestamp:
        before = len(data)
        try:
            data = split_timestamps(data)
        except MetadataError as exc:
            raise MetadataError(f"--split-timestamp: {exc}") from None
        print(f"split-timestamp: {before} rows became {len(data)} scene rows")

    if args.difference:
        before = len(data)
        data = difference(data, _read_side_table(args.difference))
        print(f"difference: removed {before - len(data)} rows found in {args.difference}")
    if args.intersection:
        before = len(data)
        data = intersection(data, _read_side_table(args.intersection))
        print(f"intersection: removed {before - len(data)} rows not found in {args.intersection}")
    data = _caption_steps(data, args)

    output = args.output or default_output(inputs, args)
    side = [path for pattern in (args.difference, args.intersection) if pattern for path in expand_inputs([pattern])]
    write_table_atomic(data, output, input_schema([*inputs, *side]))
    print(f"wrote {len(data)} rows to {output}")
    return data


def _text(data: pd.DataFrame, column: str, flag: str) -> pd.Series:
    if column not in data.columns:
        raise MetadataError(f"{flag}: no caption column '{column}' (set --caption-column); "
                            f"columns found: {list(data.columns)}")
    return data[column].fillna("").astype(str)


def _keep(data: pd.DataFrame, keep: pd.Series, step: str, why: str) -> pd.DataFrame:
    print(f"{step}: removed {int((~keep).sum())} rows {why}")
    return data[keep.to_numpy()].reset_index(drop=True)


def _caption_steps(data: pd.DataFrame, args: argparse.Namespace) -> pd.DataFrame:
    """The caption filters, in the order the help lists them; each prints what it did."""
    column = args.caption_column
    if args.filter_status:
        if STATUS_COLUMN not in data.columns:
            raise MetadataError(f"--filter-status: no '{STATUS_COLUMN}' column; is this a captioning output?")
        data = _keep(data, data[STATUS_COLUMN] == args.filter_status, "filter-status",
                     f"whose status is not '{args.filter_status}'")
    if args.text_remove_prefix is not None:
        openings = tuple(args.text_remove_prefix) or default_openings()
        before = _text(data, column, "--text-remove-prefix")
        data = data.assign(**{column: [strip_opening(t, openings) for t in before]})
        print(f"text-remove-prefix: stripped an opening from {int((data[column] != before).sum())} captions")
    if args.remove_empty_caption:
        try:
            data_kept = remove_empty_caption(data, column)
        except MetadataError as exc:
            raise MetadataError(f"--remove-empty-caption: {exc}") from None
        print(f"remove-empty-caption: removed {len(data) - len(data_kept)} rows with an empty '{column}'")
        data = data_kept
    if args.remove_text_duplication:
        text = _text(data, column, "--text-dedup").str.strip()
        data = _keep(data, ~(text.duplicated() & (text != "")), "text-dedup",
                     f"whose '{column}' repeats an earlier row's")
    if args.min_words is not None or args.max_words is not None:
        words = _text(data, column, "--min-words/--max-words").map(word_count)
        low, high = args.min_words or 0, args.max_words if args.max_words is not None else float("inf")
        data = _keep(data, (words >= low) & (words <= high), "words", f"outside {low} to {high} words")
    if args.count_num_token:
        tokenizer = load_tokenizer(args.count_num_token)
        text = _text(data, column, "--count-num-token")
        data = data.assign(text_len=[str(len(ids)) for ids in tokenizer(list(text))["input_ids"]] if len(text) else [])
        print(f"count-num-token: added text_len (tokens of '{column}', special tokens included)")
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="datautil",
        description="Merge, filter and convert video metadata tables: CSV, Parquet or JSONL by suffix\n"
        "(column 'path' required, every other column kept). Steps run in this order: merge inputs, --split-timestamp,\n"
        "--difference, --intersection, --filter-status, --text-remove-prefix,\n"
        "--remove-empty-caption, --text-dedup, --min-words/--max-words, --count-num-token.\n"
        "Prints row counts of every step.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "input",
        nargs="+",
        help="input CSV, Parquet or JSONL files or quoted glob patterns, e.g. meta.csv 'out.csv.part*.csv'. Several "
        "inputs are concatenated; a row key (path, plus start/end/timestamp/window where "
        "present) seen more than once keeps its last row with status 'ok', or its last row "
        "if none is ok; keys keep first-seen order",
    )
    parser.add_argument(
        "--output",
        help="file to write (atomically; folders are created); its suffix picks the format: .csv, "
        ".parquet or .jsonl, e.g. --output out.parquet. Default: <first input stem>_<steps> next to the "
        "first input, in the first input's format",
    )
    parser.add_argument(
        "--split-timestamp",
        action="store_true",
        help="one row per scene of a 'timestamp' cell that lists several, as Open-Sora's "
        "scene_detect writes \"[('00:00:00.000', '00:00:04.000'), ...]\"; each row then "
        "holds one scene, which the captioners caption without cutting the file",
    )
    parser.add_argument(
        "--difference",
        metavar="DONE_CSV",
        help="drop rows whose row key appears in DONE_CSV (any status; a windowed output "
        "covers each input row it has a window of), e.g. --difference out.csv to list what "
        "is left to caption",
    )
    parser.add_argument(
        "--intersection",
        metavar="OTHER_CSV",
        help="keep only rows whose row key appears in OTHER_CSV and add OTHER_CSV's columns that "
        "the input lacks, e.g. --intersection scores.csv",
    )
    parser.add_argument(
        "--filter-status",
        metavar="STATUS",
        help="keep only rows of a captioning output with this status, e.g. --filter-status ok",
    )
    parser.add_argument(
        "--text-remove-prefix",
        nargs="*",
        metavar="OPENING",
        help="strip a boilerplate opening such as 'The video shows' from each caption and capitalise "
        "what follows; give your own openings, or none for the list in configs/cleanup.yaml",
    )
    parser.add_argument(
        "--remove-empty-caption",
        "--text-filter-empty",
        dest="remove_empty_caption",
        action="store_true",
        help="drop rows whose caption is empty or only whitespace, e.g. before training",
    )
    parser.add_argument(
        "--remove-text-duplication",
        "--text-dedup",
        dest="remove_text_duplication",
        action="store_true",
        help="drop rows whose caption (ignoring surrounding spaces) equals an earlier row's",
    )
    parser.add_argument("--min-words", type=int, metavar="N", help="drop captions of fewer than N words")
    parser.add_argument("--max-words", type=int, metavar="N", help="drop captions of more than N words")
    parser.add_argument(
        "--count-num-token",
        metavar="TOKENIZER_FOLDER",
        help="add a text_len column: the caption's token count with the tokenizer in this local folder "
        "(e.g. a T5 checkpoint's, as text-to-video training uses)",
    )
    parser.add_argument(
        "--caption-column",
        default="text",
        help="caption column the caption filters read (default: text)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; bad input ends with a one-line error and exit status 1."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (MetadataError, CheckpointError, OSError) as exc:
        print(f"datautil: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
