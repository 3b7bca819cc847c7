"""Caption videos with a BLIP-2 video captioner (BLIP-2, VideoBLIP or our trained checkpoints).

Frames (B, T, 3, H, W) go through the vision encoder as B*T images and the one set
of Q-Former queries attends over all frames' tokens; T=1 is image BLIP-2.
"""
from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np

from models import from_pretrained
from models.checkpoint import load_tokenizer
from models.generation import left_pad
from models.blip2.processing import Blip2FrameProcessor
from pipeline.captioning.chat import Turn, question_answer_chat, with_token_counts
from pipeline.captioning.cli import LoopGuard, common_parser, generation_options, loop_options, main_with
from pipeline.captioning.results import TRUNCATED_COLUMN, caption_answers, stopped_rows
from pipeline.captioning.runner import FrameSpec, RunSummary
from pipeline.config import CONFIG_DIR

BASE_CONFIG = CONFIG_DIR / "captioning" / "blip2.yaml"


class Blip2Captioner:
    """Prepares frames with the checkpoint's image statistics and captions a batch in one generate call."""

    extra_columns = (TRUNCATED_COLUMN,)

    def __init__(self, folder: str, dtype: str = "float32", question: str = "a video of", num_frames: int = 8,
                 max_new_tokens: int = 32, min_new_tokens: int = 5, num_beams: int = 5, weights: str | None = None,
                 generation: dict | None = None, tp_size: int = 1, stop_repetition: bool = False,
                 loop_retry_seed: int | None = None):
        """``stop_repetition``, ``loop_retry_seed``: loop-proof decoding (``pipeline.captioning.cli.LoopGuard``)."""
        self.tokenizer = load_tokenizer(folder)  # first: a broken folder fails before the model loads
        self.model = from_pretrained(folder, dtype=dtype, weights=weights, tp_size=tp_size)
        self.processor = Blip2FrameProcessor.from_pretrained(
            folder, image_size=self.model.config.vision_config.image_size)
        self.frame_spec = FrameSpec(num_frames=num_frames)
        image_token = getattr(self.model.config, "image_token_index", None)
        # Checkpoints with an image token (the updated Salesforce ones) mark where the query
        # outputs go, in front of the prompt as their processor does; others get them prepended.
        self.image_ids = [] if image_token is None else [image_token] * self.model.config.num_query_tokens
        self.prompt_ids = self.image_ids + self.tokenizer(question)["input_ids"]
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.model.config.text_config.pad_token_id or 0)
        self.generate_kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                    num_beams=num_beams, **(generation or {}))
        loops = LoopGuard.build(folder, self.tokenizer, stop_repetition, loop_retry_seed)
        self.generate_kwargs.update(loops.kwargs)
        self.extra_columns, self.loop_retry = (*self.extra_columns, *loops.columns), loops.retry

    def prepare(self, frames: np.ndarray) -> np.ndarray:
        return self.processor(frames)

    def chat_prompt(self, turns: Sequence[Turn]) -> str:
        """The conversation as BLIP-2's prompt text (no chat template; the video's queries go in front)."""
        return question_answer_chat(turns)

    def generate(self, batch: Sequence[np.ndarray], prompts: Sequence[str] | None = None,
                 options: dict | None = None) -> list[dict]:
        """Captions (or, with per-video ``prompts`` and ``options``, replies with token counts); see
        :mod:`pipeline.captioning.chat`."""
        prompt_ids = [self.prompt_ids] * len(batch) if prompts is None else \
            [self.image_ids + self.tokenizer(p)["input_ids"] for p in prompts]
        input_ids, mask = left_pad(prompt_ids, self.pad_id)
        kwargs = {**self.generate_kwargs, **(options or {})}
        out = self.model.generate(pixel_values=np.stack(batch), input_ids=input_ids, attention_mask=mask,
                                  return_dict_in_generate=True, **kwargs)
        ids = out.sequences
        ids = ids[:, input_ids.shape[1]:] if self.model.is_decoder_only else ids[:, 1:]  # T5: the start token
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        eos = self.model.config.text_config.eos_token_id
        answers = caption_answers(texts, ids, eos, kwargs["max_new_tokens"], stopped_rows(out, kwargs))
        if prompts is None:
            return answers
        visual = 0 if self.image_ids else self.model.config.num_query_tokens  # prepended query outputs
        return with_token_counts(answers, [len(p) + visual for p in prompt_ids], ids, eos)


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(
        "Caption videos with a BLIP-2 video captioner (Salesforce/blip2-*, kpyu/video-blip-*, "
        "or a checkpoint trained with pipeline/training).",
        epilog=f"defaults come from {BASE_CONFIG.relative_to(CONFIG_DIR.parent)}\n"
               "example:\n  python -m pipeline.captioning.caption_blip2 meta.csv "
               "--pretrained_model_name_or_path /models/blip2-opt-2.7b")
    p.add_argument("--num_beams", type=int, help="beam search width (1: greedy)")
    p.add_argument("--min_new_tokens", type=int, help="shortest caption, in new tokens")
    p.add_argument("--weights", help="a weight file whose tensors replace the checkpoint folder's, e.g. a LAVIS "
                                     "fine-tuning .pth (LAVIS names are mapped; the folder supplies the rest)")
    return p


def build_captioner(args: argparse.Namespace, dtype: str) -> Blip2Captioner:
    if not args.pretrained_model_name_or_path:
        raise FileNotFoundError("--pretrained_model_name_or_path is required: a local BLIP-2 checkpoint folder")
    return Blip2Captioner(args.pretrained_model_name_or_path, dtype, question=args.question,
                          num_frames=args.num_frames, max_new_tokens=args.max_new_tokens,
                          min_new_tokens=args.min_new_tokens, num_beams=args.num_beams, weights=args.weights,
                          generation=generation_options(args), tp_size=args.tp_size, **loop_options(args))


def main(argv: Sequence[str] | None = None) -> RunSummary:
    return main_with(build_parser(), build_captioner, argv, base_config=BASE_CONFIG)


if __name__ == "__main__":
    main()
