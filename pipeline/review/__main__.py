"""``python -m pipeline.review TABLE``: review a captioned table in the browser, marking rows good or bad."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path
from typing import Sequence

import pyarrow as pa
from aiohttp import web

from pipeline.datasets.metadata import MetadataError, read_metadata
from pipeline.review.app import Review, build_app
from pipeline.review.previews import Previews, StripSpec, VideoRoots, cache_folder
from pipeline.review.table import ReviewTable
from pipeline.review.verdicts import Verdicts, VerdictsError, sidecar_path

logger = logging.getLogger("pipeline.review")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.review",
        description="Serve a page for reviewing a captioned table (any CSV, Parquet or JSONL the captioners "
                    "write): each row's frames, caption, fields, status and flags; filters, paging and keyboard "
                    "navigation; good/bad verdicts saved to TABLE.review.csv (the table is never written).",
        epilog="keys on the page: j/k or arrows move, g good, b bad, x clear, n/p next/previous page, / search\n"
               "example:\n  python -m pipeline.review captions.csv --video_root /data/videos --port 8100",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", type=Path, help="the captioned table (.csv, .parquet or .jsonl)")
    p.add_argument("--video_root", type=Path,
                   help="folder the table's relative paths are under, as for the captioners (default: the "
                        "table's folder); videos are read only inside it or the table's folder")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s; anything else shows the table and its "
                        "videos to whoever reaches it)")
    p.add_argument("--port", type=int, default=8100, help="TCP port (default: %(default)s)")
    p.add_argument("--preview_frames", type=int, default=4,
                   help="frames in a row's preview strip, spread evenly over its segment (default: %(default)s)")
    p.add_argument("--preview_height", type=int, default=120,
                   help="height of the preview frames in pixels (default: %(default)s)")
    p.add_argument("--preview_timeout", type=float, default=30.0,
                   help="seconds one preview's decoding may take before its decoder process is stopped and the "
                        "row shows the error (default: %(default)s)")
    p.add_argument("--preview_workers", type=int, default=2,
                   help="decoder processes making previews, started at the first preview (default: %(default)s)")
    return p


def _check(args: argparse.Namespace) -> None:
    if min(args.preview_frames, args.preview_height, args.preview_workers) < 1 or args.preview_timeout <= 0:
        raise ValueError("--preview_frames, --preview_height, --preview_workers and --preview_timeout must be "
                         "positive")
    if args.video_root is not None and not args.video_root.is_dir():
        raise ValueError(f"--video_root {args.video_root} is not a folder")


def load(args: argparse.Namespace) -> Review:
    """The table, its verdicts and (when it has paths) its previews; raises on an unusable table or sidecar."""
    table_path = args.table.resolve()
    table = read_metadata(table_path, required=(), warn_duplicates=False)
    verdicts = Verdicts(table, sidecar_path(table_path))
    reviewed = ReviewTable(table, verdicts)
    previews = None
    if reviewed.has_path:
        video_root = args.video_root.resolve() if args.video_root is not None else None
        previews = Previews(cache_folder(table_path), VideoRoots(table_path.parent, video_root),
                            StripSpec(args.preview_frames, args.preview_height, args.preview_timeout),
                            args.preview_workers)
    else:
        logger.warning("%s has no 'path' column: rows are shown without videos", table_path)
    hosts = frozenset() if _is_address(args.host) else frozenset({args.host.lower()})
    return Review(reviewed, previews, table_path.name, hosts)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        _check(args)
        review = load(args)
    except (MetadataError, VerdictsError, OSError, ValueError, pa.ArrowException) as exc:
        sys.exit("error: " + " ".join(str(exc).split()))  # one line, exit status 1
    app = build_app(review, threads=2 * args.preview_workers)
    logger.info("reviewing %d rows of %s on http://%s:%d/ (verdicts in %s)", len(review.table), args.table,
                args.host, args.port, review.table.verdicts.path)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
