"""A word-level tokenizer built from caption files, for captioners trained from scratch.

A small closed-vocabulary caption set (such as the synthetic dataset of the bundled demo)
needs no BPE: one id per lower-cased word or punctuation mark keeps the language model's
vocabulary, and so the whole model, tiny. The result is a transformers
``PreTrainedTokenizerFast`` folder, loaded like any published tokenizer.

    python -m pipeline.training.word_tokenizer data/synthetic/train.csv --output outputs/demo/tokenizer

The words of the training prompt (``--include``, default "a video of") are added too.

Ids: ``<pad>`` 0, ``<s>`` 1 (prepended to every encoded text, as OPT does), ``</s>`` 2,
``<unk>`` 3, ``<image>`` 4 (the image placeholder of ``image_token_index``), then the words,
most frequent first.
"""
from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional, Sequence

import pandas as pd
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_ID = range(len(SPECIALS))


def build_word_tokenizer(texts: Iterable[str], vocab_size: Optional[int] = None) -> PreTrainedTokenizerFast:
    """A tokenizer over every word of ``texts``; ``vocab_size``: fail if the words do not fit in it."""
    pre_tokenizer = pre_tokenizers.Whitespace()
    counts: Counter = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(str(text).lower()))
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        vocab.setdefault(word, len(vocab))
    if vocab_size is not None and len(vocab) > vocab_size:
        raise ValueError(f"the captions have {len(vocab) - len(SPECIALS)} distinct words: {len(vocab)} ids "
                         f"with the special tokens, more than the model's vocab_size {vocab_size}; "
                         "raise vocab_size in the model config")
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizer
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=["<image>"],
                                   model_input_names=["input_ids", "attention_mask"])


def caption_texts(paths: Sequence[str | Path], column: str = "text") -> list[str]:
    """Every caption in the ``column`` of the given CSV files."""
    texts: list[str] = []
    for path in paths:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        if column not in table.columns:
            raise ValueError(f"{path} has no '{column}' column (columns: {', '.join(table.columns)}); "
                             "pass --column")
        texts += [t for t in table[column] if t.strip()]
    return texts


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("captions", nargs="+", help="CSV files of captions")
    parser.add_argument("--column", default="text", help="caption column of the CSV files")
    parser.add_argument("--output", required=True, help="folder to write the tokenizer to")
    parser.add_argument("--include", nargs="*", default=["a video of"],
                        help="more texts whose words must be in the vocabulary (the training prompt)")
    parser.add_argument("--vocab_size", type=int, help="fail if the vocabulary needs more ids than this")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        tokenizer = build_word_tokenizer(caption_texts(args.captions, args.column) + args.include,
                                         args.vocab_size)
    except ValueError as exc:
        parser.error(str(exc))
    tokenizer.save_pretrained(args.output)
    print(f"wrote a {len(tokenizer)}-token word tokenizer to {args.output}")


if __name__ == "__main__":
    main()
