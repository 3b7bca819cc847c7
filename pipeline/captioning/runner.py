"""The one captioning engine every entry script uses.

Flow per rank: read the CSV, find the rows still to do (row-level resume), take a
deterministic shard of them, decode frames ahead of the model in worker threads,
caption ``bs`` videos at a time, append each finished batch to
``<output stem>_part{rank}.csv`` and flush it to disk. Ranks meet through marker
files (see ``pipeline.distributed.FileBarrier``); rank 0 merges the parts into the
final output once every rank has finished. A kill loses at most the batch in
flight; a video that cannot be read, or a batch the model fails on, becomes rows
with ``status=error`` and the run goes on. ``--overwrite`` sets the old output aside
as ``<stem>.prev.csv`` and folds it back in at the merge, so a crashed overwrite run
resumes like any other.

Segments and windows. A row may name part of its file (``start``/``end`` or
``timestamp``, see ``metadata.row_segment``); only that part is sampled. With
``window_seconds`` every input row becomes window rows (``pipeline.captioning.windows``),
keyed like any row, so resume works per window. Only input rows with work left are
probed for their duration, in the worker threads of the rank that owns them; sharding
deals out those input rows, the same on every rank. Captioner answers become rows, and
out-of-memory videos are retried smaller, in ``pipeline.captioning.results``.
"""
from __future__ import annotations

import csv
import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from models import jit
from pipeline import distributed
from pipeline.datasets.metadata import (
    ERROR_COLUMN,
    KEY_COLUMNS,
    NUM_WINDOWS_COLUMN,
    RESULT_COLUMNS,
    SEGMENT_END_COLUMN,
    SEGMENT_START_COLUMN,
    STATUS_COLUMN,
    STATUS_OK,
    WINDOW_COLUMN,
    Progress,
    RowKey,
    finalize_output,
    find_part_files,
    merge_csvs,
    part_path,
    read_metadata,
    read_progress,
    resolve_video_path,
    row_key,
    row_keys,
    row_segment,
)
from pipeline.captioning.results import caption_batch, failure
from pipeline.captioning.windows import (WINDOW_COLUMNS, Windowing, has_segment_columns, recorded_windows, whole_row,
                                         window_rows, windows_complete)
from pipeline.datasets.video import check_sampling_args, probe_duration, sample_frames, split_windows

logger = logging.getLogger(__name__)

Span = tuple[float, float | None]  # seconds; end None: the file's end


@dataclass(frozen=True)
class FrameSpec:
    """How a captioner wants its frames sampled from each video."""

    num_frames: int = 8
    sampling: str = "uniform"
    fps: float | None = None
    height: int | None = None
    width: int | None = None


class Captioner(Protocol):
    """What a model family provides; the runner does everything else.

    Optional: ``extra_columns`` (tuple of output column names, default none), filled
    from ``generate`` results given as dicts; and ``shrink(inputs) -> inputs | None``,
    the same video re-prepared at half its visual-token budget (None: cannot shrink
    further), which the runner uses to retry a video that ran out of memory.
    """

    frame_spec: FrameSpec

    def prepare(self, frames: np.ndarray) -> Any:
        """Turn (T,H,W,3) uint8 RGB frames into this model's per-video inputs (runs in a worker thread)."""

    def generate(self, batch: Sequence[Any]) -> list[str | dict]:
        """Caption a batch of prepared inputs: per video a caption, or a dict of "text" and extra columns."""


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

    @property
    def videos_per_second(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0


def default_output(input_csv: str | Path) -> Path:
    path = Path(input_csv)
    return path.with_name(f"{path.stem}_caption.csv")


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

    def plan(self, record: dict[str, str]) -> list[_Item]:
        """Runs in a worker thread: a windowed row may need its video's duration."""
        path = resolve_video_path(record["path"], self.csv_dir, self.video_root)
        cells = record if self.windowing is None else whole_row(record, self.segment_columns)
        try:
            segment = row_segment(record)
            if self.windowing is None:
                return [_Item(cells, path, segment)]
            return self._windows(record, path, segment)
        except Exception as exc:  # noqa: BLE001 - a bad segment or unreadable video is this row's error
            return [_Item(cells, path, error=exc)]

    def _windows(self, record: dict[str, str], path: str, segment: Span | None) -> list[_Item]:
        begin, end = segment or (0.0, None)
        if end is None:
            end = probe_duration(path)  # 0 for a still image, which is one window
            if begin >= end and (begin, end) != (0.0, 0.0):
                raise ValueError(f"segment start {begin:g} s is at or after the end of the video ({end:g} s); "
                                 f"fix the row's start")
        spans = split_windows(begin, end, self.windowing.seconds, self.windowing.min_seconds)
        rows = window_rows(record, spans, self.segment_columns)
        # A zero-length span is a still image: sample the file itself.
        return [_Item(row, path, (b, e) if e > b else None)
                for row, (b, e) in zip(rows, spans) if row_key(row) not in self.finished]


class _Loader:
    """Plans input rows and decodes their items in worker threads, a bounded number ahead of the model."""

    def __init__(self, captioner: Captioner, planner: _Planner, records: list[dict[str, str]],
                 num_workers: int, lookahead: int):
        self.captioner = captioner
        self.planner = planner
        self.records = records
        self.pool = ThreadPoolExecutor(max_workers=max(1, num_workers), thread_name_prefix="decode")
        self.lookahead = max(1, lookahead)
        self.decode_seconds = 0.0

    def _items(self) -> Iterator[_Item]:
        """Every item in input order; plans (probes) run in the pool a few rows ahead."""
        plans: deque[Future] = deque()
        records = iter(self.records)
        while True:
            while len(plans) < self.lookahead:
                record = next(records, None)
                if record is None:
                    break
                plans.append(self.pool.submit(self.planner.plan, record))
            if not plans:
                return
            yield from plans.popleft().result()

    def _load(self, item: _Item) -> tuple[_Item, Any, BaseException | None, float]:
        if item.error is not None:
            return item, None, item.error, 0.0
        start = time.perf_counter()
        try:
            spec = self.captioner.frame_spec
            begin, end = item.span if item.span is not None else (None, None)
            frames, _ = sample_frames(item.path, num_frames=spec.num_frames, sampling=spec.sampling,
                                      fps=spec.fps, height=spec.height, width=spec.width, start=begin, end=end)
            return item, self.captioner.prepare(frames), None, time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - any failure becomes an error row
            return item, None, exc, time.perf_counter() - start

    def __iter__(self) -> Iterator[tuple[_Item, Any, BaseException | None]]:
        pending: deque[Future] = deque()
        items = self._items()
        try:
            for item in items:
                pending.append(self.pool.submit(self._load, item))
                if len(pending) >= self.lookahead:
                    break
            while pending:
                item, inputs, exc, seconds = pending.popleft().result()
                self.decode_seconds += seconds
                next_item = next(items, None)
                if next_item is not None:
                    pending.append(self.pool.submit(self._load, next_item))
                yield item, inputs, exc
        finally:
            for fut in pending:
                fut.cancel()
            items.close()
            self.pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- the run

def previous_output(output: Path) -> Path:
    """Where an --overwrite run keeps the old output until its own merge (so a crash loses nothing)."""
    return output.with_name(f"{output.stem}.prev.csv")


class RunError(ValueError):
    """A setting that cannot work; raised before any row is touched."""


def extra_columns_of(captioner: Captioner) -> tuple[str, ...]:
    """The captioner's declared extra output columns (none unless it has ``extra_columns``)."""
    columns = tuple(getattr(captioner, "extra_columns", ()) or ())
    if not all(isinstance(c, str) and c for c in columns) or len(set(columns)) != len(columns):
        raise RunError(f"the captioner's extra_columns must be distinct non-empty names, got {columns!r}")
    return columns


def _check_options(captioner: Captioner, opts: RunOptions) -> None:
    """Reject settings that would turn every row into an error row (and be skipped on re-runs)."""
    if opts.bs < 1:
        raise RunError(f"--bs must be at least 1 (got {opts.bs})")
    if opts.num_workers < 1:
        raise RunError(f"--num_workers must be at least 1 (got {opts.num_workers})")
    spec = captioner.frame_spec
    try:
        check_sampling_args(spec.num_frames, spec.sampling, spec.fps)
    except ValueError as exc:
        raise RunError(f"frame sampling: {exc}") from exc
    _check_windowing(opts)


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


def _output_columns(data: pd.DataFrame, windowing: Windowing | None, extra: Sequence[str]) -> list[str]:
    """The part files' header: input columns, window columns, results, then the captioner's extra columns."""
    columns = list(data.columns)
    if windowing is not None:
        added = [SEGMENT_START_COLUMN, SEGMENT_END_COLUMN] if has_segment_columns(columns) else []
        columns += [c for c in (*added, *WINDOW_COLUMNS) if c not in columns]
    clashing = [c for c in extra if c in columns or c in RESULT_COLUMNS]
    if clashing:
        raise RunError(f"the captioner's extra column(s) {clashing} clash with input or output columns; "
                       f"rename those input columns")
    return [*columns, *RESULT_COLUMNS, *extra]


def _read_input(path: str, windowing: Windowing | None) -> pd.DataFrame:
    data = read_metadata(path)
    clashing = [c for c in RESULT_COLUMNS if c in data.columns]
    if clashing:
        logger.warning("%s: input column(s) %s are replaced by the captioner's output columns", path, clashing)
    reserved = [c for c in (WINDOW_COLUMN, NUM_WINDOWS_COLUMN, SEGMENT_START_COLUMN, SEGMENT_END_COLUMN)
                if c in data.columns]
    if windowing is not None and reserved:
        raise RunError(f"{path}: column(s) {reserved} are written by --window_seconds (is this a windowed "
                       f"output?); drop or rename them, or run without --window_seconds")
    key_columns = [c for c in KEY_COLUMNS if c in data.columns]
    return data.drop(columns=clashing).drop_duplicates(key_columns)


def _start(output: Path, order: list[RowKey], overwrite: bool) -> None:
    """Rank 0's set-up before anyone reads: fold an earlier run's parts in, or set the old output aside."""
    if overwrite:
        for part in find_part_files(output):
            part.unlink()
        if output.is_file():
            os.replace(output, previous_output(output))
    elif find_part_files(output):
        finalize_output(output, order=order)


def _finish(output: Path, order: list[RowKey]) -> pd.DataFrame:
    """Rank 0's merge once every rank has finished; an --overwrite run's old rows stay where new ones failed."""
    prev = previous_output(output)
    if prev.is_file():
        if output.is_file():
            merge_csvs([prev, output], output)
        else:
            os.replace(prev, output)
    merged = finalize_output(output, order=order)
    prev.unlink(missing_ok=True)
    return merged


class _Session:
    """One rank's captioning loop: batches decoded items, captions them, writes rows, counts."""

    def __init__(self, captioner: Captioner, writer: PartWriter, summary: RunSummary, bar: tqdm, bs: int):
        self.captioner = captioner
        self.extra = extra_columns_of(captioner)
        self.writer = writer
        self.summary = summary
        self.bar = bar
        self.bs = bs
        self.batch: list[tuple[dict[str, str], Any]] = []

    def add(self, item: _Item, inputs: Any, exc: BaseException | None) -> None:
        if exc is not None:
            self._write([failure(exc).row(item.cells)])
            return
        self.batch.append((item.cells, inputs))
        if len(self.batch) == self.bs:
            self.flush()

    def flush(self) -> None:
        if not self.batch:
            return
        model_start = time.perf_counter()
        results = caption_batch(self.captioner, [inputs for _, inputs in self.batch], self.extra)
        self.summary.model_seconds += time.perf_counter() - model_start
        self._write([result.row(cells) for (cells, _), result in zip(self.batch, results)])
        self.batch = []

    def _write(self, rows: list[dict[str, str]]) -> None:
        self.writer.write(rows)
        for row in rows:
            ok = row[STATUS_COLUMN] == STATUS_OK
            self.summary.done += ok
            self.summary.failed += not ok
            if not ok:
                self.summary.errors.append(row[ERROR_COLUMN])
        self.bar.update(len(rows))


def run(captioner: Captioner, opts: RunOptions) -> RunSummary:
    """Caption every row of ``opts.input`` not yet captioned in ``opts.output``."""
    info = distributed.setup()
    started = time.perf_counter()
    graphs_before, compile_before = jit.COMPILES.snapshot()
    _check_options(captioner, opts)
    windowing = opts.windowing()
    output = Path(opts.output) if opts.output else default_output(opts.input)
    output.parent.mkdir(parents=True, exist_ok=True)
    data = _read_input(opts.input, windowing)
    columns = _output_columns(data, windowing, extra_columns_of(captioner))
    order = row_keys(data)
    meet = distributed.FileBarrier(output.parent)

    # Nobody reads before rank 0 has tidied up, and nobody writes before everyone has read.
    if info.is_main:
        _start(output, order, opts.overwrite)
    meet.wait("started")
    progress = read_progress(output)  # after --overwrite: nothing recorded
    todo = rows_to_do(data, progress, opts.retry_errors, windowing)
    meet.wait("read")

    mine = shard(todo, info.rank, info.world_size)
    summary = RunSummary(output=output, total_rows=len(data), skipped=len(data) - len(todo))
    finished = progress.done if opts.retry_errors else progress.done | progress.failed
    planner = _Planner(windowing, finished, Path(opts.input).resolve().parent, opts.video_root,
                       has_segment_columns(data.columns))
    writer = PartWriter(part_path(output, info.rank), columns)
    loader = _Loader(captioner, planner, mine.to_dict("records"), opts.num_workers,
                     lookahead=opts.bs + opts.num_workers)
    loaded = iter(loader)
    bar = tqdm(total=len(mine) if windowing is None else None, desc=f"caption rank {info.rank}",
               unit="video" if windowing is None else "window", disable=None if info.is_main else True)
    session = _Session(captioner, writer, summary, bar, opts.bs)
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
        summary.decode_seconds = loader.decode_seconds

    # Each rank leaves once its part is on disk; rank 0 waits for all of them and merges.
    if info.is_main:
        meet.wait("finished")
        merged = _finish(output, order)
        meet.remove()
        logger.info("merged %d rows into %s", len(merged), output)
    else:
        meet.arrive("finished")
    summary.seconds = time.perf_counter() - started
    graphs, compile_seconds = jit.COMPILES.snapshot()
    summary.compiled_graphs, summary.compile_seconds = graphs - graphs_before, compile_seconds - compile_before
    _log_summary(summary, info)
    return summary


def _log_summary(s: RunSummary, info: distributed.DistInfo) -> None:
    logger.info(
        "rank %d: %d rows in the CSV, %d skipped (already done), %d output rows captioned, %d failed; "
        "%.2f rows/s; decode %.1fs in workers (model waited %.1fs), model %.1fs (%d graphs compiled, their "
        "first calls %.1fs); output %s",
        info.rank, s.total_rows, s.skipped, s.done, s.failed, s.videos_per_second,
        s.decode_seconds, s.decode_wait_seconds, s.model_seconds, s.compiled_graphs, s.compile_seconds, s.output)
