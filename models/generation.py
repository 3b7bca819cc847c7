"""One text-generation implementation (greedy, beam search, sampling) for every LM in models/.

A model plugs in by implementing this small protocol (all tensors batch-first):

- ``config``: its transformers config (``eos_token_id``, ``pad_token_id``, ``decoder_start_token_id``).
- ``is_encoder_decoder: bool``.
- ``encode(input_ids, inputs_embeds, attention_mask) -> tuple[Tensor, ...]`` (encoder-decoder only):
  the encoder state handed to ``init_cache``.
- ``init_cache(batch_size, max_length, *encoder_state) -> tuple[Tensor, ...]``: a preallocated,
  static-shape KV cache with ``max_length`` slots (plus any per-sequence state, e.g. cross-attention
  keys). Every tensor in it has the batch on axis 0, so beams are reordered by ``ops.gather`` on axis 0.
- ``decode_step(input_ids, inputs_embeds, attention_mask, cache_position, *cache) -> (logits, *cache)``:
  runs T new positions (``input_ids`` (B, T) or ``inputs_embeds`` (B, T, D), the other None) written
  to cache slots ``cache_position .. cache_position+T-1``; ``attention_mask`` (B, max_length) marks the
  filled slots including the new ones; returns float32 logits (B, V) of the last position and the cache.
  The prompt's step also gets ``generate``'s ``prompt_inputs`` after the cache (a model that takes them,
  such as Qwen3-VL's DeepStack features): they are not part of the cache, so beams never reorder them.

Because every shape is static, ``decode_step`` compiles once under ``ms.jit`` (once for the prompt
length and once for T=1) instead of once per generated token. Batch sizes, short prompt lengths
and cache lengths are rounded up to geometric buckets (:func:`bucket_length`, :func:`bucket_batch`:
filler rows whose mask is all zero, left padding), so a dataset of many prompt lengths compiles a
few graphs. Prompts longer than one attention block run op by op (no graph) and unpadded.
A multi-token ``decode_step`` is always a prompt written at slot 0 (see ``models.attention``).

Tokens are selected on the device, in a small compiled graph that runs on each step's logits
(``_Pick``, ``_best``; the model's own step graph stays the same): greedy decoding gets the argmax
ids back, beam search each row's best 2 x beams log-probs (plus running score) with their ids, with
min length's eos ban applied there too; ties go to the lower id exactly as a stable host sort. Only
rules that need the whole row on the host (repetition penalty, no-repeat n-grams, sampling) copy the
full (rows, V) logits every step, and the host then ranks with ``argpartition``, not a full sort.
A grammar (``grammar=``, ``models.constrained``) adds one input to that graph, each row's allowed tokens,
computed on the host while the model's step runs; the others get -inf before any of the above.

Return contract (same as transformers' ``generate``, 4.56 to 5.25):
- decoder-only with ``input_ids``: ``sequences`` = prompt ids + new tokens;
- decoder-only with ``inputs_embeds`` only: ``sequences`` = new tokens only;
- encoder-decoder: ``sequences`` = ``decoder_start_token_id`` + new tokens.
Finished sequences are padded with ``pad_token_id`` (greedy/sampling); beam search fills with
``pad_token_id`` or, when that is 0 or None, ``eos_token_id[0]`` (as transformers does).
"""
from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from models import attention, jit
from models.constrained import JsonGrammar, RowMatchers

_JIT_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------- model-side helpers


def to_tensor(x, dtype=None) -> Optional[Tensor]:
    """Accept numpy arrays, lists or Tensors (None passes through)."""
    if x is None:
        return None
    if not isinstance(x, Tensor):
        x = Tensor(np.asarray(x))
    return x if dtype is None or x.dtype == dtype else x.astype(dtype)


def slot_ids(cache_position, length: int) -> Tensor:
    """Cache slots written by ``length`` new positions starting at ``cache_position``."""
    return ops.arange(length).astype(ms.int32) + cache_position


def causal_lm_loss(logits: Tensor, labels: Tensor, shift: bool) -> Tensor:
    """Mean token cross-entropy ignoring label -100 (``shift``: predict token t+1 from t, as causal LMs)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    labels = labels.astype(ms.int32)
    valid = labels != -100
    logp = ops.log_softmax(logits.astype(ms.float32), axis=-1)
    safe = ops.where(valid, labels, ops.zeros_like(labels))
    picked = ops.gather_elements(logp, -1, safe[..., None])[..., 0]
    valid = valid.astype(ms.float32)
    return -(picked * valid).sum() / ops.maximum(valid.sum(), ops.ones_like(valid.sum()))


# ----------------------------------------------------------------------------- shape buckets

LENGTH_FLOOR = 32  # shortest prompt bucket
GROWTH = 1.25  # each bucket at most this much longer than the one before


def _next_bucket(size: int, step: int) -> int:
    return max(size + step, int(size * GROWTH) // step * step)


def bucket_length(length: int) -> int:
    """The prompt length ``length`` is padded to: 32, 40, 48, 56, 64, 80, 96, ... each at most 1.25x
    the last (multiples of 8), so prompts of 1k to 32k tokens share 16 lengths."""
    size = LENGTH_FLOOR
    while size < length:
        size = _next_bucket(size, 8)
    return size


def bucket_batch(batch: int) -> int:
    """The batch size ``batch`` is padded to: 1, 2, ..., 8, 10, 12, 15, 18, 22, ..."""
    size = 1
    while size < batch:
        size = _next_bucket(size, 1)
    return size


def pad_to_buckets(ids: Optional[np.ndarray], mask: np.ndarray, pad_id: int) -> tuple[Optional[np.ndarray], np.ndarray]:
    """Add filler rows (mask all zero) up to the batch bucket and, for a prompt short enough to run
    compiled, left-pad it to the length bucket. Longer prompts run op by op, so padding would only
    cost work; their cache length is bucketed instead (see ``_start``)."""
    batch, length = mask.shape
    cols = bucket_length(length) - length if length <= attention.block_size() else 0
    rows = bucket_batch(batch) - batch
    mask = np.pad(mask, ((0, rows), (cols, 0)))
    if ids is not None:
        ids = np.pad(ids, ((0, rows), (cols, 0)), constant_values=pad_id)
    return ids, mask


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts left-padded to one width, with their attention mask (0 on the padding)."""
    width = max(len(p) for p in prompts)
    ids = np.array([[pad_id] * (width - len(p)) + list(p) for p in prompts], np.int64)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], np.int64)
    return ids, mask


def _pad_embeds(embeds, batch: int, length: int):
    """Zero embeddings to the left and below, to (batch, length, D)."""
    embeds = to_tensor(embeds)
    b, t, d = embeds.shape
    if t < length:
        embeds = ops.concat((ops.zeros((b, length - t, d), embeds.dtype), embeds), axis=1)
    if b < batch:
        embeds = ops.concat((embeds, ops.zeros((batch - b, length, d), embeds.dtype)), axis=0)
    return embeds


# ----------------------------------------------------------------------------- generation loop


@dataclass
class GenerateOutput:
    """``sequences`` (N, S) int64 (see the module docstring for what they start with);
    ``sequences_scores`` (N,) length-normalised beam log-probs for beam search, else None;
    ``stopped_repeating`` (N,) bool: rows ``stop_repetition`` ended in a loop (all False without it)."""

    sequences: np.ndarray
    sequences_scores: Optional[np.ndarray] = None
    stopped_repeating: Optional[np.ndarray] = None

    def first_rows(self, count: int) -> GenerateOutput:
        """The first ``count`` rows of every per-row field (a bucket's filler rows cut off)."""
        self.sequences = self.sequences[:count]
        if self.sequences_scores is not None:
            self.sequences_scores = self.sequences_scores[:count]
        if self.stopped_repeating is not None:
            self.stopped_repeating = self.stopped_repeating[:count]
        return self


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class LoopStop:
    """When a row is in a repetition loop, so that generation ends it (``generate(stop_repetition=...)``).

    The rule is the caption clean-up's (``pipeline.datasets.caption_text``: ``min_repeats`` or more copies in a
    row of a unit of up to ``max_unit_words`` words, covering ``min_words`` or more words, a unit holding a
    letter or digit), checked on token ids as they come: the new tokens end in ``C`` copies of a period of
    ``p <= max_period`` tokens holding ``k`` word starts, and ``C - 1`` copies would already be cut
    (``C - 1 >= max(min_repeats, ceil(min_words / k))``; one copy is set aside because the run may start and
    end inside a word). Equal tokens decode to equal text, so every stop is a loop the clean-up cuts too;
    loops it finds that are not periodic in tokens (a sentence said three times apart) are left to it.

    ``word_start`` / ``has_word`` ((V,) bool, :meth:`for_tokenizer`): the tokens that begin a word (a space
    before a non-space) and that hold a letter or digit. Without them every token counts as a word, which
    suits ids without a tokenizer (tests, benchmarks) but may stop a run of tokens that is one long word.
    """

    min_repeats: int = 3
    min_words: int = 6
    max_unit_words: int = 50
    max_period: int = 128
    word_start: Optional[np.ndarray] = None
    has_word: Optional[np.ndarray] = None

    @classmethod
    def for_tokenizer(cls, tokenizer, **thresholds) -> LoopStop:
        """Word starts and wordy tokens from each token's text as decoded after another token ("a"), so a
        leading space a lone token's decoding would strip (SentencePiece) is kept; special tokens decode
        to nothing, as captions are decoded."""
        vocab = len(tokenizer)
        lead = tokenizer.encode("a", add_special_tokens=False)[-1:]
        width = len(tokenizer.decode(lead, skip_special_tokens=True))
        texts = [t[width:] for t in tokenizer.batch_decode([lead + [i] for i in range(vocab)],
                                                             skip_special_tokens=True)]
        word_start = np.array([bool(_WORD_START.search(t)) for t in texts])
        has_word = np.array([bool(_WORDY.search(t)) for t in texts])
        return cls(**thresholds, word_start=word_start, has_word=has_word)


_WORD_START = re.compile(r"\s\S")
_WORDY = re.compile(r"[^\W_]")


def _flags(table: Optional[np.ndarray], tokens: np.ndarray) -> np.ndarray:
    """``table[tokens]``, False for ids past the table (a model's vocabulary may be padded beyond its
    tokenizer's), True for every id without a table."""
    if table is None:
        return np.ones(len(tokens), bool)
    inside = tokens < len(table)
    return inside & table[np.where(inside, tokens, 0)]


class _LoopWatch:
    """Each row's trailing periodic run, per period, updated per new token in O(rows x max_period).

    ``runs[:, p - 1]``: how many of the newest tokens equal the token ``p`` before them (both new tokens);
    the run of period ``p`` then spans ``runs + p`` tokens. Counts of word starts and wordy tokens are kept
    cumulative, so a period's counts are one subtraction."""

    def __init__(self, stop: LoopStop, rows: int, max_new_tokens: int):
        self.stop = stop
        self.periods = np.arange(1, stop.max_period + 1)
        self.tokens = np.zeros((rows, max_new_tokens), np.int64)
        self.runs = np.zeros((rows, stop.max_period), np.int64)
        self.starts = np.zeros((rows, max_new_tokens + 1), np.int64)
        self.wordy = np.zeros((rows, max_new_tokens + 1), np.int64)
        self.count = 0

    def push(self, tokens: np.ndarray) -> np.ndarray:
        """Add one step's tokens; which rows now end in a loop."""
        stop, n = self.stop, self.count
        self.tokens[:, n] = tokens
        back = n - self.periods
        same = (self.tokens[:, np.maximum(back, 0)] == tokens[:, None]) & (back >= 0)
        self.runs = np.where(same, self.runs + 1, 0)
        self.starts[:, n + 1] = self.starts[:, n] + _flags(stop.word_start, tokens)
        self.wordy[:, n + 1] = self.wordy[:, n] + _flags(stop.has_word, tokens)
        self.count = n + 1
        first = np.maximum(self.count - self.periods, 0)
        words = self.starts[:, self.count, None] - self.starts[:, first]  # word starts per period
        wordy = self.wordy[:, self.count, None] - self.wordy[:, first]
        copies = (self.runs + self.periods) // self.periods
        need = np.maximum(stop.min_repeats, -(-stop.min_words // np.maximum(words, 1)))
        looping = (words >= 1) & (words <= stop.max_unit_words) & (wordy >= 1) & (copies - 1 >= need)
        return looping.any(axis=1)


def _jitted(model, name: str):
    """``ms.jit`` of a model method, built once per model so compiled graphs are reused."""
    fns = _JIT_FNS.setdefault(model, {})
    if name not in fns:
        fns[name] = ms.jit(getattr(model, name))
    return fns[name]


def _gather_rows(index: Tensor, *cache: Tensor) -> tuple:
    """Select batch rows of every cache tensor (beam reordering)."""
    return tuple(ops.gather(c, index, 0) for c in cache)


_gather_rows_jit = ms.jit(_gather_rows)


GROUP = 128  # columns per group in the two-stage top-k of ``_best``

_TOPK = ops.TopK(sorted=True)


@dataclass(frozen=True)
class _Pick:
    """What a decoding step hands the host, so that only a few numbers per row leave the device.

    ``k`` 0: the full (rows, V) logits, for rules only the host applies (no-repeat n-grams, sampling).
    Otherwise the ``k`` best entries per row in (value desc, id asc) order, as
    ``np.argsort(-x, kind="stable")`` ranks them: of the logits (``log_probs`` False: greedy, k 1) or of
    the log-softmax plus the beam's running score (beam search), after the repetition ``penalty`` on the
    tokens each row has seen, with eos banned on the steps the caller says (min length). The ``k``
    entries come back as (values, ids), not sorted among themselves, then, with a penalty, the (rows, V)
    seen-token mask the next step starts from.
    """

    k: int = 0
    log_probs: bool = False
    penalty: float = 1.0


def _keyed_top(x: Tensor, k: int, ids: Tensor, span: int) -> Tensor:
    """Positions of the ``k`` entries per row that come first in (value desc, id asc) order.

    TopK's order among equal values is unspecified (MindSpore's CPU kernel returns ties in no fixed order),
    so a second TopK runs on keys that are all distinct: entries above the k-th value, then the entries
    equal to it, each lower id first (``ids``: distinct float ids below ``span``, exact up to 2**24)."""
    kth = _TOPK(x, k)[0][:, k - 1:k]
    key = ops.where(x > kth, 2.0 * span - ids, ops.where(x == kth, span - ids, -1.0 - ids))
    return _TOPK(key, k)[1]


def _banned(x: Tensor, ids: Tensor, eos: Optional[Tensor], ban: Optional[Tensor]) -> Tensor:
    """``x`` with the eos columns at -inf when ``ban`` is true (min length); ``ids``: each entry's column."""
    if eos is None:
        return x
    hit = (ids[..., None] == eos).any(-1)
    return ops.where(ops.logical_and(hit, ban), ops.full(x.shape, float("-inf"), dtype=x.dtype), x)


def _best(x: Tensor, k: int, eos: Optional[Tensor], ban: Optional[Tensor],
          shift: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The ``k`` best entries per row of ``where(eos banned, -inf, x) + shift`` as (values, ids).

    A full TopK over a 152k-column row is slow on CPU (about 90 ms for 40 rows, whatever k), so the
    row is cut into groups of ``GROUP`` columns: the k best entries lie in the k groups with the best
    maxima (ties to the lower group), plus one group per eos id, whose maximum may be a banned entry.
    Only those groups' columns are ranked exactly. Adding ``shift`` is monotone, so it is applied to
    the group maxima and the candidates only, as is the ban."""
    n, v = x.shape
    k = min(k, v)
    if eos is not None:
        eos = ops.where(eos < 0, eos + v, eos)
    extra = 0 if eos is None else eos.shape[0]
    groups = (v + GROUP - 1) // GROUP
    if groups <= k + extra:
        ids = ops.arange(v).astype(ms.int32)
        x = _banned(x, ids, eos, ban)
        if shift is not None:
            x = x + shift[:, None]
        pos = _keyed_top(x, k, ids.astype(ms.float32), v)
        return ops.gather_elements(x, 1, pos), pos
    if groups * GROUP > v:
        x = ops.concat((x, ops.full((n, groups * GROUP - v), float("-inf"), dtype=x.dtype)), axis=1)
    blocks = x.reshape(n, groups, GROUP)
    maxima = blocks.max(axis=-1)
    if shift is not None:
        maxima = maxima + shift[:, None]
    top = _keyed_top(maxima, k + extra, ops.arange(groups).astype(ms.float32), groups)
    cand = ops.gather_elements(blocks, 1, ops.broadcast_to(top[:, :, None], (n, k + extra, GROUP)))
    cand = cand.reshape(n, (k + extra) * GROUP)
    ids = (top[:, :, None] * GROUP + ops.arange(GROUP).astype(ms.int32)).reshape(n, (k + extra) * GROUP)
    cand = _banned(cand, ids, eos, ban)
    if shift is not None:
        cand = cand + shift[:, None]
    pos = _keyed_top(cand, k, ids.astype(ms.float32), groups * GROUP)
    return ops.gather_elements(cand, 1, pos), ops.gather_elements(ids, 1, pos)


def _select(pick: _Pick, logits: Tensor, eos: Optional[Tensor], ban: Optional[Tensor], shift: Optional[Tensor],
            rows: Optional[Tensor], allowed: Optional[Tensor] = None, seen: Optional[Tensor] = None,
            tokens: Optional[Tensor] = None) -> tuple:
    """What ``pick`` asks of one step's logits; ``rows`` repeats rows first (a prompt's row per beam).

    ``allowed`` (rows, V) bool: the tokens a grammar lets each row take (``models.constrained``); every other
    logit becomes -inf before anything else, so greedy, beam top-k and sampling pick only allowed tokens (and
    beams' log-probs are normalised over them). ``seen`` (rows, V) bool marks the tokens of each row so far,
    ``tokens`` (rows,) the ones this step added: they are penalised as transformers' repetition penalty does
    (a positive score divided by the penalty, a negative one multiplied), and the updated mask is returned last."""
    if rows is not None:
        logits = ops.gather(logits, rows, 0)
    if allowed is not None:
        logits = ops.where(allowed, logits, ops.full(logits.shape, float("-inf"), dtype=logits.dtype))
    if not pick.k:
        return (logits,)
    if pick.log_probs:
        logits = ops.log_softmax(logits, -1)
    if seen is None:
        return _best(logits, pick.k, eos, ban, shift)
    if tokens is not None:
        seen = ops.logical_or(seen, ops.arange(logits.shape[1]).astype(ms.int32)[None, :] == tokens[:, None])
    logits = ops.where(seen, ops.where(logits < 0, logits * pick.penalty, logits / pick.penalty), logits)
    return _best(logits, pick.k, eos, ban, shift) + (seen,)


_select_jit = ms.jit(_select)


class _Session:
    """Drives one model's cache: prefill, one-token steps and beam reordering.

    Each step returns what ``pick`` asks for, as numpy arrays (see ``_Pick``); ``eos`` are the columns a
    step bans when asked to (min length); ``matchers`` (``models.constrained.RowMatchers``, one per selection
    row) give each step's allowed tokens, computed on the host while the model's step runs."""

    def __init__(self, model, max_slots: int, use_jit: bool, pick: _Pick = _Pick(), eos: Sequence[int] = (),
                 matchers: Optional[RowMatchers] = None):
        self.model = model
        self.use_jit = use_jit
        self.pick = pick
        self.matchers = matchers
        attention.refresh_device()
        self.step_fn = _jitted(model, "decode_step") if use_jit else model.decode_step
        # The selection is its own small graph on the step's device logits (one per row count and pick).
        # It is not counted in models.jit.COMPILES, which counts the model's graphs.
        self.select_fn = _select_jit if use_jit else _select
        self.encode_fn = _jitted(model, "encode") if use_jit and model.is_encoder_decoder else getattr(
            model, "encode", None)
        self.gather_fn = _gather_rows_jit if use_jit else _gather_rows
        self.eos = Tensor(np.asarray(eos, np.int32)) if eos and pick.k else None
        self.max_slots = max_slots
        self.cache: tuple = ()
        self.mask: Optional[np.ndarray] = None
        self.next_slot = 0
        self.seen: Optional[Tensor] = None  # the repetition penalty's (rows, V) mask, kept on the device
        self.seen_ids: Optional[np.ndarray] = None

    def prefill(self, ids, embeds, mask: np.ndarray, encoder_state: tuple = (), ban: bool = False,
                shift: Optional[np.ndarray] = None, rows: Optional[np.ndarray] = None,
                seen_ids: Optional[np.ndarray] = None, prompt_inputs: tuple = ()) -> tuple:
        """Run the prompt; ``rows``/``shift``: the selection's rows (repeated per beam) and running scores;
        ``seen_ids``: each selection row's tokens so far, for an on-device repetition penalty;
        ``prompt_inputs``: what this step alone takes after the cache (see the module docstring)."""
        batch, length = mask.shape
        self.cache = tuple(self.model.init_cache(batch, self.max_slots, *encoder_state))
        self.mask = np.zeros((batch, self.max_slots), np.int32)
        self.mask[:, :length] = mask
        self.seen_ids = seen_ids
        return self._run(ids, embeds, length, ban, shift, rows, prompt_inputs=prompt_inputs)

    def step(self, tokens: np.ndarray, ban: bool = False, shift: Optional[np.ndarray] = None) -> tuple:
        self.mask[:, self.next_slot] = 1
        ids = Tensor(tokens.astype(np.int32)[:, None])
        return self._run(ids, None, 1, ban, shift, None, ids[:, 0])

    def call(self, name: str, fn, *args):
        """Run ``fn``, counting each new compiled shape in ``models.jit.COMPILES``."""
        return jit.call(name, fn, *args) if self.use_jit else fn(*args)

    def encode(self, ids, embeds, mask: np.ndarray) -> tuple:
        return tuple(self.call("encode", self.encode_fn, ids, embeds, Tensor(mask)))

    def reorder(self, index: np.ndarray, expand: bool = False) -> None:
        """Reorder the cache rows (beam search); ``expand``: the prompt's rows become one per beam, which the
        selection's seen-token mask already is."""
        carried = self.cache if self.seen is None or expand else self.cache + (self.seen,)
        out = tuple(self.call("reorder", self.gather_fn, Tensor(index.astype(np.int32)), *carried))
        self.cache = out[:len(self.cache)]
        if len(out) > len(self.cache):
            self.seen = out[-1]
        self.mask = self.mask[index]

    def _seen(self, rows: int, vocab: int) -> Tensor:
        """The seen-token mask, built on the host once, from the prompt's rows."""
        if self.seen is None:
            seen = np.zeros((rows, vocab), np.bool_)
            np.put_along_axis(seen, self.seen_ids.astype(np.int64), True, 1)
            self.seen = Tensor(seen)
        return self.seen

    def _run(self, ids, embeds, length: int, ban: bool, shift: Optional[np.ndarray],
             rows: Optional[np.ndarray], tokens: Optional[Tensor] = None, prompt_inputs: tuple = ()) -> tuple:
        args = (ids, embeds, Tensor(self.mask), Tensor(self.next_slot, ms.int32))
        selection = (self.eos, Tensor(ban) if self.eos is not None else None,
                     None if shift is None else Tensor(shift.astype(np.float32)),
                     None if rows is None else Tensor(rows.astype(np.int32)))
        if length > attention.block_size() or (length > 1 and not getattr(self.model, "compile_prompt", True)):
            # A long prompt runs op by op: its ops are large, so a graph buys little, and MindSpore's CPU
            # graphs keep every attention tile of an unrolled loop alive (memory quadratic in the prompt).
            # A model can ask for it for every prompt (``compile_prompt = False``: an MoE model's prompt
            # groups tokens by expert on the host).
            out = self.model.decode_step(*args, *self.cache, *prompt_inputs)
        else:
            out = self.call("decode_step", self.step_fn, *args, *self.cache, *prompt_inputs)
        self.cache = tuple(out[1:])
        self.next_slot += length
        allowed = None if self.matchers is None else Tensor(self.matchers.allowed(out[0].shape[1]))
        selection += (allowed,)
        if not self.pick.k and rows is None and allowed is None:
            return (out[0].asnumpy(),)
        if self.pick.penalty == 1.0:
            return tuple(o.asnumpy() for o in self.select_fn(self.pick, out[0], *selection))
        count = out[0].shape[0] if rows is None else len(rows)
        picked = self.select_fn(self.pick, out[0], *selection, self._seen(count, out[0].shape[1]), tokens)
        self.seen = picked[-1]
        return tuple(o.asnumpy() for o in picked[:-1])


def to_numpy(x, dtype=None) -> Optional[np.ndarray]:
    """Accept Tensors, numpy arrays or lists (None passes through)."""
    if x is None:
        return None
    return np.asarray(x.asnumpy() if isinstance(x, Tensor) else x, dtype)


def _as_list(ids) -> list:
    if ids is None:
        return []
    return [int(i) for i in ids] if isinstance(ids, (list, tuple, np.ndarray)) else [int(ids)]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _warp_for_sampling(scores: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """transformers' temperature -> top-k -> top-p warpers (filtered entries become -inf)."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        k = min(max(top_k, 1), scores.shape[-1])
        kth = -np.partition(-scores, k - 1, axis=-1)[:, k - 1:k]
        scores = np.where(scores < kth, -np.inf, scores)
    if top_p < 1.0:
        order = np.argsort(scores, axis=-1, kind="stable")
        sorted_scores = np.take_along_axis(scores, order, -1)
        probs = np.exp(_log_softmax(sorted_scores.astype(np.float64)))
        remove_sorted = np.cumsum(probs, axis=-1) <= 1.0 - top_p
        remove_sorted[:, -1] = False
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, -1)
        scores = np.where(remove, -np.inf, scores)
    return scores


def _penalise_repeats(scores: np.ndarray, seqs: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' repetition penalty: every token already in the row is made less likely
    (a positive score divided by ``penalty``, a negative one multiplied)."""
    if penalty == 1.0 or seqs.shape[1] == 0:
        return scores
    seen = np.take_along_axis(scores, seqs, 1)
    out = scores.copy()
    np.put_along_axis(out, seqs, np.where(seen < 0, seen * penalty, seen / penalty), 1)
    return out


def _ban_repeated_ngrams(scores: np.ndarray, seqs: np.ndarray, size: int) -> np.ndarray:
    """transformers' no-repeat n-gram rule: a token that would complete an n-gram already in the row is banned."""
    length = seqs.shape[1]
    if size <= 0 or length + 1 < size:
        return scores
    out = scores.copy()
    for row, seq in enumerate(seqs.tolist()):
        tail = seq[length - size + 1:] if size > 1 else []
        banned = [seq[i + size - 1] for i in range(length - size + 1) if seq[i:i + size - 1] == tail]
        out[row, banned] = -np.inf
    return out


@dataclass(frozen=True)
class _Rules:
    """The logits processors, in transformers' order: repetition penalty, no-repeat n-grams, min length.

    ``skip`` leading columns of every sequence are bucket padding, which transformers never saw.
    """

    eos: list
    prompt_len: int
    min_new_tokens: int
    repetition_penalty: float
    no_repeat_ngram_size: int
    skip: int

    def on_device(self, beams: bool) -> bool:
        """Whether the decoding step applies these rules itself: min length always, the repetition penalty in
        beam search only. In greedy decoding the host's penalty and argmax over copied logits cost about
        3 ms a step at bs 8 x 152k, the device's penalty (MindSpore's elementwise kernels) about 20 ms."""
        return self.no_repeat_ngram_size <= 0 and (beams or self.repetition_penalty == 1.0)

    def bans_eos(self, length: int) -> bool:
        """Whether eos is banned for the token after a sequence of ``length`` columns."""
        return bool(self.eos) and length - self.prompt_len < self.min_new_tokens

    def apply(self, scores: np.ndarray, seqs: np.ndarray) -> np.ndarray:
        real = seqs[:, self.skip:]
        scores = _penalise_repeats(scores, real, self.repetition_penalty)
        scores = _ban_repeated_ngrams(scores, real, self.no_repeat_ngram_size)
        if self.bans_eos(seqs.shape[1]):
            scores = scores.copy()
            scores[:, self.eos] = -np.inf
        return scores


def check_generation_args(num_beams: int = 1, max_new_tokens: Optional[int] = None, min_new_tokens: int = 0,
                          do_sample: bool = False, temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0,
                          repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0) -> None:
    """Refuse settings no generation can satisfy, naming the argument (callers check before loading a model)."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be at least 1, got {num_beams}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if min_new_tokens < 0 or (max_new_tokens is not None and min_new_tokens > max_new_tokens):
        raise ValueError(f"min_new_tokens must be between 0 and max_new_tokens ({max_new_tokens}), "
                         f"got {min_new_tokens}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be positive when sampling, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be 0 (off) or more, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be positive (1.0: off), got {repetition_penalty}")
    if no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be 0 (off) or more, got {no_repeat_ngram_size}")


def generate(model, input_ids=None, inputs_embeds=None, attention_mask=None, *,
             max_new_tokens: Optional[int] = None, max_length: Optional[int] = None,
             min_new_tokens: int = 0, min_length: int = 0,
             num_beams: int = 1, num_return_sequences: int = 1, length_penalty: float = 1.0,
             early_stopping: Union[bool, str] = False,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0,
             repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
             seed: Union[int, np.random.Generator, None] = None,
             eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
             decoder_start_token_id: Optional[int] = None, use_jit: bool = True,
             select_on_device: bool = True,
             streamer: Optional[Callable[[np.ndarray], None]] = None,
             prompt_inputs: Sequence[Tensor] = (), grammar: Optional[JsonGrammar] = None,
             stop_repetition: Optional[LoopStop] = None) -> GenerateOutput:
    """Generate token ids with transformers' semantics (see the module docstring for the contract).

    ``max_length``/``min_length`` count the returned sequence (prompt ids or the decoder start token
    included), ``max_new_tokens``/``min_new_tokens`` only new tokens; transformers' default is
    ``max_length=20``. ``seed`` is an int or a ``numpy.random.Generator`` for sampling.
    ``repetition_penalty`` and ``no_repeat_ngram_size`` apply to the prompt ids and the new tokens
    (the decoder's tokens for an encoder-decoder), in greedy, beam and sampling, as transformers does.
    ``select_on_device``: greedy and beam search pick their tokens inside the compiled step (beam search
    with its repetition penalty), so only the ids (and, for beams, the best log-probs) leave the device;
    False, or a rule the host applies (no-repeat n-grams, sampling, greedy's repetition penalty), copies
    the full logits every step.
    ``streamer``: called after every step of greedy decoding or sampling with that step's (N,) new ids
    of the N returned rows, -1 for a row that had already ended (a server streams replies with it).
    ``prompt_inputs``: (B, T, ·) tensors aligned with the prompt (decoder-only), which only the prompt's
    ``decode_step`` gets, after the cache; they are padded and repeated as ``inputs_embeds`` are.
    ``grammar`` (``models.constrained.JsonGrammar``): every row (each beam, each sample) takes only tokens that
    keep its text a prefix of a JSON document the grammar's schema accepts, and ends (an eos token) only when
    that document is complete, so min length does not apply; a row that reaches ``max_new_tokens`` first is
    cut JSON (``models.constrained.is_complete`` tells).
    ``stop_repetition`` (:class:`LoopStop`): greedy decoding and sampling end a row once it is in a repetition
    loop, as if it had emitted eos (padding follows, no eos token), and ``stopped_repeating`` marks it; the
    tokens before are those the row would have generated without it. Beam search does not stop beams (a
    beam's loop is ranked by its score, and the caller's clean-up cuts it); its rows are never marked.
    """
    check_generation_args(num_beams, max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p,
                          repetition_penalty, no_repeat_ngram_size)
    if grammar is not None:
        min_new_tokens = min_length = 0  # the grammar alone decides where a row may end
    cfg = model.config
    eos = _as_list(eos_token_id if eos_token_id is not None else getattr(cfg, "eos_token_id", None))
    pad = pad_token_id if pad_token_id is not None else getattr(cfg, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    input_ids = to_numpy(input_ids, np.int64)
    batch, length = input_ids.shape if inputs_embeds is None else inputs_embeds.shape[:2]
    attention_mask = np.ones((batch, length), np.int32) if attention_mask is None else to_numpy(
        attention_mask, np.int32)
    if model.is_encoder_decoder:
        start = decoder_start_token_id if decoder_start_token_id is not None else cfg.decoder_start_token_id
        prefix = np.full((batch, 1), start, np.int64)
    else:
        prefix = input_ids if input_ids is not None else np.zeros((batch, 0), np.int64)
    if max_new_tokens is None:
        max_new_tokens = (max_length if max_length is not None else 20) - prefix.shape[1]
    if max_new_tokens < 1:
        raise ValueError("nothing to generate: max_new_tokens (or max_length - prompt length) must be >= 1")
    if num_beams > 1 and num_return_sequences > num_beams:
        raise ValueError("num_return_sequences must be <= num_beams")
    if num_beams > 1 and do_sample:
        raise ValueError("beam sampling is not supported; use num_beams=1 with do_sample or do_sample=False")
    if num_beams > 1 and streamer is not None:
        raise ValueError("a streamer needs num_beams=1: beam search settles its tokens only at the end")

    expand = num_return_sequences if num_beams == 1 else 1
    if num_beams == 1 and num_return_sequences > 1 and not do_sample:
        raise ValueError("greedy search returns one sequence per input; use do_sample or num_beams")
    if expand > 1:
        prefix = np.repeat(prefix, expand, axis=0)
        input_ids = None if input_ids is None else np.repeat(input_ids, expand, axis=0)
        rows = Tensor(np.repeat(np.arange(batch), expand).astype(np.int32))
        inputs_embeds = None if inputs_embeds is None else ops.gather(to_tensor(inputs_embeds), rows, 0)
        prompt_inputs = tuple(ops.gather(to_tensor(x), rows, 0) for x in prompt_inputs)
        attention_mask = np.repeat(attention_mask, expand, axis=0)

    min_new_tokens = max(min_new_tokens, min_length - prefix.shape[1])  # padding below must not count
    prefix_is_prompt = input_ids is not None and not model.is_encoder_decoder
    real_rows, real_cols = prefix.shape[0], attention_mask.shape[1]
    emit = None if streamer is None else (lambda tokens: streamer(tokens[:real_rows]))
    input_ids, attention_mask = pad_to_buckets(input_ids, attention_mask, pad)
    rows, cols = attention_mask.shape[0] - real_rows, attention_mask.shape[1] - real_cols
    if rows or cols:
        inputs_embeds = None if inputs_embeds is None else _pad_embeds(inputs_embeds, *attention_mask.shape)
        prompt_inputs = tuple(_pad_embeds(x, *attention_mask.shape) for x in prompt_inputs)
    prefix = input_ids if prefix_is_prompt else np.pad(prefix, ((0, rows), (0, 0)), constant_values=pad)
    live = attention_mask.any(axis=1)
    drop = cols if prefix_is_prompt else 0
    rules = _Rules(eos, prefix.shape[1], min_new_tokens, repetition_penalty, no_repeat_ngram_size, drop)
    try:
        out = _generate_padded(model, input_ids, inputs_embeds, attention_mask, prefix, live, max_new_tokens,
                               rules, num_beams, num_return_sequences, length_penalty,
                               early_stopping, do_sample, temperature, top_k, top_p, seed, eos, pad, use_jit,
                               select_on_device, emit, tuple(prompt_inputs), grammar, stop_repetition)
    except RuntimeError:  # how MindSpore reports a failed run, whose graph would fail every later call
        jit.discard_graphs()
        raise
    per_row = num_return_sequences if num_beams > 1 else 1
    out.first_rows(real_rows * per_row).sequences = out.sequences[:, drop:]
    return out


def _generate_padded(model, input_ids, inputs_embeds, attention_mask, prefix, live, max_new_tokens,
                     rules: _Rules, num_beams, num_return_sequences, length_penalty,
                     early_stopping, do_sample, temperature, top_k, top_p, seed, eos, pad,
                     use_jit, select_on_device, emit=None, prompt_inputs: tuple = (),
                     grammar: Optional[JsonGrammar] = None, stop_repetition: Optional[LoopStop] = None
                     ) -> GenerateOutput:
    """The search loops over a bucket-shaped batch; rows not ``live`` are fillers, finished from the start."""
    on_device = select_on_device and rules.on_device(num_beams > 1) and not do_sample
    if num_beams > 1:
        keep = max(2, 1 + len(eos)) * num_beams
        pick = _Pick(keep, log_probs=True, penalty=rules.repetition_penalty) if on_device else _Pick()
        matchers = None if grammar is None else grammar.matchers(np.repeat(live, num_beams), eos)
        return _beam_search(model, input_ids, inputs_embeds, attention_mask, prefix, live, max_new_tokens,
                            num_beams, num_return_sequences, length_penalty, early_stopping, eos, pad, rules,
                            keep, use_jit, pick, prompt_inputs, matchers)
    pick = _Pick(1) if on_device else _Pick()
    matchers = None if grammar is None else grammar.matchers(live, eos)
    session = _Session(model, _cache_length(model, attention_mask, max_new_tokens), use_jit, pick, eos, matchers)
    picked = _start(session, input_ids, inputs_embeds, attention_mask, prefix, rules.bans_eos(prefix.shape[1]),
                    seen_ids=prefix[:, rules.skip:], prompt_inputs=prompt_inputs)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    seqs, finished = prefix, ~live
    watch = None if stop_repetition is None else _LoopWatch(stop_repetition, len(live), max_new_tokens)
    stopped = np.zeros(len(live), bool)
    for t in range(max_new_tokens):
        if pick.k:
            tokens = picked[1][:, 0]
        else:
            scores = rules.apply(picked[0].astype(np.float32), seqs)
            if do_sample:
                probs = np.exp(_log_softmax(_warp_for_sampling(scores, temperature, top_k, top_p).astype(np.float64)))
                # the first token whose running total passes u * total: never one of probability 0 (a
                # grammar's -inf), as a token at the threshold itself could be
                cumulative = np.cumsum(probs, axis=-1)
                u = rng.random((probs.shape[0], 1))
                tokens = np.minimum((cumulative <= u * cumulative[:, -1:]).sum(-1), probs.shape[-1] - 1)
            else:
                tokens = scores.argmax(axis=-1)
        if emit is not None:
            emit(np.where(finished, -1, tokens).astype(np.int64))
        tokens = np.where(finished, pad, tokens)
        seqs = np.concatenate([seqs, tokens[:, None]], axis=1)
        finished |= np.isin(tokens, eos)
        if watch is not None:
            stopped |= watch.push(tokens) & ~finished
            finished |= stopped
        if finished.all() or t == max_new_tokens - 1:
            break
        if matchers is not None:
            matchers.advance(tokens, ~finished)
        picked = session.step(tokens, rules.bans_eos(seqs.shape[1]))
    return GenerateOutput(seqs.astype(np.int64), stopped_repeating=stopped)


def _cache_length(model, attention_mask: np.ndarray, max_new_tokens: int) -> int:
    """Cache slots: the decoder's start token or the prompt (a bucketed length bounds the step's graphs)."""
    if model.is_encoder_decoder:
        return 1 + max_new_tokens
    return bucket_length(attention_mask.shape[1]) + max_new_tokens


def _start(session: _Session, input_ids, inputs_embeds, attention_mask, prefix, ban: bool,
           shift: Optional[np.ndarray] = None, rows: Optional[np.ndarray] = None,
           seen_ids: Optional[np.ndarray] = None, prompt_inputs: tuple = ()) -> tuple:
    """Run the prompt (decoder-only) or the encoder and the start token; returns the first selection."""
    ids = None if inputs_embeds is not None else Tensor(input_ids.astype(np.int32))
    embeds = to_tensor(inputs_embeds)
    if not session.model.is_encoder_decoder:
        return session.prefill(ids, embeds, attention_mask, ban=ban, shift=shift, rows=rows, seen_ids=seen_ids,
                               prompt_inputs=prompt_inputs)
    state = session.encode(ids, embeds, attention_mask)
    start_mask = np.ones((prefix.shape[0], 1), np.int32)
    return session.prefill(Tensor(prefix.astype(np.int32)), None, start_mask, tuple(state), ban, shift, rows,
                           seen_ids)


def _take(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """x[b, idx[b, k], ...] for (B, N, ...) x and (B, K) idx."""
    return np.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    """``np.argsort(-x, axis=-1, kind="stable")[:, :k]`` (largest first, ties to the lower index), found
    with ``argpartition`` in linear time; only the ``k`` winners are sorted."""
    n = x.shape[-1]
    if k >= n:
        return np.argsort(-x, axis=-1, kind="stable")
    part = np.argpartition(-x, k - 1, axis=-1)[:, :k]
    kth = np.take_along_axis(x, part, -1).min(axis=-1, keepdims=True)
    ties = (x == kth).sum(axis=-1) > (np.take_along_axis(x, part, -1) == kth).sum(axis=-1)
    for row in np.flatnonzero(ties):  # the partition kept arbitrary ones among equal k-th values
        above = np.flatnonzero(x[row] > kth[row])
        part[row] = np.concatenate([above, np.flatnonzero(x[row] == kth[row])[:k - len(above)]])
    vals = np.take_along_axis(x, part, -1)
    return np.take_along_axis(part, np.lexsort((part, -vals), axis=-1), -1)


def _beam_candidates(picked: tuple, running_scores: np.ndarray, rules: _Rules, seqs: np.ndarray,
                     keep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``keep`` best (score, beam, token) per batch row over all its beams, best first, ties to the
    lower (beam, token): from the full logits (the host applies the rules) or from each beam's best
    entries that the step picked on the device (already log-probs plus running scores)."""
    batch, num_beams = running_scores.shape
    if len(picked) == 1:
        vocab = picked[0].shape[-1]
        logp = rules.apply(_log_softmax(picked[0].astype(np.float32)), seqs).reshape(batch, num_beams, vocab)
        logp = (logp + running_scores[:, :, None]).reshape(batch, num_beams * vocab)
        idx = _topk(logp, keep)
        return np.take_along_axis(logp, idx, 1), idx // vocab, idx % vocab
    vals, ids = (a.reshape(batch, -1) for a in picked)
    beams = np.broadcast_to(np.repeat(np.arange(num_beams), picked[0].shape[1]), vals.shape)
    order = np.lexsort((ids, beams, -vals), axis=-1)[:, :keep]
    return (np.take_along_axis(vals, order, 1), np.take_along_axis(beams, order, 1),
            np.take_along_axis(ids, order, 1).astype(np.int64))


def _beam_search(model, input_ids, inputs_embeds, attention_mask, prefix, live, max_new_tokens, num_beams,
                 num_return_sequences, length_penalty, early_stopping, eos, pad, rules: _Rules, keep: int,
                 use_jit: bool, pick: _Pick, prompt_inputs: tuple = (),
                 matchers: Optional[RowMatchers] = None) -> GenerateOutput:
    """transformers' vectorised beam search (4.56 to 5.25), in numpy; keeps all beams for the caller.

    ``matchers``: one per beam, reordered with the beams; a beam that holds an eos token or a -inf score (it
    had no allowed token left to take) is no longer constrained, and can never win."""
    batch, prompt_len = prefix.shape
    max_len = prompt_len + max_new_tokens
    top_nb = np.arange(keep) < num_beams
    fill = (pad if pad else eos[0]) if eos else -1

    running = np.full((batch, num_beams, max_len), fill, np.int64)
    running[:, :, :prompt_len] = prefix[:, None]
    done_seqs = running.copy()
    running_scores = np.zeros((batch, num_beams), np.float32)
    running_scores[:, 1:] = -1e9
    done_scores = np.full((batch, num_beams), -1e9, np.float32)
    done = np.zeros((batch, num_beams), bool)
    done_lens = np.zeros((batch, num_beams), np.int64)
    improvable = live.copy()
    cur_len = prompt_len

    session = _Session(model, _cache_length(model, attention_mask, max_new_tokens), use_jit, pick, eos, matchers)
    expand = np.repeat(np.arange(batch), num_beams)
    # the prompt's rows are repeated per beam on the device, before selection
    if pick.k:
        picked = _start(session, input_ids, inputs_embeds, attention_mask, prefix, rules.bans_eos(cur_len),
                        running_scores.reshape(-1), expand, np.repeat(prefix[:, rules.skip:], num_beams, axis=0),
                        prompt_inputs)
    else:
        picked = _start(session, input_ids, inputs_embeds, attention_mask, prefix, False, rows=expand,
                        prompt_inputs=prompt_inputs)
    session.reorder(expand, expand=True)
    while True:
        seqs = running[:, :, :cur_len].reshape(batch * num_beams, cur_len)
        top_logp, src_beam, tokens = _beam_candidates(picked, running_scores, rules, seqs, keep)
        top_seqs = _take(running, src_beam)
        top_seqs[:, :, cur_len] = tokens
        hits = np.isin(tokens, eos) | (cur_len + 1 >= max_len)

        run_logp = (top_logp + hits * np.float32(-1e9)).astype(np.float32)
        nxt = _topk(run_logp, num_beams)
        running, running_scores = _take(top_seqs, nxt), _take(run_logp, nxt)
        parent = _take(src_beam, nxt)

        fin_logp = top_logp / np.float32((cur_len + 1 - prompt_len) ** length_penalty)
        fin_logp = fin_logp + (done.all(axis=1, keepdims=True) & (early_stopping is True)) * np.float32(-1e9)
        fin_logp = fin_logp + (~improvable)[:, None] * np.float32(-1e9)
        just_done = hits & top_nb[None, :hits.shape[1]]
        fin_logp = (fin_logp + (~just_done) * np.float32(-1e9)).astype(np.float32)
        merged_scores = np.concatenate([done_scores, fin_logp], 1)
        best = _topk(merged_scores, num_beams)
        done_seqs = _take(np.concatenate([done_seqs, top_seqs], 1), best)
        done_scores = _take(merged_scores, best)
        done = _take(np.concatenate([done, just_done], 1), best)
        done_lens = _take(np.concatenate([done_lens, np.full(hits.shape, cur_len + 1 - prompt_len)], 1), best)

        cur_len += 1
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = max_len - prompt_len
        else:
            best_len = cur_len - prompt_len
        best_running = running_scores[:, :1] / np.float32(best_len ** length_penalty)
        worst_done = np.where(done, done_scores.min(axis=1, keepdims=True), np.float32(-1e9))
        improvable = improvable & (best_running > worst_done).any(axis=1)
        if not improvable.any() or (done[live].all() and early_stopping is True) or hits.all():
            break
        index = (parent + np.arange(batch)[:, None] * num_beams).reshape(-1)
        session.reorder(index)
        tokens = running[:, :, cur_len - 1].reshape(-1)
        if matchers is not None:
            matchers.reorder(index)
            matchers.advance(tokens, np.isfinite(running_scores.reshape(-1)) & ~np.isin(tokens, eos))
        picked = session.step(tokens, rules.bans_eos(cur_len), running_scores.reshape(-1))

    n = num_return_sequences
    out_len = prompt_len + int(done_lens[:, :n].max())
    return GenerateOutput(done_seqs[:, :n, :out_len].reshape(batch * n, out_len),
                          done_scores[:, :n].reshape(-1).astype(np.float32), np.zeros(batch * n, bool))
