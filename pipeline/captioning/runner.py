"""The one captioning engine every entry script uses.

Flow per rank: read the CSV, find the rows still to do (row-level resume), take a
deterministic shard of them, decode frames ahead of the model in worker processes,
caption ``bs`` videos at a time, append each finished batch to
``<output name>.part{rank}.csv`` and flush it to disk. Ranks meet through marker
files (see ``pipeline.distributed.FileBarrier``); rank 0 merges the parts into the
final output once every rank has finished. A kill loses at most the batch in
flight; a video that cannot be read, or a batch the model fails on, becomes rows
with ``status=error`` and the run goes on. One run at a time writes an output: rank 0
holds ``<output>.lock`` (``pipeline.captioning.lock``) from before it touches any file
until after the merge. Rows a dead process left in the model are counted and, after
``max_attempts`` deaths, recorded as errors (``pipeline.captioning.attempts``).
``--overwrite`` sets the old output aside as ``<stem>.prev.csv`` and folds it back in
at the merge, so a crashed overwrite run resumes like any other.

Segments and windows. A row may name part of its file (``start``/``end`` or
``timestamp``, see ``metadata.row_segment``); only that part is sampled. With
``window_seconds`` every input row becomes window rows (``pipeline.captioning.windows``),
keyed like any row, so resume works per window. Only input rows with work left are
probed for their duration, in the decoder processes of the rank that owns them; sharding
deals out those input rows, the same on every rank. Captioner answers become rows, and
out-of-memory videos are retried smaller, in ``pipeline.captioning.results``.
"""
from __future__ import annotations

import csv
import functools
import logging
import os
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence, Union

import numpy as np
import pandas as pd
from tqdm import tqdm

from models import jit
from pipeline import distributed
from pipeline.datasets.metadata import (
    END_COLUMN,
    ERROR_COLUMN,
    KEY_COLUMNS,
    NUM_WINDOWS_COLUMN,
    RESULT_COLUMNS,
    SEGMENT_END_COLUMN,
    SEGMENT_START_COLUMN,
    START_COLUMN,
    STATUS_COLUMN,
    STATUS_OK,
    WINDOW_COLUMN,
    Progress,
    RowKey,
    Schema,
    finalize_output,
    find_part_files,
    merge_csvs,
    part_path,
    read_metadata,
    read_progress,
    read_schema,
    read_table,
    resolve_video_path,
    row_key,
    row_keys,
    row_segment,
    stem_named_part_files,
    table_format,
    takes_stem_named_files,
    write_csv_atomic,
)
from pipeline.captioning import attempts
from pipeline.captioning.attempts import DEFAULT_MAX_ATTEMPTS
from pipeline.captioning.lock import acquire as acquire_lock
from pipeline.captioning.results import REPETITION_COLUMN, Result, caption_batch, failure
from pipeline.captioning.schemas import CaptionSchema, CutCaptionError
from pipeline.captioning.sidecars import write_sidecars
from pipeline.datasets.caption_text import Cleanup
from pipeline.captioning.windows import (WINDOW_COLUMNS, Windowing, has_segment_columns, recorded_windows, whole_row,
                                         window_rows, windows_complete)
from pipeline.datasets.decode_pool import DecodePool, default_timeout
from pipeline.datasets.video import (DEFAULT_MAX_DECODE_PIXELS, check_sampling_args, probe_duration, sample_frames,
                                     split_windows)

logger = logging.getLogger(__name__)

Span = tuple[float, float | None]  # seconds; end None: the file's end
PROMPT_COLUMN = "prompt"
RAW_TEXT_COLUMN = "text_raw"
CLEANUP_COLUMNS = (RAW_TEXT_COLUMN, REPETITION_COLUMN)


@dataclass(frozen=True)
class FrameSpec:
    """How a captioner wants its frames sampled from each video.

    ``min_frames``: with ``fps``, the fewest frames a video gets (a short clip's spread over it). ``times``:
    ``prepare`` also gets the frames' start times, ``frame_times=`` (seconds from the first frame of the row's
    segment or window, see ``sample_frames``), for a model whose prompt or positions carry time.
    """

    num_frames: int = 8
    sampling: str = "uniform"
    fps: float | None = None
    height: int | None = None
    width: int | None = None
    min_frames: int | None = None
    times: bool = False


class Captioner(Protocol):
    """What a model family provides; the runner does everything else.

    Optional: ``extra_columns`` (tuple of output column names, default none), filled
    from ``generate`` results given as dicts; ``shrink(inputs) -> inputs | None``,
    the same video re-prepared at half its visual-token budget (None: cannot shrink
    further), which the runner uses to retry a video that ran out of memory. (An error row's ``text`` is
    empty, or what ``RunOptions.error_text`` says: caption enhancement keeps the input caption.)

    ``frame_spec = None``: the captioner reads no video (e.g. it rewrites a caption); ``prepare``
    is then given the row's cells instead of frames, and the row's file is never opened.
    """

    frame_spec: FrameSpec | None

    def prepare(self, frames: np.ndarray) -> Any:
        """Turn (T,H,W,3) uint8 RGB frames (or, without a frame_spec, the row's cells) into this model's
        per-video inputs (runs in a worker thread); with ``frame_spec.times`` also given ``frame_times``."""

    def generate(self, batch: Sequence[Any]) -> list[str | dict | BaseException]:
        """Caption a batch of prepared inputs: per video a caption, a dict of "text" and extra columns, or
        the exception that video alone failed with (raising fails the batch: it is retried video by video)."""


@dataclass
class RunOptions:
    input: str
    output: str | None = None
    video_root: str | None = None
    bs: int = 4
    num_workers: int = 2
    overwrite: bool = False
    retry_errors: bool = False
    seed: int = 0
    window_seconds: float | None = None
    window_min_seconds: float | None = None  # default: window_seconds / 2
    force: bool = False  # take over the output's lock from a run whose heartbeat stopped
    prompt: str | None = None  # recorded in a "prompt" column: the preset's name or the prompt's text
    cleanup: Cleanup | None = None  # applied to every caption; the model's own text goes to "text_raw"
    caption_schema: CaptionSchema | None = None  # structured captions: JSON text, its fields in columns (see schemas)
    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # deaths of the process on one row before it becomes an error row
    decode_timeout: float | None = None  # s per video in a decoder process; None: default_timeout; 0: threads
    max_decode_pixels: int | None = DEFAULT_MAX_DECODE_PIXELS  # larger frames are scaled down while decoding
    sidecar: bool = False  # after the merge, write each ok row's caption to <video stem>.txt (see sidecars)
    sidecar_dir: str | None = None  # put the sidecars in this folder instead of next to the videos
    tp_size: int = 1  # ranks per tensor-parallel group: rows go to groups, the group's first rank writes them
    # an error row's text from the row's cells (default empty): also for rows a dead process left, which are
    # written at start-up, before any captioner exists
    error_text: Callable[[dict[str, str]], str] | None = None

    def __post_init__(self) -> None:
        if self.decode_timeout is not None and not self.decode_timeout >= 0:
            raise RunError(f"--decode_timeout must be 0 (no limit, decode in threads) or more seconds "
                           f"(got {self.decode_timeout})")
        if self.max_decode_pixels is not None and self.max_decode_pixels < 1:
            raise RunError(f"--max_decode_pixels must be at least 1 (got {self.max_decode_pixels})")
        if self.tp_size < 1:
            raise RunError(f"--tp_size must be at least 1 (got {self.tp_size})")

    def output_schema(self) -> Schema:
        """The column types a Parquet/JSONL output keeps: the input's, where the input is Parquet/JSONL.

        The run's own columns (results, prompt, clean-up, windows) are text; with windows an
        input's start/end types go to segment_start/segment_end, where its cells move.
        """
        schema = read_schema(self.input)
        for column in (*RESULT_COLUMNS, *self.run_columns()):
            schema.pop(column, None)
        if self.windowing() is not None:
            moved = {SEGMENT_START_COLUMN: schema.pop(START_COLUMN, None),
                     SEGMENT_END_COLUMN: schema.pop(END_COLUMN, None)}
            schema.update({column: kind for column, kind in moved.items() if kind is not None})
        return schema

    def run_columns(self) -> tuple[str, ...]:
        """Output columns the run itself fills, after text/status/error."""
        return ((PROMPT_COLUMN,) * (self.prompt is not None) + CLEANUP_COLUMNS * (self.cleanup is not None)
                + (self.caption_schema.columns() if self.caption_schema is not None else ()))

    def windowing(self) -> Windowing | None:
        if self.window_seconds is None:
            return None
        low = self.window_seconds / 2 if self.window_min_seconds is None else self.window_min_seconds
        return Windowing(self.window_seconds, low)


@dataclass
class RunSummary:
    output: Path
    total_rows: int = 0
    skipped: int = 0
    done: int = 0
    failed: int = 0
    seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_wait_seconds: float = 0.0
    model_seconds: float = 0.0
    compiled_graphs: int = 0
    compile_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    # The whole run's outcome, known on rank 0 after the merge: rows this run wrote, and
    # the error rows the output holds.
    run_done: int = 0
    run_failed: int = 0
    run_error: str = ""
    errors_remaining: int = 0

    @property
    def videos_per_second(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0


def default_output(input_csv: str | Path) -> Path:
    """``<input stem>_caption`` next to the input, in the input's format (CSV for any other suffix)."""
    path = Path(input_csv)
    return path.with_name(f"{path.stem}_caption{table_format(path)}")


def rows_to_do(data: pd.DataFrame, progress: Progress, retry_errors: bool,
               windowing: Windowing | None = None) -> pd.DataFrame:
    """Rows of ``data`` without a recorded result (error rows count as recorded unless retried).

    With windowing, an input row is done when all its windows are recorded (see the
    module docstring) or when the row itself failed before it could be split.
    """
    finished = progress.done if retry_errors else progress.done | progress.failed
    keys = row_keys(data)
    if windowing is None:
        todo = [key not in finished for key in keys]
    else:
        failed = frozenset() if retry_errors else progress.failed
        recorded = recorded_windows(progress.table)
        segment_columns = has_segment_columns(data.columns)
        todo = [key not in failed and not windows_complete(record, recorded.get(key), finished, windowing,
                                                           segment_columns)
                for key, record in zip(keys, data.to_dict("records"))]
    return data[np.array(todo, dtype=bool)]


def shard(rows: pd.DataFrame, rank: int, world_size: int) -> pd.DataFrame:
    """Round-robin shard: disjoint, covers every row, no padding duplicates."""
    return rows.iloc[rank::world_size]


@dataclass(frozen=True)
class Groups:
    """Ranks in tensor-parallel groups of ``tp_size`` consecutive ranks: each group is one data-parallel replica,
    captions one shard, and only its first rank writes (the others run the same batches in lockstep)."""

    group: int
    count: int
    writes: bool

    @classmethod
    def of(cls, info: distributed.DistInfo, tp_size: int) -> "Groups":
        if info.world_size % tp_size:
            raise RunError(f"--tp_size {tp_size} must divide the number of msrun workers ({info.world_size}): "
                           f"the workers form tp_size x data-parallel groups")
        return cls(info.rank // tp_size, info.world_size // tp_size, info.rank % tp_size == 0)


class _Discard:
    """Stands in for the part and in-flight files on a rank whose group's first rank writes them."""

    def write(self, rows: list[dict]) -> None:
        pass

    def set(self, rows: list[dict]) -> None:
        pass

    def clear(self) -> None:
        pass

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- output

class PartWriter:
    """Appends finished rows to this rank's part file and forces them to disk."""

    def __init__(self, path: Path, columns: list[str]):
        self.path = path
        self.columns = columns
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=columns, extrasaction="ignore")
        self._writer.writeheader()
        self._sync()

    def write(self, rows: list[dict]) -> None:
        self._writer.writerows(rows)
        self._sync()

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


# ----------------------------------------------------------------------------- decoding

@dataclass
class _Item:
    """One output row to produce: its cells (results aside), the file and span to sample, or why it cannot be."""

    cells: dict[str, str]
    path: str
    span: Span | None = None
    error: BaseException | None = None


class _Planner:
    """Turns an input row into the output rows still to do: the row itself, or its unrecorded windows."""

    def __init__(self, windowing: Windowing | None, finished: frozenset[RowKey], csv_dir: Path,
                 video_root: str | None, segment_columns: bool):
        self.windowing = windowing
        self.finished = finished
        self.csv_dir = csv_dir
        self.video_root = video_root
        self.segment_columns = segment_columns

    def plan(self, record: dict[str, str], probe: Callable[[str], float]) -> list[_Item]:
        """Runs in a worker thread: a windowed row may need its video's duration, which ``probe`` reads."""
        path = resolve_video_path(record["path"], self.csv_dir, self.video_root)
        cells = record if self.windowing is None else whole_row(record, self.segment_columns)
        try:
            segment = row_segment(record)
            if self.windowing is None:
                return [_Item(cells, path, segment)]
            return self._windows(record, path, segment, probe)
        except Exception as exc:  # noqa: BLE001 - a bad segment or unreadable video is this row's error
            return [_Item(cells, path, error=exc)]

    def _windows(self, record: dict[str, str], path: str, segment: Span | None,
                 probe: Callable[[str], float]) -> list[_Item]:
        begin, end = segment or (0.0, None)
        if end is None:
            end = probe(path)  # 0 for a still image, which is one window
            if begin >= end and (begin, end) != (0.0, 0.0):
                raise ValueError(f"segment start {begin:g} s is at or after the end of the video ({end:g} s); "
                                 f"fix the row's start")
        spans = split_windows(begin, end, self.windowing.seconds, self.windowing.min_seconds)
        rows = window_rows(record, spans, self.segment_columns)
        # A zero-length span is a still image: sample the file itself.
        return [_Item(row, path, (b, e) if e > b else None)
                for row, (b, e) in zip(rows, spans) if row_key(row) not in self.finished]


class _Loader:
    """Plans input rows and decodes their items, a bounded number ahead of the model.

    Threads run the plans and ``captioner.prepare``. The decoding, and the duration
    probes of windowed rows, run in ``decoder`` (a ``DecodePool``, closed when iteration
    ends) with ``decode_timeout`` seconds per video (None: ``default_timeout`` of the
    frame count); without a decoder they run in the threads themselves, with no limit. Frames larger than
    ``max_pixels`` are scaled down while they are decoded.
    """

    def __init__(self, captioner: Captioner, planner: _Planner, records: list[dict[str, str]],
                 num_workers: int, lookahead: int, decode_timeout: float | None, max_pixels: int | None,
                 decoder: DecodePool | None):
        self.captioner = captioner
        self.planner = planner
        self.records = records
        self.num_workers = max(1, num_workers)
        self.pool = ThreadPoolExecutor(max_workers=self.num_workers, thread_name_prefix="decode")
        self.lookahead = max(1, lookahead)
        self.decode_timeout = (default_timeout(captioner.frame_spec.num_frames)
                               if decode_timeout is None and captioner.frame_spec is not None
                               else decode_timeout)
        self.max_pixels = max_pixels
        self.decoder = decoder
        self.decode_seconds = 0.0

    def _items(self, probe: Callable[[str], float]) -> Iterator[_Item]:
        """Every item in input order; plans (probes) run in the pool a few rows ahead."""
        plans: deque[Future] = deque()
        records = iter(self.records)
        while True:
            while len(plans) < self.lookahead:
                record = next(records, None)
                if record is None:
                    break
                plans.append(self.pool.submit(self.planner.plan, record, probe))
            if not plans:
                return
            yield from plans.popleft().result()

    def _load(self, item: _Item, sample: Callable[..., tuple[np.ndarray, np.ndarray]]
              ) -> tuple[_Item, Any, BaseException | None, float]:
        spec = self.captioner.frame_spec
        if item.error is not None and spec is not None:  # a text-only captioner needs neither file nor segment
            return item, None, item.error, 0.0
        start = time.perf_counter()
        try:
            if spec is None:
                return item, self.captioner.prepare(item.cells), None, time.perf_counter() - start
            begin, end = item.span if item.span is not None else (None, None)
            frames, times = sample(item.path, num_frames=spec.num_frames, sampling=spec.sampling, fps=spec.fps,
                                   height=spec.height, width=spec.width, start=begin, end=end,
                                   max_pixels=self.max_pixels, min_frames=spec.min_frames, return_times=spec.times)
            inputs = self.captioner.prepare(frames, frame_times=times) if spec.times else self.captioner.prepare(frames)
            return item, inputs, None, time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - any failure becomes an error row
            return item, None, exc, time.perf_counter() - start

    def __iter__(self) -> Iterator[tuple[_Item, Any, BaseException | None]]:
        decoder = self.decoder
        if decoder is None:
            sample, probe = sample_frames, probe_duration
        else:
            sample = functools.partial(decoder.sample_frames, timeout=self.decode_timeout)
            probe = functools.partial(decoder.probe_duration, timeout=self.decode_timeout)
        pending: deque[Future] = deque()
        items = self._items(probe)
        try:
            for item in items:
                pending.append(self.pool.submit(self._load, item, sample))
                if len(pending) >= self.lookahead:
                    break
            while pending:
                item, inputs, exc, seconds = pending.popleft().result()
                self.decode_seconds += seconds
                next_item = next(items, None)
                if next_item is not None:
                    pending.append(self.pool.submit(self._load, next_item, sample))
                yield item, inputs, exc
        finally:
            for fut in pending:
                fut.cancel()
            if decoder is not None:
                decoder.close()  # first: threads waiting on a decode get their answer (an error) at once
            items.close()
            self.pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- the run

def previous_output(output: Path) -> Path:
    """Where an --overwrite run keeps the old output until its own merge (so a crash loses nothing)."""
    return output.with_name(f"{output.stem}.prev{table_format(output)}")


class RunError(ValueError):
    """A setting that cannot work; raised before any row is touched."""


def extra_columns_of(captioner: Captioner) -> tuple[str, ...]:
    """The captioner's declared extra output columns (none unless it has ``extra_columns``)."""
    columns = tuple(getattr(captioner, "extra_columns", ()) or ())
    if not all(isinstance(c, str) and c for c in columns) or len(set(columns)) != len(columns):
        raise RunError(f"the captioner's extra_columns must be distinct non-empty names, got {columns!r}")
    return columns


def check_run_options(opts: RunOptions) -> None:
    """Reject settings that would turn every row into an error row (and be skipped on re-runs)."""
    if opts.bs < 1:
        raise RunError(f"--bs must be at least 1 (got {opts.bs})")
    if opts.num_workers < 1:
        raise RunError(f"--num_workers must be at least 1 (got {opts.num_workers})")
    if opts.max_attempts < 1:
        raise RunError(f"--max_attempts must be at least 1 (got {opts.max_attempts})")
    _check_windowing(opts)


def _check_frame_spec(captioner: Captioner) -> None:
    spec = captioner.frame_spec
    if spec is None:
        return
    try:
        check_sampling_args(spec.num_frames, spec.sampling, spec.fps, min_frames=spec.min_frames)
    except ValueError as exc:
        raise RunError(f"frame sampling: {exc}") from exc


def _check_windowing(opts: RunOptions) -> None:
    if opts.window_seconds is None:
        if opts.window_min_seconds is not None:
            raise RunError("--window_min_seconds needs --window_seconds; give both or neither")
        return
    if not opts.window_seconds > 0:
        raise RunError(f"--window_seconds must be positive (got {opts.window_seconds})")
    low = opts.windowing().min_seconds
    if not 0 <= low <= opts.window_seconds:
        raise RunError(f"--window_min_seconds must be between 0 and --window_seconds "
                       f"({opts.window_seconds:g}), got {low:g}")


def _output_columns(data: pd.DataFrame, opts: RunOptions, extra: Sequence[str]) -> list[str]:
    """The part files' header: input columns, window columns, results, the run's own columns (prompt,
    clean-up), then the captioner's extra columns (the clean-up's repetition column is the captioner's when it
    declares one: see ``_Session._finish``)."""
    columns = list(data.columns)
    if opts.windowing() is not None:
        added = [SEGMENT_START_COLUMN, SEGMENT_END_COLUMN] if has_segment_columns(columns) else []
        columns += [c for c in (*added, *WINDOW_COLUMNS) if c not in columns]
    results = [*RESULT_COLUMNS, *(c for c in opts.run_columns() if not (c == REPETITION_COLUMN and c in extra))]
    clashing = [c for c in extra if c in columns or c in results]
    if clashing:
        raise RunError(f"the captioner's extra column(s) {clashing} clash with input or output columns; "
                       f"rename those input columns")
    return [*columns, *results, *extra]


def _read_input(opts: RunOptions) -> pd.DataFrame:
    path, windowing = opts.input, opts.windowing()
    data = read_metadata(path)
    clashing = [c for c in (*RESULT_COLUMNS, *opts.run_columns()) if c in data.columns]
    if clashing:
        logger.warning("%s: input column(s) %s are replaced by the captioner's output columns", path, clashing)
    reserved = [c for c in (WINDOW_COLUMN, NUM_WINDOWS_COLUMN, SEGMENT_START_COLUMN, SEGMENT_END_COLUMN)
                if c in data.columns]
    if windowing is not None and reserved:
        raise RunError(f"{path}: column(s) {reserved} are written by --window_seconds (is this a windowed "
                       f"output?); drop or rename them, or run without --window_seconds")
    key_columns = [c for c in KEY_COLUMNS if c in data.columns]
    return data.drop(columns=clashing).drop_duplicates(key_columns)


def _remove_leftovers(output: Path, meet: distributed.FileBarrier) -> None:
    """Temporary files and sync folders that crashed runs on this output left (we hold its lock).

    The temporary files of the output, its parts and its attempts file all start with ``.<output name>.``;
    a CSV output also removes those of the files earlier versions named after its stem."""
    patterns = [f".{output.name}.*.tmp"]
    if takes_stem_named_files(output):
        patterns += [f".{output.stem}_part*.csv.*.tmp", f".{output.stem}.attempts.json.tmp"]
    for pattern in patterns:
        for leftover in output.parent.glob(pattern):
            leftover.unlink(missing_ok=True)
    for folder in meet.stale_folders():
        shutil.rmtree(folder, ignore_errors=True)


def _error_row(result: Result, cells: dict[str, str], opts: RunOptions) -> dict[str, str]:
    """The output row of ``result``; an error row's text is ``opts.error_text`` of the cells, if given."""
    if result.error is not None and opts.error_text is not None:
        result.text = opts.error_text(cells)
    return result.row(cells)


def _record_deaths(output: Path, order: list[RowKey], opts: RunOptions, schema: Schema) -> None:
    """Count the rows a dead process left in flight; write those out of attempts as error rows."""
    if not attempts.pending(output):
        return  # the usual case: no output read just for this
    progress = read_progress(output)
    spent = attempts.settle(output, progress.done | progress.failed, opts.max_attempts)
    if spent:
        rows = [_error_row(failure(attempts.died_error(s.attempts)), s.cells, opts) for s in spent]
        write_csv_atomic(pd.DataFrame(rows).fillna(""), part_path(output, 0))
        finalize_output(output, order=order, schema=schema)


def _start(output: Path, order: list[RowKey], opts: RunOptions, meet: distributed.FileBarrier) -> None:
    """Rank 0's set-up under the lock, before anyone reads: fold an earlier run's parts in (or set the
    old output aside), settle rows a dead process left in flight, and remove crashed runs' leftovers."""
    _remove_leftovers(output, meet)
    unclaimed = [] if takes_stem_named_files(output) else stem_named_part_files(output)
    if unclaimed:
        logger.warning("%s: not resumed, as an earlier version gave %s.csv, .parquet and .jsonl these part file "
                       "names alike; if this output's interrupted run left them, rename each %s_part<N>.csv to "
                       "%s.part<N>.csv and run again", ", ".join(p.name for p in unclaimed), output.stem,
                       output.stem, output.name)
    schema = opts.output_schema()
    if opts.overwrite:
        for part in find_part_files(output):
            part.unlink()
        if output.is_file():
            os.replace(output, previous_output(output))
    elif find_part_files(output):
        finalize_output(output, order=order, schema=schema)
    _record_deaths(output, order, opts, schema)


def _count_run(output: Path, summary: RunSummary) -> None:
    """The outcome of this run's rows: its part files (earlier runs' parts were merged at the start)."""
    for part in find_part_files(output):
        table = read_table(part)
        if STATUS_COLUMN not in table.columns:
            continue
        ok = table[STATUS_COLUMN] == STATUS_OK
        summary.run_done += int(ok.sum())
        summary.run_failed += int((~ok).sum())
        if not summary.run_error and not ok.all():
            summary.run_error = str(table.loc[~ok, ERROR_COLUMN].iloc[0])


def _finish(output: Path, order: list[RowKey], summary: RunSummary, opts: RunOptions) -> pd.DataFrame:
    """Rank 0's merge once every rank has finished; an --overwrite run's old rows stay where new ones failed.

    The output is written in its suffix's format, a Parquet/JSONL one with ``opts.output_schema()``.
    """
    _count_run(output, summary)
    schema = opts.output_schema()
    prev = previous_output(output)
    if prev.is_file():
        if output.is_file():
            merge_csvs([prev, output], output, schema=schema)
        else:
            os.replace(prev, output)
    merged = finalize_output(output, order=order, schema=schema)
    prev.unlink(missing_ok=True)
    return merged


class _Session:
    """One rank's captioning loop: batches decoded items, captions them, writes rows, counts.

    Rows that killed an earlier process (``suspects``) are captioned alone, so another
    death blames exactly that row (see ``pipeline.captioning.attempts``).
    """

    def __init__(self, captioner: Captioner, writer: PartWriter, inflight: attempts.InflightFile,
                 suspects: frozenset[RowKey], summary: RunSummary, bar: tqdm, opts: RunOptions):
        self.captioner = captioner
        self.extra = extra_columns_of(captioner)
        self.writer = writer
        self.inflight = inflight
        self.suspects = suspects
        self.summary = summary
        self.bar = bar
        self.opts = opts
        self.bs = opts.bs
        self.batch: list[tuple[dict[str, str], Any]] = []

    def add(self, item: _Item, inputs: Any, exc: BaseException | None) -> None:
        if exc is not None:
            self._write([self._row(failure(exc), item.cells)])
            return
        if row_key(item.cells) in self.suspects:
            self.flush()
            self.batch.append((item.cells, inputs))
            self.flush()
            return
        self.batch.append((item.cells, inputs))
        if len(self.batch) == self.bs:
            self.flush()

    def flush(self) -> None:
        if not self.batch:
            return
        self.inflight.set([cells for cells, _ in self.batch])
        model_start = time.perf_counter()
        results = caption_batch(self.captioner, [inputs for _, inputs in self.batch], self.extra)
        self.summary.model_seconds += time.perf_counter() - model_start
        self._write([self._row(self._finish(result), cells) for (cells, _), result in zip(self.batch, results)])
        self.inflight.clear()
        self.batch = []

    def _finish(self, result: Result) -> Result:
        """The run's own columns: the prompt, the cleaned caption (the model's text kept in text_raw), a
        structured caption's fields; a structured caption cut before its JSON closed becomes an error row. The
        clean-up's repetition is true also when the captioner's is (its generation stopped a loop): one column."""
        if self.opts.prompt is not None:
            result.columns[PROMPT_COLUMN] = self.opts.prompt
        if self.opts.caption_schema is not None and result.error is None:
            try:
                result.columns.update(self.opts.caption_schema.cells(result.text))
            except CutCaptionError as exc:
                return Result(columns=result.columns, error=exc)
        if self.opts.cleanup is not None and result.error is None:
            text, repetition = self.opts.cleanup.clean(result.text)
            repetition = repetition or result.columns.get(REPETITION_COLUMN) == "true"
            result.columns.update({RAW_TEXT_COLUMN: result.text if text != result.text else "",
                                   REPETITION_COLUMN: str(repetition).lower()})
            result.text = text
        return result

    def _row(self, result: Result, cells: dict[str, str]) -> dict[str, str]:
        return _error_row(result, cells, self.opts)

    def _write(self, rows: list[dict[str, str]]) -> None:
        self.writer.write(rows)
        for row in rows:
            ok = row[STATUS_COLUMN] == STATUS_OK
            self.summary.done += ok
            self.summary.failed += not ok
            if not ok:
                self.summary.errors.append(row[ERROR_COLUMN])
        self.bar.update(len(rows))


CaptionerOrBuilder = Union[Captioner, Callable[[], Captioner]]


def run(captioner: CaptionerOrBuilder, opts: RunOptions) -> RunSummary:
    """Caption every row of ``opts.input`` not yet captioned in ``opts.output``.

    ``captioner`` may be a function that builds it: it is then called only on a rank with
    rows to caption, so a run with nothing left to do never loads a model.
    """
    info = distributed.setup()
    started = time.perf_counter()
    graphs_before, compile_before = jit.COMPILES.snapshot()
    check_run_options(opts)
    windowing = opts.windowing()
    output = Path(opts.output) if opts.output else default_output(opts.input)
    output.parent.mkdir(parents=True, exist_ok=True)
    data = _read_input(opts)
    order = row_keys(data)
    meet = distributed.FileBarrier(output)
    lock = None
    try:
        # Nobody reads before rank 0 holds the lock and has tidied up, and nobody writes
        # before everyone has read.
        if info.is_main:
            try:
                lock = acquire_lock(output, info.run_id, opts.force)
                _start(output, order, opts, meet)
            except BaseException as exc:
                meet.abort(f"rank 0 could not start the run: {exc}")
                raise
        meet.wait("started")
        progress = read_progress(output)  # after --overwrite: nothing recorded
        todo = rows_to_do(data, progress, opts.retry_errors, windowing)
        suspects = frozenset(attempts.load_suspects(output))
        meet.wait("read")

        summary = RunSummary(output=output, total_rows=len(data), skipped=len(data) - len(todo))
        groups = Groups.of(info, opts.tp_size)
        mine = shard(todo, groups.group, groups.count)
        if len(mine):
            finished = progress.done if opts.retry_errors else progress.done | progress.failed
            _caption(captioner, opts, info, groups, data, output, mine, finished, suspects, summary)

        # Each rank leaves once its part is on disk; rank 0 waits for all of them and merges.
        if info.is_main:
            meet.wait("finished")
            if len(todo) or previous_output(output).is_file() or not output.is_file():
                merged = _finish(output, order, summary, opts)
                attempts.forget_recorded(output, frozenset(row_keys(merged)))
                logger.info("merged %d rows into %s", len(merged), output)
            else:
                merged = progress.table
            if opts.sidecar or opts.sidecar_dir is not None:
                write_sidecars(merged, Path(opts.input).resolve().parent, opts.video_root, opts.sidecar_dir)
            meet.remove()
            summary.errors_remaining = int((merged[STATUS_COLUMN] != STATUS_OK).sum()) \
                if STATUS_COLUMN in merged.columns else 0
        else:
            meet.arrive("finished")
    finally:
        if lock is not None:
            lock.release()
    summary.seconds = time.perf_counter() - started
    graphs, compile_seconds = jit.COMPILES.snapshot()
    summary.compiled_graphs, summary.compile_seconds = graphs - graphs_before, compile_seconds - compile_before
    _log_summary(summary, info)
    return summary


def _caption(captioner: CaptionerOrBuilder, opts: RunOptions, info: distributed.DistInfo, groups: Groups,
             data: pd.DataFrame, output: Path, mine: pd.DataFrame, finished: frozenset[RowKey],
             suspects: frozenset[RowKey], summary: RunSummary) -> None:
    """This rank's share: build the captioner, decode ahead, caption in batches, append to the part file.

    The decoder processes start first, so their start-up overlaps the model's loading.
    """
    decoder = DecodePool(max(1, opts.num_workers)) if opts.decode_timeout != 0 else None
    try:
        _caption_with(captioner, decoder, opts, info, groups, data, output, mine, finished, suspects, summary)
    finally:
        if decoder is not None:
            decoder.close()


def _caption_with(captioner: CaptionerOrBuilder, decoder: DecodePool | None, opts: RunOptions,
                  info: distributed.DistInfo, groups: Groups, data: pd.DataFrame, output: Path,
                  mine: pd.DataFrame, finished: frozenset[RowKey], suspects: frozenset[RowKey],
                  summary: RunSummary) -> None:
    windowing = opts.windowing()
    if not hasattr(captioner, "generate"):
        captioner = captioner()
    _check_frame_spec(captioner)
    columns = _output_columns(data, opts, extra_columns_of(captioner))
    planner = _Planner(windowing, finished, Path(opts.input).resolve().parent, opts.video_root,
                       has_segment_columns(data.columns))
    writer = PartWriter(part_path(output, info.rank), columns) if groups.writes else _Discard()
    inflight = attempts.InflightFile(attempts.inflight_path(output, info.rank)) if groups.writes else _Discard()
    loader = _Loader(captioner, planner, mine.to_dict("records"), opts.num_workers,
                     lookahead=opts.bs + opts.num_workers, decode_timeout=opts.decode_timeout,
                     max_pixels=opts.max_decode_pixels, decoder=decoder)
    loaded = iter(loader)
    bar = tqdm(total=len(mine) if windowing is None else None, desc=f"caption rank {info.rank}",
               unit="video" if windowing is None else "window", disable=None if info.is_main else True)
    session = _Session(captioner, writer, inflight, suspects, summary, bar, opts)
    try:
        while True:
            wait_start = time.perf_counter()
            loaded_item = next(loaded, None)
            summary.decode_wait_seconds += time.perf_counter() - wait_start
            if loaded_item is None:
                break
            session.add(*loaded_item)
        session.flush()
    finally:
        loaded.close()  # cancels queued decodes at once, also on an exception or Ctrl-C
        bar.close()
        writer.close()
        inflight.close()  # reached only when the process lives: nothing in flight killed it
        summary.decode_seconds = loader.decode_seconds


def _log_summary(s: RunSummary, info: distributed.DistInfo) -> None:
    logger.info(
        "rank %d: %d rows in the CSV, %d skipped (already done), %d output rows captioned, %d failed; "
        "%.2f rows/s; decode %.1fs in workers (model waited %.1fs), model %.1fs (%d graphs compiled, their "
        "first calls %.1fs); output %s",
        info.rank, s.total_rows, s.skipped, s.done, s.failed, s.videos_per_second,
        s.decode_seconds, s.decode_wait_seconds, s.model_seconds, s.compiled_graphs, s.compile_seconds, s.output)
