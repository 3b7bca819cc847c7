"""Row previews: a strip of a few frames of the row's video (its segment, if it names one) as one JPEG.

Only files the table names are read, and only inside the folders the reviewer allowed (the table's own
and ``--video_root``): a path is resolved as the captioning runner resolves it, then with every symlink
followed, and refused when it lands outside them. Frames are decoded by the project's video reader in
decoder processes with a time limit (``DecodePool``), so a damaged file that hangs its demuxer costs one
killed process, not the server. Strips are cached in a hidden folder beside the table, keyed by the
file, its segment, its modification time and size, and the strip's frame count and height, so a changed
video gets a new strip.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import cv2
import numpy as np

from pipeline.datasets.decode_pool import DecodePool, DecodeTimeoutError
from pipeline.datasets.metadata import PATH_COLUMN, resolve_video_path, row_segment, write_atomic
from pipeline.datasets.video import VideoReadError

logger = logging.getLogger(__name__)

GAP_PX = 2  # white columns between the frames of a strip
JPEG_QUALITY = 85


class PreviewError(Exception):
    """A row has no preview; the message (shown under the placeholder) says why."""


def cache_folder(table: Path) -> Path:
    """The hidden folder beside the table that holds its previews: ``.out.csv.review_cache``."""
    return table.with_name(f".{table.name}.review_cache")


class VideoRoots:
    """The folders whose files the page may read: a ``path`` cell resolves under one of them or is refused."""

    def __init__(self, table_dir: Path, video_root: Path | None = None) -> None:
        self.table_dir = table_dir
        self.video_root = video_root
        self._allowed = [Path(os.path.realpath(p)) for p in (table_dir, video_root) if p is not None]

    def resolve(self, cell: str) -> Path:
        """The real file a ``path`` cell names (relative: under --video_root, else the table's folder)."""
        if not cell.strip() or "\0" in cell:
            raise PreviewError("the row's path is empty" if not cell.strip() else "the row's path is not a file name")
        real = Path(os.path.realpath(resolve_video_path(cell, self.table_dir, self.video_root)))
        if not any(real.is_relative_to(root) for root in self._allowed):
            where = " or ".join(str(root) for root in self._allowed)
            raise PreviewError(f"refused: {cell!r} is outside {where} (symlinks followed); pass --video_root "
                               "for videos kept elsewhere")
        return real


@dataclass(frozen=True)
class StripSpec:
    """What a preview holds and how long its decoding may take."""

    num_frames: int = 4
    height: int = 120
    timeout: float = 30.0


def encode_strip(frames: np.ndarray) -> bytes:
    """RGB frames (T, H, W, 3) side by side, white gaps between them, as JPEG bytes."""
    height = frames.shape[1]
    gap = np.full((height, GAP_PX, 3), 255, dtype=np.uint8)
    pieces = [part for frame in frames for part in (frame, gap)][:-1]
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(np.hstack(pieces), cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise PreviewError("the frames could not be encoded as JPEG")
    return data.tobytes()


class Previews:
    """Preview strips for rows: from the cache folder, else decoded (in a lazily started decoder pool)."""

    def __init__(self, cache_dir: Path, roots: VideoRoots, spec: StripSpec, workers: int) -> None:
        self.cache_dir = cache_dir
        self.roots = roots
        self.spec = spec
        self._workers = workers
        self._pool: DecodePool | None = None
        self._pool_lock = threading.Lock()
        self._failures: dict[str, str] = {}  # cache key -> error: a file that failed is not decoded again

    def _decoders(self) -> DecodePool:
        with self._pool_lock:  # started on the first preview: a table nobody previews starts no processes
            if self._pool is None:
                self._pool = DecodePool(self._workers)
            return self._pool

    def _key(self, path: Path, segment: tuple[float, float | None] | None) -> str:
        stat = path.stat()
        parts = (str(path), repr(segment), stat.st_mtime_ns, stat.st_size, self.spec.num_frames, self.spec.height)
        return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()

    def strip(self, row: Mapping[str, str]) -> bytes:
        """The row's preview JPEG; PreviewError with the reason when there is none. Blocks: run in a thread."""
        path = self.roots.resolve(str(row.get(PATH_COLUMN, "")))
        try:
            segment = row_segment(row)
            key = self._key(path, segment)
        except ValueError as exc:
            raise PreviewError(f"the row's segment cannot be read: {exc}") from None
        except OSError as exc:
            raise PreviewError(f"{path}: {exc.strerror or exc}") from None
        cached = self.cache_dir / f"{key}.jpg"
        if key in self._failures:
            raise PreviewError(self._failures[key])
        if cached.exists():
            return cached.read_bytes()
        start, end = segment if segment is not None else (None, None)
        try:
            frames, _ = self._decoders().sample_frames(path, self.spec.timeout, num_frames=self.spec.num_frames,
                                                       height=self.spec.height, start=start, end=end)
        except (VideoReadError, ValueError) as exc:
            message = str(exc)
            if isinstance(exc, DecodeTimeoutError):
                message = f"{path}: decoding took longer than {self.spec.timeout:g} s (--preview_timeout); stopped"
            self._failures[key] = message
            logger.info("no preview for %s: %s", path, message)
            raise PreviewError(message) from None
        data = encode_strip(frames)
        try:
            write_atomic(cached, lambda fh: fh.write(data))
        except OSError as exc:  # a read-only folder: previews still show, made again next time
            logger.warning("preview of %s not cached: %s", path, exc)
        return data

    def close(self) -> None:
        """Stop the decoder processes, if any were started."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None
