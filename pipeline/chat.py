"""``python -m pipeline.chat VIDEO --pretrained_model_name_or_path DIR``: talk about one video in the terminal.

The video is sampled once; every turn sends the whole conversation through the
family's chat prompt (its chat template where it has one), as the server does, in this process.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from models.checkpoint import CheckpointError
from pipeline.captioning.chat import Turn
from pipeline.config import ConfigError
from pipeline.datasets.video import IMAGE_SUFFIXES, VideoReadError
from pipeline.serve.engine import FAMILY_FLAGS_EPILOG, Engine, RequestError, add_model_flags

COMMANDS = "/reset forgets the conversation, /quit (or end of input) leaves"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.chat",
                                description="A multi-turn chat about a video (or an image) with a captioning "
                                            f"checkpoint. {COMMANDS}; an empty message asks the caption prompt.",
                                epilog=FAMILY_FLAGS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", help="the video (or image) to talk about")
    add_model_flags(p)
    p.add_argument("--max_tokens", type=int, help="longest reply, in tokens (default: the model's --max_new_tokens)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="above 0: sample replies at this temperature (default: %(default)s, the model's own "
                        "greedy or beam decoding)")
    p.add_argument("--show_prompt", action="store_true", help="print the prompt text the model gets each turn")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args, family_argv = build_parser().parse_known_args(argv)
    try:
        engine = Engine.load(args.pretrained_model_name_or_path, family_argv, args.device, args.dtype)
        is_image = args.video.lower().endswith(tuple(IMAGE_SUFFIXES))
        clip = engine.image_frames([args.video]) if is_image else engine.video_frames(args.video)
        options = engine.options(args.max_tokens or engine.max_new_tokens, args.temperature)
    except (ConfigError, CheckpointError, VideoReadError, RequestError, OSError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    print(f"{len(clip.frames)} frames of {args.video}; {COMMANDS}.", flush=True)
    turns: list[Turn] = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        if line == "/quit":
            return
        if line == "/reset":
            turns = []
            print("(conversation reset)", flush=True)
            continue
        turns.append(Turn("user", line or engine.question, media=not turns))
        prepared = engine.prepare(clip, turns)
        if args.show_prompt:
            print(f"[prompt] {prepared.prompt!r}", flush=True)
        answer = engine.generate([prepared], options)[0]["text"]
        print(f"model> {answer}", flush=True)
        turns.append(Turn("assistant", answer))


if __name__ == "__main__":
    main()
