"""The flags every captioning entry script shares, and the code that runs one.

An entry script adds its model's flags and a function that builds its captioner
from the parsed arguments; everything else (device, msrun, resume, output) is here.
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from models import attention
from models.checkpoint import CheckpointError
from pipeline import distributed
from pipeline.captioning.runner import Captioner, RunError, RunOptions, RunSummary, run
from pipeline.config import ConfigError, parse_with_config
from pipeline.datasets.metadata import MetadataError

logger = logging.getLogger(__name__)


def common_parser(description: str, epilog: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="CSV of videos: a 'path' column (absolute, or relative to the CSV's folder "
                                 "or --video_root); optional 'start'/'end' (seconds, either may be empty) or "
                                 "'timestamp' (Open-Sora's \"('00:00:01.000', '00:00:05.500')\") caption only "
                                 "that segment; every other column is kept in the output")
    p.add_argument("--config", help="YAML file of option: value pairs (e.g. configs/captioning/*.yaml); "
                                    "flags given on the command line override it")
    p.add_argument("--video_root", help="folder that relative paths in the CSV are resolved against "
                                        "(default: the CSV's folder)")
    p.add_argument("--output", help="final captions CSV (default: <input stem>_caption.csv next to the input); "
                                    "ranks write <output stem>_part<rank>.csv while running")
    p.add_argument("--pretrained_model_name_or_path", help="local folder of the checkpoint "
                                                           "(config.json, *.safetensors, tokenizer files)")
    p.add_argument("--question", help="the prompt given to the model with each video")
    p.add_argument("--max_new_tokens", type=int, help="longest caption, in tokens")
    p.add_argument("--bs", type=int, default=4, help="videos captioned together in one batched generate call")
    p.add_argument("--num_frames", type=int, help="frames sampled uniformly from each video")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--skip_if_existing", dest="overwrite", action="store_false", default=False,
                        help="(default) skip rows already captioned in this output or its part files")
    resume.add_argument("--overwrite", dest="overwrite", action="store_true",
                        help="caption every row again; new captions replace old ones (where a new attempt "
                             "fails, an earlier good caption is kept)")
    p.add_argument("--retry_errors", action="store_true",
                   help="also redo rows recorded with status=error (by default they are kept as they are)")
    p.add_argument("--window_seconds", type=float,
                   help="split each video (or each row's start/end or timestamp segment) into windows of this "
                        "many seconds, each captioned as one output row with window, num_windows, start and end "
                        "columns (an input's own start/end move to segment_start/segment_end); default: off")
    p.add_argument("--window_min_seconds", type=float,
                   help="a last window shorter than this joins the window before it (default: half of "
                        "--window_seconds)")
    p.add_argument("--num_workers", type=int, default=2,
                   help="threads decoding videos ahead of the model")
    p.add_argument("--seed", type=int, default=0, help="random seed (sampling decoders, frame sampling)")
    p.add_argument("--device", choices=["Ascend", "CPU"],
                   help="default: Ascend where MindSpore sees one, else CPU; under msrun each rank "
                        "binds its local device")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="model weights and compute dtype (default: float32 on CPU, bfloat16 on Ascend)")
    p.add_argument("--attention_block_size", type=int, default=attention.DEFAULT_BLOCK_SIZE,
                   help="query/key block length of the tiled attention used for long prompts and large "
                        f"frames (default {attention.DEFAULT_BLOCK_SIZE}; smaller uses less memory)")
    return p


def resolve_dtype(args: argparse.Namespace, device: str) -> str:
    return args.dtype or ("float32" if device == "CPU" else "bfloat16")


def main_with(parser: argparse.ArgumentParser, build: Callable[[argparse.Namespace, str], Captioner],
              argv: Sequence[str] | None = None, base_config: str | Path | None = None) -> RunSummary:
    """Parse flags (over ``base_config``'s defaults), set up the device (and msrun), build the captioner, run."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args = parse_with_config(parser, argv, base_config)
        info = distributed.setup(args.device)
        try:
            attention.set_block_size(args.attention_block_size)
        except ValueError as exc:
            raise ConfigError(f"--attention_block_size: {exc}") from exc
        random.seed(args.seed)
        np.random.seed(args.seed)
        captioner = build(args, resolve_dtype(args, info.device))
        summary = run(captioner, RunOptions(
            input=args.input, output=args.output, video_root=args.video_root, bs=args.bs,
            num_workers=args.num_workers, overwrite=args.overwrite, retry_errors=args.retry_errors,
            seed=args.seed, window_seconds=args.window_seconds, window_min_seconds=args.window_min_seconds))
    except (ConfigError, MetadataError, CheckpointError, RunError, OSError) as exc:
        sys.exit(f"error: {exc}")
    if summary.failed and not summary.done:
        sys.exit(f"error: all {summary.failed} attempted rows failed on rank {info.rank}, e.g. "
                 f"{summary.errors[0]}\nFix the cause (e.g. --video_root) and re-run with --retry_errors.")
    if info.is_main:
        failed = f" ({summary.failed} rows failed: see the status and error columns)" if summary.failed else ""
        print(f"captions written to {summary.output.resolve()}{failed}")
    return summary
