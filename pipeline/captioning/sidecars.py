"""Caption sidecars: one ``<video stem>.txt`` per captioned row, as many training tools read them.

A sidecar holds the row's caption and a newline. It lies next to its video, or in one
folder (``sidecar_dir``) for all videos. A row naming part of its file (a segment or a
window) gets ``<stem>_<start>-<end>.txt``, times in seconds as ``format_seconds`` writes
them and ``end`` for an open end (``clip_0-5.txt``, ``clip_10-end.txt``). Videos whose
names would collide are told apart: in ``sidecar_dir`` by the folder names above them,
joined by ``__`` (``a/clip.mp4`` and ``b/clip.mp4`` give ``a__clip.txt`` and
``b__clip.txt``); next to the videos (the same folder) by their whole file name
(``clip.mp4.txt`` and ``clip.avi.txt``). Only ``ok`` rows get a sidecar. Each is written
atomically, and only when its text changed.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import pandas as pd

from pipeline.datasets.metadata import (CAPTION_COLUMN, PATH_COLUMN, STATUS_COLUMN, STATUS_OK, format_seconds,
                                        resolve_video_path, row_segment, write_atomic)

logger = logging.getLogger(__name__)


def _candidates(video: Path, flat: bool) -> list[str]:
    """Names for a video's sidecars, shortest first; the last one is unique among all videos."""
    if not flat:
        return [video.stem, video.name]
    folders = video.parent.parts[1:]  # without the root
    names = [video.stem] + ["__".join((*folders[-k:], video.stem)) for k in range(1, len(folders) + 1)]
    return names + ["__".join((*folders, video.name))]


def _names(videos: list[Path], flat: bool) -> dict[Path, str]:
    """Each video's base name: its stem, lengthened only for the videos it would collide with."""
    level = dict.fromkeys(videos, 0)
    while True:
        users: dict[tuple[Path, str], set[Path]] = defaultdict(set)
        for video, k in level.items():
            folder = Path() if flat else video.parent
            users[folder, _candidates(video, flat)[k]].add(video)
        clashing = {video for group in users.values() if len(group) > 1 for video in group}
        if not clashing:
            return {video: _candidates(video, flat)[k] for video, k in level.items()}
        for video in clashing:  # a video at its last, unique name keeps it
            level[video] = min(level[video] + 1, len(_candidates(video, flat)) - 1)


def _suffix(row: dict[str, str]) -> str:
    segment = row_segment(row)
    if segment is None:
        return ""
    begin, end = segment
    return f"_{format_seconds(begin)}-{'end' if end is None else format_seconds(end)}"


def sidecar_files(table: pd.DataFrame, csv_dir: Path, video_root: str | None,
                  sidecar_dir: str | None) -> dict[Path, str]:
    """Each ``ok`` row's sidecar file and its text (see the module docstring)."""
    if STATUS_COLUMN not in table.columns:
        return {}
    rows = [row for row in table.to_dict("records") if row[STATUS_COLUMN] == STATUS_OK]
    videos = [Path(resolve_video_path(row[PATH_COLUMN], csv_dir, video_root)) for row in rows]
    names = _names(list(dict.fromkeys(videos)), flat=sidecar_dir is not None)
    files = {}
    for row, video in zip(rows, videos):
        folder = Path(sidecar_dir) if sidecar_dir is not None else video.parent
        files[folder / f"{names[video]}{_suffix(row)}.txt"] = f"{row[CAPTION_COLUMN]}\n"
    return files


def write_sidecars(table: pd.DataFrame, csv_dir: Path, video_root: str | None, sidecar_dir: str | None) -> int:
    """Write the sidecars of a final output whose text changed; returns how many were written."""
    written = 0
    files = sidecar_files(table, csv_dir, video_root, sidecar_dir)
    for path, text in files.items():
        data = text.encode("utf-8")
        if path.is_file() and path.read_bytes() == data:
            continue
        write_atomic(path, lambda fh, data=data: fh.write(data))
        written += 1
    logger.info("sidecars: wrote %d caption files, %d unchanged", written, len(files) - written)
    return written
