"""The baseline colour captioner with hooks for runner tests; runs as a script (also under msrun).

CAPTION_CALL_LOG appends one line per captioned video to a file (to count calls across
a killed process); CAPTION_SLEEP sleeps per batch (only on rank CAPTION_SLEEP_RANK when
that is set, once); --fail_on makes generate raise.
"""
from __future__ import annotations

import os
import time
from typing import Sequence

from pipeline.captioning.caption_colour import ColourCaptioner, build_parser, colour_caption
from pipeline.captioning.cli import main_with

__all__ = ["colour_caption", "main"]


class InstrumentedCaptioner(ColourCaptioner):
    def __init__(self, num_frames: int, fail_on: str | None):
        super().__init__(num_frames)
        self.fail_on = fail_on
        self.slept = False

    def generate(self, batch: Sequence[str]) -> list[str]:
        log = os.environ.get("CAPTION_CALL_LOG")
        if log:
            with open(log, "a") as f:
                f.writelines(f"{caption}\n" for caption in batch)
        only_rank = os.environ.get("CAPTION_SLEEP_RANK")
        if only_rank is None or (only_rank == os.environ.get("RANK_ID") and not self.slept):
            time.sleep(float(os.environ.get("CAPTION_SLEEP", "0")))
            self.slept = True
        if self.fail_on and any(self.fail_on in caption for caption in batch):
            raise RuntimeError(f"model failure on {self.fail_on}")
        return super().generate(batch)


def main(argv: Sequence[str] | None = None):
    parser = build_parser()
    parser.add_argument("--fail_on", help="raise in generate when a caption contains this text")
    return main_with(parser, lambda args, dtype: InstrumentedCaptioner(args.num_frames or 4, args.fail_on), argv)


if __name__ == "__main__":
    main()
