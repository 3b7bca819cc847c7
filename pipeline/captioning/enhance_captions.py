"""Rewrite the captions of a CSV with a text-only chat model (caption enhancement).

Each row's caption (``--text_column``, default ``text``) goes into a rewrite template of
``configs/enhance_templates.yaml`` (a system and a user message), the checkpoint's chat template
makes the prompt, and a native decoder (Qwen2 / Qwen2.5-Instruct, Llama-3-Instruct, Mistral-Instruct:
``models.from_pretrained``) writes the rewrite, a left-padded batch per generate call. The run is
the captioning runner's (resume, error rows, msrun, part files), with no video read.

Output: ``text`` is the caption that was rewritten, ``text_enhanced`` the rewrite, ``truncated``
whether it stopped at ``--max_new_tokens`` mid-sentence. The runner replaces an input's
``text``/``status``/``error`` columns with its own, so the captions are read here from the input
CSV by row key, and ``text`` is given back as this row's result. An input row whose caption is
empty or whose status is ``error`` becomes an error row saying so. An error row (these, or a
rewrite that raised an error, or a row the process died on) keeps the input caption in ``text``
(see ``input_caption``).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from jinja2.exceptions import TemplateError

from models import from_pretrained, model_family
from models.checkpoint import CheckpointError, load_tokenizer, read_config
from pipeline.captioning.cli import (LoopGuard, add_decoding_flags, add_loop_flags, add_tp_flag, checkpoint_decoding,
                                     common_parser, generation_options, loop_options, main_with)
from pipeline.captioning.results import TRUNCATED_COLUMN, caption_answers, stopped_rows
from pipeline.captioning.runner import RunSummary
from pipeline.config import CONFIG_DIR, ConfigError, load_yaml
from pipeline.datasets.metadata import (ERROR_COLUMN, PATH_COLUMN, STATUS_COLUMN, STATUS_ERROR, RowKey,
                                        read_metadata, row_key, row_keys)

BASE_CONFIG = CONFIG_DIR / "captioning" / "enhance.yaml"
TEMPLATES_CONFIG = CONFIG_DIR / "enhance_templates.yaml"
ENHANCED_COLUMN = "text_enhanced"
TEXT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen3_5_text", "qwen3_5_moe_text")
SAMPLE_CAPTION = "a red ball rolls across a wooden table"


def load_template(name: str, path: str | Path = TEMPLATES_CONFIG) -> dict[str, str]:
    """The named template's ``system`` and ``user`` messages; the user message must hold ``{caption}``."""
    templates = load_yaml(path)
    if name not in templates:
        raise ConfigError(f"{path}: no template {name!r}; it has {', '.join(sorted(templates))}")
    template = templates[name]
    if not isinstance(template, dict) or not isinstance(template.get("user"), str) \
            or "{caption}" not in template["user"]:
        raise ConfigError(f"{path}: template {name!r} needs a 'user' message containing {{caption}} "
                          f"(and optionally a 'system' message)")
    return {"system": str(template.get("system") or ""), "user": template["user"]}


def read_captions(csv_path: str | Path, column: str) -> dict[RowKey, tuple[str, str, str]]:
    """(caption, status, error) of each row key of the input CSV, the first row of a key as the runner keeps."""
    table = read_metadata(csv_path, required=(PATH_COLUMN, column), warn_duplicates=False)
    cells = [table[c].tolist() if c in table.columns else [""] * len(table)
             for c in (column, STATUS_COLUMN, ERROR_COLUMN)]
    captions: dict[RowKey, tuple[str, str, str]] = {}
    for key, *values in zip(row_keys(table), *cells):
        captions.setdefault(key, tuple(values))
    return captions


class CaptionEnhancer:
    """A captioner that reads no video: ``prepare`` takes a row's cells, ``generate`` rewrites captions."""

    frame_spec = None
    extra_columns = (ENHANCED_COLUMN, TRUNCATED_COLUMN)

    def __init__(self, folder: str, captions: dict[RowKey, tuple[str, str, str]], template: dict[str, str],
                 dtype: str = "float32", max_new_tokens: int = 256, num_beams: int = 1,
                 generation: dict | None = None, column: str = "text", tp_size: int = 1,
                 stop_repetition: bool = False, loop_retry_seed: int | None = None):
        """``stop_repetition``, ``loop_retry_seed``: loop-proof decoding (``pipeline.captioning.cli.LoopGuard``)."""
        family = model_family(read_config(folder))
        if family not in TEXT_MODEL_TYPES:
            raise CheckpointError(f"{folder} is a {family!r} model; caption enhancement needs a text-only chat "
                                  f"model ({', '.join(TEXT_MODEL_TYPES)})")
        self.tokenizer = load_tokenizer(folder)
        if not self.tokenizer.chat_template:
            raise CheckpointError(f"the tokenizer in {folder} has no chat template; use an instruction-tuned "
                                  f"checkpoint (e.g. Qwen2.5-*-Instruct)")
        self.template = template
        try:  # once here, before the model loads: a template that cannot make this prompt fails no row
            self.prompt_ids(SAMPLE_CAPTION)
        except Exception as exc:  # noqa: BLE001 - a chat template can raise any error
            raise CheckpointError(f"the chat template in {folder} cannot make the rewrite prompt: "
                                  f"{type(exc).__name__}: {' '.join(str(exc).split())}") from None
        self.model = from_pretrained(folder, dtype=dtype, tp_size=tp_size)
        self.captions = captions
        self.column = column
        # The checkpoint's repetition controls (Qwen2.5-Instruct: repetition_penalty 1.05) unless a flag is given.
        decoding = checkpoint_decoding(folder, self.model.config, self.tokenizer)
        self.pad_id = decoding["pad_token_id"]
        self.generate_kwargs = dict(max_new_tokens=max_new_tokens, num_beams=num_beams,
                                    **{**decoding, **(generation or {})})
        loops = LoopGuard.build(folder, self.tokenizer, stop_repetition, loop_retry_seed)
        self.generate_kwargs.update(loops.kwargs)
        self.extra_columns, self.loop_retry = (*self.extra_columns, *loops.columns), loops.retry

    def prepare(self, cells: dict[str, str]) -> str:
        """The row's caption, or the reason it cannot be rewritten (an error row)."""
        caption, status, error = self.captions[row_key(cells)]
        if status == STATUS_ERROR:
            raise ValueError(f"the input row is an error row (status=error: {error or 'no message'}); "
                             f"caption it again before enhancing it")
        if not caption.strip():
            raise ValueError(f"the input caption (column {self.column!r}) is empty")
        return caption.strip()

    def prompt_ids(self, caption: str) -> list[int]:
        """The chat prompt of one caption; templates without a system role get it in the user turn."""
        system, user = self.template["system"], self.template["user"].replace("{caption}", caption)
        messages = [{"role": "system", "content": system}] * bool(system) + [{"role": "user", "content": user}]
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        except TemplateError:
            if not system:
                raise
            merged = [{"role": "user", "content": f"{system}\n\n{user}"}]
            return self.tokenizer.apply_chat_template(merged, add_generation_prompt=True, return_dict=False)

    def generate(self, batch: Sequence[str], options: dict | None = None) -> list[dict]:
        """Each caption's rewrite; ``options`` over the enhancer's generate options."""
        prompts = [self.prompt_ids(caption) for caption in batch]
        length = max(map(len, prompts))
        ids = np.full((len(prompts), length), self.pad_id, np.int64)
        mask = np.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, length - len(prompt):] = prompt
            mask[row, length - len(prompt):] = 1
        kwargs = {**self.generate_kwargs, **(options or {})}
        out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        new = out.sequences[:, length:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        answers = caption_answers(texts, new, kwargs["eos_token_id"], kwargs["max_new_tokens"],
                                  stopped_rows(out, kwargs))
        return [{**answer, "text": caption, ENHANCED_COLUMN: answer["text"]} for caption, answer in zip(batch, answers)]


def build_parser() -> argparse.ArgumentParser:
    p = common_parser(
        "Rewrite each row's caption with a text-only chat model (Qwen/Qwen3-*, Qwen/Qwen3-30B-A3B-*, "
        "Qwen/Qwen2.5-*-Instruct, meta-llama/Meta-Llama-3-*-Instruct, mistralai/Mistral-*-Instruct), e.g. into a "
        "richer caption for text-to-video training. Writes text (the caption read) and text_enhanced (its rewrite).",
        epilog=f"defaults come from {BASE_CONFIG.relative_to(CONFIG_DIR.parent)}; templates are in "
               f"{TEMPLATES_CONFIG.relative_to(CONFIG_DIR.parent)}\n"
               "example:\n  python -m pipeline.captioning.enhance_captions meta_caption.csv "
               "--pretrained_model_name_or_path /models/Qwen2.5-7B-Instruct --template t2v "
               "--output meta_enhanced.csv",
        model=False)
    p.add_argument("--pretrained_model_name_or_path", help="local folder of a chat checkpoint (config.json, "
                                                           "*.safetensors, tokenizer files with a chat template)")
    p.add_argument("--template", choices=sorted(load_yaml(TEMPLATES_CONFIG)),
                   help="the rewrite: expand (a detailed paragraph), concise (one short sentence), t2v (a "
                        "text-to-video prompt)")
    p.add_argument("--text_column", help="the input column holding the caption to rewrite")
    p.add_argument("--max_new_tokens", type=int, help="longest rewrite, in tokens")
    p.add_argument("--num_beams", type=int, help="beam search width (1: greedy)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="model weights and compute dtype (default: float32 on CPU, bfloat16 on Ascend)")
    add_tp_flag(p)
    add_decoding_flags(p)
    add_loop_flags(p)
    return p


def build_enhancer(args: argparse.Namespace, dtype: str) -> CaptionEnhancer:
    if args.window_seconds is not None:
        raise ConfigError("--window_seconds does not apply to caption enhancement (no video is read)")
    if not args.pretrained_model_name_or_path:
        raise FileNotFoundError("--pretrained_model_name_or_path is required: a local chat checkpoint folder")
    return CaptionEnhancer(args.pretrained_model_name_or_path, read_captions(args.input, args.text_column),
                           load_template(args.template), dtype, max_new_tokens=args.max_new_tokens,
                           num_beams=args.num_beams, generation=generation_options(args), column=args.text_column,
                           tp_size=args.tp_size, **loop_options(args))


def input_caption(args: argparse.Namespace) -> Callable[[dict[str, str]], str]:
    """An error row's text: the input caption of its row (``RunOptions.error_text``)."""
    captions = read_captions(args.input, args.text_column)
    return lambda cells: captions.get(row_key(cells), ("",))[0].strip()


def main(argv: Sequence[str] | None = None) -> RunSummary:
    return main_with(build_parser(), build_enhancer, argv, base_config=BASE_CONFIG, error_text=input_caption)


if __name__ == "__main__":
    main()
