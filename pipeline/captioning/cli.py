"""The flags every captioning entry script shares, and the code that runs one.

An entry script adds its model's flags and a function that builds its captioner
from the parsed arguments; everything else (device, msrun, resume, output) is here.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from models import attention
from models.generation import LoopStop, check_generation_args
from models.checkpoint import CheckpointError, load_tokenizer
from pipeline import distributed, environment
from pipeline.distributed import RunAborted
from pipeline.captioning.attempts import DEFAULT_MAX_ATTEMPTS
from pipeline.captioning.lock import OutputLockedError
from pipeline.captioning.results import LOOP_COLUMNS
from pipeline.captioning.runner import Captioner, RunError, RunOptions, RunSummary, check_run_options, run
from pipeline.captioning.schemas import CaptionSchema, load_schema, presets
from pipeline.config import CONFIG_DIR, ConfigError, load_yaml, parse_with_config
from pipeline.datasets.caption_text import CLEANUP_CONFIG, MAX_UNIT_WORDS, MIN_LOOP_WORDS, MIN_REPEATS, Cleanup
from pipeline.datasets.metadata import MetadataError
from pipeline.datasets.video import DEFAULT_MAX_DECODE_PIXELS

logger = logging.getLogger(__name__)
PROMPTS_CONFIG = CONFIG_DIR / "prompts.yaml"


def common_parser(description: str, epilog: str = "", model: bool = True) -> argparse.ArgumentParser:
    """The shared flags; ``model=False`` leaves out those only a model reads (checkpoint, prompt, dtype ...)."""
    p = argparse.ArgumentParser(description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="table of videos (.csv, .parquet or .jsonl): a 'path' column (absolute, or "
                                 "relative to the table's folder "
                                 "or --video_root); optional 'start'/'end' (seconds, either may be empty) or "
                                 "'timestamp' (Open-Sora's \"('00:00:01.000', '00:00:05.500')\") caption only "
                                 "that segment; every other column is kept in the output")
    p.add_argument("--config", help="YAML file of option: value pairs (e.g. configs/captioning/*.yaml); "
                                    "flags given on the command line override it")
    p.add_argument("--video_root", help="folder that relative paths in the CSV are resolved against "
                                        "(default: the CSV's folder)")
    p.add_argument("--output", help="final captions table; its suffix (.csv, .parquet, .jsonl) picks the format "
                                    "(default: <input stem>_caption in the input's format, next to it); ranks "
                                    "write <output>.part<rank>.csv while running")
    p.add_argument("--sidecar", action="store_true",
                   help="after the merge, also write each ok row's caption to <video stem>.txt next to its video "
                        "(a segment or window row: <stem>_<start>-<end>.txt, seconds, 'end' for an open end); "
                        "videos in one folder sharing a stem use their whole file name (clip.mp4.txt); a re-run "
                        "rewrites only changed captions")
    p.add_argument("--sidecar_dir", metavar="DIR",
                   help="write the sidecars (implies --sidecar) into DIR instead, as <stem>.txt; videos sharing a "
                        "stem get the folders above them prefixed, joined by '__' (a/clip.mp4 -> a__clip.txt)")
    if model:
        p.add_argument("--pretrained_model_name_or_path", help="local folder of the checkpoint "
                                                               "(config.json, *.safetensors, tokenizer files)")
        add_prompt_flags(p)
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
    p.add_argument("--force", action="store_true",
                   help="take over the output's lock (<output>.lock) from a run on another host whose heartbeat "
                        "stopped over a minute ago (a dead run on this host is taken over without it)")
    p.add_argument("--max_attempts", type=int, default=DEFAULT_MAX_ATTEMPTS,
                   help="a row on which the process died (a crash, an out-of-memory kill) this many times is "
                        "recorded as an error row instead of being tried again")
    p.add_argument("--window_seconds", type=float,
                   help="split each video (or each row's start/end or timestamp segment) into windows of this "
                        "many seconds, each captioned as one output row with window, num_windows, start and end "
                        "columns (an input's own start/end move to segment_start/segment_end); default: off")
    p.add_argument("--window_min_seconds", type=float,
                   help="a last window shorter than this joins the window before it (default: half of "
                        "--window_seconds)")
    p.add_argument("--num_workers", type=int, default=2,
                   help="processes decoding videos ahead of the model (threads with --decode_timeout 0)")
    p.add_argument("--decode_timeout", type=float,
                   help="seconds one video's decoding may take; a decoder process over time is killed and "
                        "replaced, and the row is an error row (default: 120, plus 120 per 32 frames above 32); "
                        "0: decode in threads of this process, with no time limit (for debugging and timing)")
    p.add_argument("--max_decode_pixels", type=int, default=DEFAULT_MAX_DECODE_PIXELS,
                   help="frames of more pixels (height x width) than this are scaled down, keeping their aspect "
                        "ratio, while they are decoded, which bounds one video's memory (default "
                        f"{DEFAULT_MAX_DECODE_PIXELS}); 0: no limit")
    p.add_argument("--seed", type=int, default=0, help="random seed (sampling decoders, frame sampling)")
    p.add_argument("--device", choices=["Ascend", "CPU"],
                   help="default: Ascend where MindSpore sees one, else CPU; under msrun each rank "
                        "binds its local device")
    environment.add_verbose_flag(p)
    if model:
        add_decoding_flags(p)
        add_loop_flags(p)
        add_cleanup_flags(p)
        p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                       help="model weights and compute dtype (default: float32 on CPU, bfloat16 on Ascend)")
        add_tp_flag(p)
        p.add_argument("--attention_block_size", type=int, default=attention.DEFAULT_BLOCK_SIZE,
                       help="query/key block length of the tiled attention used for long prompts and large "
                            "frames (smaller uses less memory)")
    return p


def add_tp_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp_size", type=int, default=1,
                   help="tensor parallelism: split the language model over this many consecutive msrun ranks "
                        "(a group; keep it inside one node). The workers form tp_size x data-parallel groups; "
                        "rows are shared out over the groups and each group's first rank writes its part")


def add_prompt_flags(p: argparse.ArgumentParser) -> None:
    """What is asked of each video, and how long the answer may be."""
    p.add_argument("--question", help="the prompt given to the model with each video")
    p.add_argument("--prompt_preset", choices=sorted(load_yaml(PROMPTS_CONFIG)),
                   help=f"use a named prompt from {PROMPTS_CONFIG.relative_to(CONFIG_DIR.parent)} instead of "
                        "--question; the output's prompt column records the name (else the question)")
    p.add_argument("--max_new_tokens", type=int, help="longest caption, in tokens")
    p.add_argument("--schema", metavar="NAME|FILE",
                   help=f"structured captions: every caption is a JSON object that this JSON Schema accepts "
                        f"(decoding is constrained to it, and the prompt lists its fields); NAME is a preset in "
                        f"configs/schemas ({', '.join(presets())}), FILE a JSON Schema file. The text column holds "
                        f"the JSON, each top-level field also a caption_<field> column, the schema column the "
                        f"name; a caption whose JSON --max_new_tokens cut is an error row; --cleanup does not apply")


def add_cleanup_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cleanup", action=argparse.BooleanOptionalAction, default=True,
                   help="clean each caption (strip a boilerplate opening, cut a repetition loop) as "
                        "--cleanup_config says, keeping the model's own text in text_raw and flagging "
                        "cut loops in repetition")
    p.add_argument("--cleanup_config", default=str(CLEANUP_CONFIG),
                   help="YAML of the clean-up: strip_openings, cut_repetition and the openings list")


GENERATION_FLAGS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "no_repeat_ngram_size")


def add_decoding_flags(p: argparse.ArgumentParser) -> None:
    """Decoding controls with transformers' names and meaning; unset ones keep the model's defaults."""
    g = p.add_argument_group("decoding (as transformers' generate; unset: the model's defaults)")
    g.add_argument("--do_sample", action=argparse.BooleanOptionalAction,
                   help="sample tokens instead of greedy or beam search (seeded by --seed)")
    g.add_argument("--temperature", type=float, help="divide the logits by this before sampling")
    g.add_argument("--top_p", type=float, help="sample from the smallest set of tokens whose probability reaches this")
    g.add_argument("--top_k", type=int, help="sample from the k most likely tokens (0: all)")
    g.add_argument("--repetition_penalty", type=float,
                   help="make tokens already in the prompt or caption less likely (1.0: off; 1.1 to 1.3 "
                        "curbs loops), in greedy, beam and sampling")
    g.add_argument("--no_repeat_ngram_size", type=int,
                   help="never repeat an n-gram of this many tokens (0: off; 3 to 4 stops phrase loops)")


# Qwen's recommended sampling (Qwen2/2.5 model cards), for re-generating a caption that looped
LOOP_RETRY_SAMPLING = dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)


def add_loop_flags(p: argparse.ArgumentParser) -> None:
    """Loop-proof decoding, for every model captioner (``common_parser`` adds these flags)."""
    g = p.add_argument_group("repetition loops")
    g.add_argument("--stop_repetition", action=argparse.BooleanOptionalAction, default=True,
                   help="end a caption's generation once it repeats itself as the clean-up's loop rule says (a "
                        "unit of words 3 or more times in a row, covering 6 or more words; greedy and sampling, "
                        "not beam search), instead of spending --max_new_tokens on the loop; the repetition "
                        "column flags the caption")
    g.add_argument("--loop_retry", action=argparse.BooleanOptionalAction, default=True,
                   help="generate a caption stopped for repetition once more, sampling as the checkpoint's "
                        "generation_config.json says (else temperature 0.7, top_p 0.8, top_k 20, "
                        "repetition_penalty 1.05), seeded by --seed; the retried column flags it, and the "
                        "repetition column then says whether the new caption loops (needs --stop_repetition)")


@dataclass(frozen=True)
class LoopGuard:
    """One captioner's loop-proof decoding: the ``generate`` options and columns it adds, and the options a
    looping caption is generated again with (``loop_retry``, read by ``pipeline.captioning.results``)."""

    kwargs: dict
    columns: tuple[str, ...]
    retry: dict | None

    @classmethod
    def build(cls, folder: str, tokenizer, stop_repetition: bool = False,
              loop_retry_seed: int | None = None) -> LoopGuard:
        """``folder``: where ``generation_config.json`` may give the retry's sampling; off without
        ``stop_repetition``, no retry without ``loop_retry_seed``."""
        if not stop_repetition:
            return cls({}, (), None)
        retry = None if loop_retry_seed is None else loop_retry_sampling(folder, loop_retry_seed)
        return cls({"stop_repetition": loop_stop(tokenizer)}, LOOP_COLUMNS, retry)


def loop_options(args: argparse.Namespace) -> dict:
    """The captioner keyword arguments of ``--stop_repetition`` and ``--loop_retry`` (seeded by ``--seed``)."""
    return dict(stop_repetition=args.stop_repetition, loop_retry_seed=args.seed if args.loop_retry else None)


def loop_stop(tokenizer) -> LoopStop:
    """The clean-up's loop rule (``pipeline.datasets.caption_text``) for generation, on this tokenizer's words."""
    return LoopStop.for_tokenizer(tokenizer, min_repeats=MIN_REPEATS, min_words=MIN_LOOP_WORDS,
                                  max_unit_words=MAX_UNIT_WORDS)


def loop_retry_sampling(folder: str, seed: int) -> dict:
    """``generate`` options for re-generating a looping caption: sampling with the keys of ``LOOP_RETRY_SAMPLING``
    the checkpoint's ``generation_config.json`` sets, over those defaults, and one generator seeded by ``seed``.

    A checkpoint whose own values would not sample (do_sample false, top_k 1 or top_p at most 0.01, as the
    published Qwen2-VL and Qwen2.5-VL configs, which are greedy in effect) would loop again: it gets the
    defaults."""
    path = Path(folder) / "generation_config.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    sampling = {**LOOP_RETRY_SAMPLING, **{k: saved[k] for k in LOOP_RETRY_SAMPLING if saved.get(k) is not None}}
    if not sampling["do_sample"] or sampling["top_k"] == 1 or sampling["top_p"] <= 0.01:
        logger.info("%s samples greedily in effect (%s); looping captions are retried with %s", path,
                    {k: saved[k] for k in LOOP_RETRY_SAMPLING if k in saved}, LOOP_RETRY_SAMPLING)
        sampling = dict(LOOP_RETRY_SAMPLING)
    return {**sampling, "seed": np.random.default_rng(seed)}


def _given_generation_flags(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in GENERATION_FLAGS if getattr(args, name, None) is not None}


def generation_options(args: argparse.Namespace) -> dict:
    """The decoding controls given on the command line or in the YAML, as ``generate`` keyword arguments;
    sampling draws from one generator seeded by --seed, so a run samples the same captions again; --schema
    becomes a grammar compiled for the checkpoint's tokenizer."""
    options = _given_generation_flags(args)
    if options.get("do_sample"):
        options["seed"] = np.random.default_rng(args.seed)
    schema = caption_schema(args)
    if schema is not None:
        options["grammar"] = schema.grammar(load_tokenizer(args.pretrained_model_name_or_path))
    return options


def caption_schema(args: argparse.Namespace) -> CaptionSchema | None:
    """The --schema preset or file, checked (ConfigError), or None."""
    value = getattr(args, "schema", None)
    return load_schema(value) if value else None


def checkpoint_decoding(folder: str, model_config, tokenizer) -> dict:
    """The checkpoint's end and pad tokens and its repetition controls (``generation_config.json``, else
    the model config, else the tokenizer), as ``generate`` keyword arguments, as transformers uses them."""
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(folder) if (Path(folder) / "generation_config.json").is_file() \
        else model_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    pad = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
    controls = {name: getattr(gen, name) for name in ("repetition_penalty", "no_repeat_ngram_size")
                if getattr(gen, name, None) is not None}
    return dict(eos_token_id=eos, pad_token_id=pad if pad is not None else int(np.atleast_1d(eos)[0]), **controls)


def check_args(args: argparse.Namespace) -> None:
    """Refuse flag values that would make every row an error row, before anything is loaded."""
    def given(name: str):
        return getattr(args, name, None)

    at_least_one = ("max_new_tokens", "num_beams", "num_frames", "max_frames", "max_visual_tokens")
    for name in at_least_one:
        if given(name) is not None and given(name) < 1:
            raise ConfigError(f"--{name} must be at least 1 (got {given(name)})")
    if given("min_new_tokens") is not None:
        if given("min_new_tokens") < 0:
            raise ConfigError(f"--min_new_tokens must be 0 or more (got {given('min_new_tokens')})")
        if given("max_new_tokens") is not None and given("min_new_tokens") > given("max_new_tokens"):
            raise ConfigError(f"--min_new_tokens ({given('min_new_tokens')}) is above --max_new_tokens "
                              f"({given('max_new_tokens')}); no caption could satisfy both")
    if given("fps") is not None and not given("fps") > 0:
        raise ConfigError(f"--fps must be positive (got {given('fps')})")
    try:
        check_generation_args(**_given_generation_flags(args))
    except ValueError as exc:
        raise ConfigError(f"--{exc}") from exc


def resolve_prompt(args: argparse.Namespace) -> str | None:
    """Put a --prompt_preset's text in ``args.question``; what the prompt column records (None: no prompt)."""
    name = getattr(args, "prompt_preset", None)
    if name:
        args.question = load_yaml(PROMPTS_CONFIG)[name]
        return name
    return getattr(args, "question", None)


def resolve_dtype(args: argparse.Namespace, device: str) -> str:
    return getattr(args, "dtype", None) or ("float32" if device == "CPU" else "bfloat16")


def main_with(parser: argparse.ArgumentParser, build: Callable[[argparse.Namespace, str], Captioner],
              argv: Sequence[str] | None = None, base_config: str | Path | None = None,
              error_text: Callable[[argparse.Namespace], Callable[[dict[str, str]], str]] | None = None
              ) -> RunSummary:
    """Parse flags (over ``base_config``'s defaults) and check them, set up the device (and msrun), run.
    ``error_text(args)``: the run's ``RunOptions.error_text`` (what an error row's text is).

    The captioner is built only once the run knows this rank has rows to caption.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args = parse_with_config(parser, argv, base_config)
        check_args(args)
        prompt = resolve_prompt(args)
        schema = caption_schema(args)
        if schema is not None and getattr(args, "question", None):
            args.question = f"{args.question}\n{schema.instruction()}"
        # the clean-up edits prose, and would break the JSON
        cleanup = Cleanup.from_yaml(args.cleanup_config) if getattr(args, "cleanup", False) and schema is None \
            else None
        opts = RunOptions(
            input=args.input, output=args.output, video_root=args.video_root, bs=args.bs,
            num_workers=args.num_workers, overwrite=args.overwrite, retry_errors=args.retry_errors,
            seed=args.seed, window_seconds=args.window_seconds, window_min_seconds=args.window_min_seconds,
            force=args.force, max_attempts=args.max_attempts, prompt=prompt, cleanup=cleanup,
            decode_timeout=args.decode_timeout, max_decode_pixels=args.max_decode_pixels or None,
            sidecar=args.sidecar, sidecar_dir=args.sidecar_dir, tp_size=getattr(args, "tp_size", 1),
            error_text=None if error_text is None else error_text(args), caption_schema=schema)
        check_run_options(opts)
        if getattr(args, "attention_block_size", None) is not None:
            try:
                attention.set_block_size(args.attention_block_size)
            except ValueError as exc:
                raise ConfigError(f"--attention_block_size: {exc}") from exc
        environment.set_verbose(args.verbose)
        info = distributed.setup(args.device)
        random.seed(args.seed)
        np.random.seed(args.seed)
        summary = run(lambda: build(args, resolve_dtype(args, info.device)), opts)
    except (ConfigError, MetadataError, CheckpointError, RunError, OutputLockedError, RunAborted, OSError) as exc:
        sys.exit(f"error: {exc}")
    if info.is_main:
        _report(summary, opts)
    return summary


def _report(summary: RunSummary, opts: RunOptions) -> None:
    """The run's verdict, from rank 0 after the merge: fail only when every row this run tried failed."""
    out = summary.output.resolve()
    if summary.run_failed and not summary.run_done:
        cause = ("They failed again with --retry_errors, so the cause is still there (unreadable videos, a wrong "
                 "--video_root or checkpoint): see the error column."
                 if opts.retry_errors else "Fix the cause (e.g. --video_root) and re-run with --retry_errors.")
        sys.exit(f"error: all {summary.run_failed} rows this run tried failed, e.g. {summary.run_error}\n"
                 f"They are recorded as error rows in {out}. {cause}")
    if not summary.run_done and not summary.run_failed:
        print(f"nothing to caption: all {summary.total_rows} rows are already recorded in {out}")
    else:
        print(f"captions written to {out}")
    if summary.errors_remaining:
        print(f"{summary.errors_remaining} rows of {out.name} are error rows (see the status and error columns); "
              f"fix their cause and re-run with --retry_errors to redo them")
