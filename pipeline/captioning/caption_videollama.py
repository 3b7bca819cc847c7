"""Caption videos with Video-LLaMA's vision-language branch (DAMO-NLP-SG/Video-LLaMA-Series, Video-LLaMA-2).

The checkpoint folder is a small config.json of ours (``model_type: video_llama``) naming a
Hugging Face BLIP-2 folder, a Video-LLaMA ``.pth`` and a Hugging Face LLaMA folder, whose
tokenizer is used. Frames are normalised with BLIP-2's (CLIP's) statistics at the ViT's size;
the video's query outputs fill ``<ImageHere>`` of the prompt template, and the reply is cut
at the template's separator, as Video-LLaMA's chat does.
"""
from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np

from models import from_pretrained
from models.blip2.processing import Blip2FrameProcessor
from models.checkpoint import load_tokenizer
from models.video_llama.modeling import build_prompt_ids, read_sources
from pipeline.captioning.cli import common_parser, generation_options, main_with
from pipeline.captioning.results import TRUNCATED_COLUMN, caption_answers
from pipeline.captioning.runner import FrameSpec, RunSummary
from pipeline.config import CONFIG_DIR, ConfigError

BASE_CONFIG = CONFIG_DIR / "captioning" / "videollama.yaml"
VICUNA_TEMPLATE = "###Human: <Video><ImageHere></Video> {question}###Assistant:"


class VideoLlamaCaptioner:
    """One prompt for every video; a batch of videos is one generate call."""

    extra_columns = (TRUNCATED_COLUMN,)

    def __init__(self, folder: str, dtype: str = "float32", question: str = "Describe this video.",
                 prompt_template: str = VICUNA_TEMPLATE, separator: str = "###", num_frames: int = 8,
                 max_new_tokens: int = 128, min_new_tokens: int = 1, num_beams: int = 1,
                 generation: dict | None = None):
        # the tokenizer first: a broken LLaMA folder fails before the model loads
        self.tokenizer = load_tokenizer(read_sources(folder).llama_model)
        self.model = from_pretrained(folder, dtype=dtype)
        if num_frames > self.model.config.max_frame_pos:
            raise ConfigError(f"--num_frames {num_frames} is above the {self.model.config.max_frame_pos} frame "
                              f"positions this checkpoint has")
        size = self.model.config.vision_config.image_size
        self.processor = Blip2FrameProcessor(height=size, width=size)
        self.frame_spec = FrameSpec(num_frames=num_frames)
        try:
            prompt = prompt_template.replace("{question}", question)
            self.prompt_ids = build_prompt_ids(self.tokenizer, prompt, self.model.config.num_video_query_tokens)
        except ValueError as exc:
            raise ConfigError(f"--prompt_template: {exc}") from exc
        self.separator = separator
        stops = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        if separator and separator in self.tokenizer.get_vocab():  # LLaMA's "###" is one token: stop on it
            stops.append(self.tokenizer.get_vocab()[separator])
        self.generate_kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                    num_beams=num_beams, eos_token_id=stops or None, **(generation or {}))

    def prepare(self, frames: np.ndarray) -> np.ndarray:
        return self.processor(frames)

    def generate(self, batch: Sequence[np.ndarray]) -> list[dict]:
        input_ids = np.array([self.prompt_ids] * len(batch), np.int64)
        ids = self.model.generate(pixel_values=np.stack(batch), input_ids=input_ids,
                                  attention_mask=np.ones_like(input_ids), **self.generate_kwargs)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        if self.separator:
            texts = [text.split(self.separator)[0] for text in texts]
        return caption_answers(texts, ids, self.generate_kwargs["eos_token_id"], self.generate_kwargs["max_new_tokens"])


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(
        "Caption videos with Video-LLaMA (a folder whose config.json names the BLIP-2 folder, the "
        "Video-LLaMA .pth and the LLaMA folder).",
        epilog=f"defaults come from {BASE_CONFIG.relative_to(CONFIG_DIR.parent)}\n"
               "example:\n  python -m pipeline.captioning.caption_videollama meta.csv "
               "--pretrained_model_name_or_path /models/video-llama-7b")
    p.add_argument("--prompt_template", help="the prompt, with <ImageHere> where the video goes and {question}")
    p.add_argument("--separator", help="the reply ends where the model writes this (empty: at EOS only)")
    p.add_argument("--num_beams", type=int, help="beam search width (1: greedy)")
    p.add_argument("--min_new_tokens", type=int, help="shortest reply, in new tokens (1: never an empty caption)")
    return p


def build_captioner(args: argparse.Namespace, dtype: str) -> VideoLlamaCaptioner:
    if not args.pretrained_model_name_or_path:
        raise FileNotFoundError("--pretrained_model_name_or_path is required: a Video-LLaMA folder "
                                "(config.json with model_type video_llama)")
    return VideoLlamaCaptioner(args.pretrained_model_name_or_path, dtype, question=args.question,
                               prompt_template=args.prompt_template, separator=args.separator,
                               num_frames=args.num_frames, max_new_tokens=args.max_new_tokens,
                               min_new_tokens=args.min_new_tokens, num_beams=args.num_beams,
                               generation=generation_options(args))


def main(argv: Sequence[str] | None = None) -> RunSummary:
    return main_with(build_parser(), build_captioner, argv, base_config=BASE_CONFIG)


if __name__ == "__main__":
    main()
