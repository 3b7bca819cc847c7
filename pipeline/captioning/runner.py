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

from pipeline import distributed
from pipeline.datasets.metadata import (
    RESULT_COLUMNS,
    Progress,
    finalize_output,
    find_part_files,
    merge_csvs,
    part_path,
    read_metadata,
    read_progress,
    resolve_video_path,
)
from pipeline.datasets.video import check_sampling_args, sample_frames

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrameSpec:
    """How a captioner wants its frames sampled from each video."""

    num_frames: int = 8
    sampling: str = "uniform"
    fps: float | None = None
    height: int | None = None
    width: int | None = None


class Captioner(Protocol):
    """What a model family provides; the runner does everything else."""

    frame_spec: FrameSpec

    def prepare(self, frames: np.ndarray) -> Any:
        """Turn (T,H,W,3) uint8 RGB frames into this model's per-video inputs (runs in a worker thread)."""

    def generate(self, batch: Sequence[Any]) -> list[str]:
        """Caption a batch of prepared inputs, one string per video."""


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
    errors: list[str] = field(default_factory=list)

    @property
    def videos_per_second(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0


def default_output(input_csv: str | Path) -> Path:
    path = Path(input_csv)
    return path.with_name(f"{path.stem}_caption.csv")


def rows_to_do(data: pd.DataFrame, progress: Progress, retry_errors: bool) -> pd.DataFrame:
    """Rows of ``data`` without a recorded result (error rows count as recorded unless retried)."""
    finished = progress.done if retry_errors else progress.done | progress.failed
    return data[~data["path"].isin(finished)]


def shard(rows: pd.DataFrame, rank: int, world_size: int) -> pd.DataFrame:
    """Round-robin shard: disjoint, covers every row, no padding duplicates."""
    return rows.iloc[rank::world_size]


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


def _error_message(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]


class _Loader:
    """Decodes and prepares videos in worker threads, a bounded window ahead of the model."""

    def __init__(self, captioner: Captioner, paths: list[str], num_workers: int, window: int):
        self.captioner = captioner
        self.paths = paths
        self.pool = ThreadPoolExecutor(max_workers=max(1, num_workers), thread_name_prefix="decode")
        self.window = max(1, window)
        self.decode_seconds = 0.0

    def _load(self, path: str) -> tuple[Any, BaseException | None, float]:
        start = time.perf_counter()
        try:
            spec = self.captioner.frame_spec
            frames, _ = sample_frames(path, num_frames=spec.num_frames, sampling=spec.sampling,
                                      fps=spec.fps, height=spec.height, width=spec.width)
            return self.captioner.prepare(frames), None, time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - any failure becomes an error row
            return None, exc, time.perf_counter() - start

    def __iter__(self) -> Iterator[tuple[Any, BaseException | None]]:
        pending: deque[Future] = deque()
        todo = iter(self.paths)
        try:
            for path in todo:
                pending.append(self.pool.submit(self._load, path))
                if len(pending) >= self.window:
                    break
            while pending:
                inputs, exc, seconds = pending.popleft().result()
                self.decode_seconds += seconds
                next_path = next(todo, None)
                if next_path is not None:
                    pending.append(self.pool.submit(self._load, next_path))
                yield inputs, exc
        finally:
            for fut in pending:
                fut.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)


def _caption_batch(captioner: Captioner, inputs: list[Any]) -> list[tuple[str, BaseException | None]]:
    """Caption a batch; if the batch fails, retry each video alone so one bad input costs one row."""
    try:
        captions = captioner.generate(inputs)
        if len(captions) != len(inputs):
            raise RuntimeError(f"captioner returned {len(captions)} captions for {len(inputs)} videos")
        return [(c, None) for c in captions]
    except Exception as exc:  # noqa: BLE001
        if len(inputs) == 1:
            return [("", exc)]
        logger.warning("batch of %d failed (%s); retrying one video at a time", len(inputs), _error_message(exc))
        return [_caption_batch(captioner, [x])[0] for x in inputs]


def previous_output(output: Path) -> Path:
    """Where an --overwrite run keeps the old output until its own merge (so a crash loses nothing)."""
    return output.with_name(f"{output.stem}.prev.csv")


class RunError(ValueError):
    """A setting that cannot work; raised before any row is touched."""


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


def _read_input(path: str) -> pd.DataFrame:
    data = read_metadata(path)
    clashing = [c for c in RESULT_COLUMNS if c in data.columns]
    if clashing:
        logger.warning("%s: input column(s) %s are replaced by the captioner's output columns", path, clashing)
    return data.drop(columns=clashing).drop_duplicates("path")


def _start(output: Path, order: pd.Series, overwrite: bool) -> None:
    """Rank 0's set-up before anyone reads: fold an earlier run's parts in, or set the old output aside."""
    if overwrite:
        for part in find_part_files(output):
            part.unlink()
        if output.is_file():
            os.replace(output, previous_output(output))
    elif find_part_files(output):
        finalize_output(output, order=order)


def _finish(output: Path, order: pd.Series) -> pd.DataFrame:
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


def run(captioner: Captioner, opts: RunOptions) -> RunSummary:
    """Caption every row of ``opts.input`` not yet captioned in ``opts.output``."""
    info = distributed.setup()
    started = time.perf_counter()
    _check_options(captioner, opts)
    output = Path(opts.output) if opts.output else default_output(opts.input)
    output.parent.mkdir(parents=True, exist_ok=True)
    data = _read_input(opts.input)
    columns = [*data.columns, *RESULT_COLUMNS]
    meet = distributed.FileBarrier(output.parent)

    # Nobody reads before rank 0 has tidied up, and nobody writes before everyone has read.
    if info.is_main:
        _start(output, data["path"], opts.overwrite)
    meet.wait("started")
    todo = rows_to_do(data, read_progress(output), opts.retry_errors)  # after --overwrite: nothing recorded
    meet.wait("read")

    mine = shard(todo, info.rank, info.world_size)
    summary = RunSummary(output=output, total_rows=len(data), skipped=len(data) - len(todo))
    csv_dir = Path(opts.input).resolve().parent
    paths = [resolve_video_path(p, csv_dir, opts.video_root) for p in mine["path"]]
    records = mine.to_dict("records")
    writer = PartWriter(part_path(output, info.rank), columns)
    loader = _Loader(captioner, paths, opts.num_workers, window=opts.bs + opts.num_workers)
    loaded = iter(loader)
    bar = tqdm(total=len(records), desc=f"caption rank {info.rank}", unit="video",
               disable=None if info.is_main else True)
    try:
        batch_rows: list[dict] = []
        batch_inputs: list[Any] = []
        for i, record in enumerate(records):
            wait_start = time.perf_counter()
            inputs, exc = next(loaded)
            summary.decode_wait_seconds += time.perf_counter() - wait_start
            if exc is not None:
                writer.write([{**record, "text": "", "status": "error", "error": _error_message(exc)}])
                summary.failed += 1
                summary.errors.append(_error_message(exc))
                bar.update(1)
            else:
                batch_rows.append(record)
                batch_inputs.append(inputs)
            if batch_rows and (len(batch_rows) == opts.bs or i == len(records) - 1):
                model_start = time.perf_counter()
                results = _caption_batch(captioner, batch_inputs)
                summary.model_seconds += time.perf_counter() - model_start
                rows = []
                for row, (caption, err) in zip(batch_rows, results):
                    ok = err is None
                    rows.append({**row, "text": caption, "status": "ok" if ok else "error",
                                 "error": "" if ok else _error_message(err)})
                    summary.done += ok
                    summary.failed += not ok
                    if not ok:
                        summary.errors.append(_error_message(err))
                writer.write(rows)
                bar.update(len(rows))
                batch_rows, batch_inputs = [], []
    finally:
        loaded.close()  # cancels queued decodes at once, also on an exception or Ctrl-C
        bar.close()
        writer.close()
        summary.decode_seconds = loader.decode_seconds

    # Each rank leaves once its part is on disk; rank 0 waits for all of them and merges.
    if info.is_main:
        meet.wait("finished")
        merged = _finish(output, data["path"])
        meet.remove()
        logger.info("merged %d rows into %s", len(merged), output)
    else:
        meet.arrive("finished")
    summary.seconds = time.perf_counter() - started
    _log_summary(summary, info)
    return summary


def _log_summary(s: RunSummary, info: distributed.DistInfo) -> None:
    logger.info(
        "rank %d: %d rows in the CSV, %d skipped (already done), %d captioned, %d failed; "
        "%.2f videos/s; decode %.1fs in workers (model waited %.1fs), model %.1fs; output %s",
        info.rank, s.total_rows, s.skipped, s.done, s.failed, s.videos_per_second,
        s.decode_seconds, s.decode_wait_seconds, s.model_seconds, s.output)
