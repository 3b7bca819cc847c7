"""Caption videos with Video-LLaMA's vision-language branch (DAMO-NLP-SG/Video-LLaMA-Series, Video-LLaMA-2).

The checkpoint folder is a small config.json of ours (``model_type: video_llama``) naming a
Hugging Face BLIP-2 folder, a Video-LLaMA ``.pth`` and a Hugging Face LLaMA folder, whose
tokenizer is used. Frames are normalised with BLIP-2's (CLIP's) statistics at the ViT's size;
the video's query outputs fill ``<ImageHere>`` of the prompt template, and the reply is cut
at the template's separator, as Video-LLaMA's chat does.

``--task gebc`` captions Kinetic-GEBC event boundaries (``pipeline.datasets.gebc``): the input
is the annotation JSON (its boundary table is written beside the output, and caption runs on
it; videos are found in --video_root, default the annotation's folder) or such a table as a
CSV. Frames are sampled from each boundary's start/end window, the three questions of
``--gebc_questions`` are asked of them, and each row gets ``subject``, ``status_before`` and
``status_after`` (``text`` holds all three in the annotation's ``caption`` format).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from models import from_pretrained
from models.blip2.processing import Blip2FrameProcessor
from models.checkpoint import load_tokenizer
from models.generation import left_pad
from models.video_llama.modeling import build_prompt_ids, read_sources
from pipeline.captioning.chat import Turn, template_chat, with_token_counts
from pipeline.captioning.cli import LoopGuard, common_parser, generation_options, loop_options, main_with
from pipeline.captioning.results import LOOP_COLUMNS, TRUNCATED_COLUMN, caption_answers, stopped_rows
from pipeline.captioning.runner import FrameSpec, RunSummary
from pipeline.config import CONFIG_DIR, ConfigError, parse_with_config
from pipeline.datasets import gebc
from pipeline.datasets.metadata import write_csv_atomic

BASE_CONFIG = CONFIG_DIR / "captioning" / "videollama.yaml"
VICUNA_TEMPLATE = "###Human: <Video><ImageHere></Video> {question}###Assistant:"
VIDEO_MARKER = "<Video><ImageHere></Video>"
FOLLOW_UP = "###Human: {question}###Assistant:"  # later user turns of a conversation (the Vicuna format)
CAPTION = "text"


class VideoLlamaCaptioner:
    """The same questions for every video, each answer a column; a batch of videos is one generate call.

    ``questions`` maps an answer's column to its question: ``{"text": ...}`` captions, and
    ``gebc.FIELDS`` (subject, status before, status after) describe an event boundary.
    """

    def __init__(self, folder: str, dtype: str = "float32", questions: Mapping[str, str] | None = None,
                 prompt_template: str = VICUNA_TEMPLATE, separator: str = "###", num_frames: int = 8,
                 max_new_tokens: int = 128, min_new_tokens: int = 1, num_beams: int = 1,
                 generation: dict | None = None, tp_size: int = 1, stop_repetition: bool = False,
                 loop_retry_seed: int | None = None):
        """``stop_repetition``, ``loop_retry_seed``: loop-proof decoding (``pipeline.captioning.cli.LoopGuard``;
        the retry's sampling from the LLaMA folder's generation_config.json)."""
        # the tokenizer first: a broken LLaMA folder fails before the model loads
        self.tokenizer = load_tokenizer(read_sources(folder).llama_model)
        self.model = from_pretrained(folder, dtype=dtype, tp_size=tp_size)
        if num_frames > self.model.config.max_frame_pos:
            raise ConfigError(f"--num_frames {num_frames} is above the {self.model.config.max_frame_pos} frame "
                              f"positions this checkpoint has")
        size = self.model.config.vision_config.image_size
        self.processor = Blip2FrameProcessor(height=size, width=size)
        self.frame_spec = FrameSpec(num_frames=num_frames)
        questions = dict(questions or {CAPTION: "Describe this video."})
        self.prompt_template = prompt_template
        try:
            self.prompts = {name: build_prompt_ids(self.tokenizer, prompt_template.replace("{question}", question),
                                                   self.model.config.num_video_query_tokens)
                            for name, question in questions.items()}
        except ValueError as exc:
            raise ConfigError(f"--prompt_template: {exc}") from exc
        self.extra_columns = (*(name for name in self.prompts if name != CAPTION), TRUNCATED_COLUMN)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.separator = separator
        stops = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        if separator and separator in self.tokenizer.get_vocab():  # LLaMA's "###" is one token: stop on it
            stops.append(self.tokenizer.get_vocab()[separator])
        self.generate_kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                    num_beams=num_beams, eos_token_id=stops or None, **(generation or {}))
        loops = LoopGuard.build(read_sources(folder).llama_model, self.tokenizer, stop_repetition, loop_retry_seed)
        self.generate_kwargs.update(loops.kwargs)
        self.extra_columns, self.loop_retry = (*self.extra_columns, *loops.columns), loops.retry

    def prepare(self, frames: np.ndarray) -> np.ndarray:
        return self.processor(frames)

    def generate(self, batch: Sequence[np.ndarray], prompts: Sequence[str] | None = None,
                 options: dict | None = None) -> list[dict]:
        """Every question of every video in one left-padded generate call (with per-video ``prompts``,
        one reply each: :meth:`reply`); ``options`` over the captioner's generate options."""
        if prompts is not None:
            return self.reply(batch, prompts, options)
        prompts = list(self.prompts.values()) * len(batch)
        input_ids, mask = left_pad(prompts, self.pad_id)
        pixels = np.repeat(np.stack(batch), len(self.prompts), axis=0)
        kwargs = {**self.generate_kwargs, **(options or {})}
        out = self.model.generate(pixel_values=pixels, input_ids=input_ids, attention_mask=mask,
                                  return_dict_in_generate=True, **kwargs)
        texts = self.tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
        if self.separator:
            texts = [text.split(self.separator)[0] for text in texts]
        answers = caption_answers(texts, out.sequences, kwargs["eos_token_id"], kwargs["max_new_tokens"],
                                  stopped_rows(out, kwargs))
        n = len(self.prompts)
        return [self._row(dict(zip(self.prompts, answers[i:i + n]))) for i in range(0, len(answers), n)]

    def chat_prompt(self, turns: Sequence[Turn]) -> str:
        """The conversation in ``--prompt_template``'s format (the video's turn) and the Vicuna format after it."""
        return template_chat(turns, self.prompt_template, FOLLOW_UP, VIDEO_MARKER)

    def reply(self, batch: Sequence[np.ndarray], prompts: Sequence[str], options: dict | None = None) -> list[dict]:
        """One reply per video to its own prompt text, with token counts (see :mod:`pipeline.captioning.chat`)."""
        prompt_ids = [build_prompt_ids(self.tokenizer, prompt, self.model.config.num_video_query_tokens)
                      for prompt in prompts]
        input_ids, mask = left_pad(prompt_ids, self.pad_id)
        kwargs = {**self.generate_kwargs, **(options or {})}
        ids = self.model.generate(pixel_values=np.stack(batch), input_ids=input_ids, attention_mask=mask, **kwargs)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        if self.separator:
            texts = [text.split(self.separator)[0] for text in texts]
        answers = caption_answers(texts, ids, kwargs["eos_token_id"], kwargs["max_new_tokens"])
        return with_token_counts(answers, [len(p) for p in prompt_ids], ids, kwargs["eos_token_id"])

    def _row(self, answers: dict[str, dict]) -> dict:
        """One video's answers as a row: the caption, or the boundary's three captions and their caption line."""
        if CAPTION in answers:
            return answers[CAPTION]
        row = {name: answer["text"] for name, answer in answers.items()}
        flags = {column: str(any(answer[column] == "true" for answer in answers.values())).lower()
                 for column in (TRUNCATED_COLUMN, *LOOP_COLUMNS) if column in answers[gebc.FIELDS[0]]}
        return {**row, CAPTION: gebc.boundary_caption(*(row[f] for f in gebc.FIELDS)), **flags}


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
    g = p.add_argument_group("event boundary captioning (Kinetic-GEBC)")
    g.add_argument("--task", choices=["caption", "gebc"], default="caption",
                   help="caption: one caption per row; gebc: the input is a Kinetic-GEBC annotation JSON (or its "
                        "boundary CSV) and each boundary gets subject, status_before and status_after")
    g.add_argument("--gebc_questions", default=str(gebc.DEFAULT_QUESTIONS),
                   help="YAML of the three questions, keys " + ", ".join(gebc.FIELDS))
    g.add_argument("--boundary_window", type=float, default=gebc.DEFAULT_WINDOW,
                   help="seconds of video before and after each boundary that frames are sampled from")
    g.add_argument("--video_template", default=gebc.DEFAULT_TEMPLATE,
                   help="a boundary's video file from its video id, in --video_root")
    return p


def build_captioner(args: argparse.Namespace, dtype: str) -> VideoLlamaCaptioner:
    if not args.pretrained_model_name_or_path:
        raise FileNotFoundError("--pretrained_model_name_or_path is required: a Video-LLaMA folder "
                                "(config.json with model_type video_llama)")
    questions = gebc.read_questions(args.gebc_questions) if args.task == "gebc" else {CAPTION: args.question}
    return VideoLlamaCaptioner(args.pretrained_model_name_or_path, dtype, questions=questions,
                               prompt_template=args.prompt_template, separator=args.separator,
                               num_frames=args.num_frames, max_new_tokens=args.max_new_tokens,
                               min_new_tokens=args.min_new_tokens, num_beams=args.num_beams,
                               generation=generation_options(args), tp_size=args.tp_size, **loop_options(args))


def gebc_argv(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """The arguments of a GEBC run: an annotation JSON input becomes its boundary table, written beside the
    output (default ``<annotation stem>_gebc.csv``) as ``<output>.boundaries.csv``; the prompt column records
    the three questions."""
    argv = argv + ["--question", " | ".join(gebc.read_questions(args.gebc_questions).values())]
    annotation = Path(args.input)
    if annotation.suffix.lower() != ".json":
        return argv
    if not args.boundary_window > 0:
        raise ConfigError(f"--boundary_window must be positive seconds (got {args.boundary_window})")
    output = Path(args.output) if args.output else annotation.with_name(f"{annotation.stem}_gebc.csv")
    table = output.with_name(f"{output.name}.boundaries.csv")
    write_csv_atomic(gebc.read_boundaries(annotation, args.boundary_window, args.video_template), table)
    argv[argv.index(args.input)] = str(table)
    if not args.output:
        argv += ["--output", str(output)]
    if not args.video_root:
        argv += ["--video_root", str(annotation.resolve().parent)]
    return argv


def main(argv: Sequence[str] | None = None) -> RunSummary:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_with_config(build_parser(), argv, BASE_CONFIG)
        if args.task == "gebc":
            argv = gebc_argv(args, argv)
    except (ConfigError, ValueError, OSError) as exc:
        sys.exit(f"error: {exc}")
    return main_with(build_parser(), build_captioner, argv, base_config=BASE_CONFIG)


if __name__ == "__main__":
    main()
