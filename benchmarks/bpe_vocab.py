"""A byte-level BPE tokenizer of Qwen2's size, for the constrained-decoding benchmarks.

No real checkpoint's tokenizer can be downloaded here, so one is learnt: Qwen2's pre-tokenizer split, NFC and
byte-level decoding (as ``tests/test_enhance.py``'s ``byte_level_chat_tokenizer``), trained on this Python's
standard-library sources (the first ``CORPUS_BYTES`` of them, in sorted order) up to Qwen2's 151,643 merged
tokens, plus Qwen's three chat special tokens. A grammar engine's mask cost depends on the vocabulary's size
and shape (how many tokens share each prefix), which a learnt vocabulary of this size has. Training takes about
half a minute; the result is cached in the temporary folder.
"""
from __future__ import annotations

import sysconfig
import tempfile
from pathlib import Path

import transformers

BPE_TOKENS = 151_643  # Qwen2's byte-level BPE tokens
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CORPUS_BYTES = 60_000_000


def _corpus() -> list[str]:
    files, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            size += len(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        files.append(str(path))
        if size >= CORPUS_BYTES:
            break
    return files


def byte_level_bpe() -> transformers.PreTrainedTokenizerFast:
    """The learnt tokenizer, eos ``<|endoftext|>``, pad ``<|endoftext|>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    cached = Path(tempfile.gettempdir()) / f"mscaption_bench_bpe{BPE_TOKENS}.json"
    if cached.is_file():
        backend = Tokenizer.from_file(str(cached))
    else:
        backend = Tokenizer(models.BPE())
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=BPE_TOKENS + len(SPECIALS), special_tokens=list(SPECIALS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        backend.train(_corpus(), trainer)
        backend.save(str(cached))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=SPECIALS[0],
                                                pad_token=SPECIALS[0])
