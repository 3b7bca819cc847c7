"""Schema-constrained decoding: the one hook through which any model's generation emits JSON that a schema accepts.

``models.generation.generate(..., grammar=JsonGrammar(schema, tokenizer))`` asks, before each token is
selected, which tokens every row may take next. That mask goes into the compiled selection step, where every
other token's logit becomes -inf before the argmax, the beams' top-k or sampling, so each row's text stays a
prefix of a document the schema accepts. A row's end tokens are allowed exactly when its document is complete,
so a row that ends is valid JSON for the schema; a row cut by ``max_new_tokens`` is not, and callers must check
(``is_complete``).

The masks come from llguidance. Measured against outlines-core at a 152k byte-level BPE vocabulary
(``benchmarks/results/grammar_engines.json``): one row's mask takes 9-16 us on average against 109-190 us, and a
schema compiles in 1-3 ms against 0.5-2.9 s. xgrammar, the third maintained engine, needs torch and triton,
which this runtime does not have. Each row has its own matcher, which follows the row's tokens on the host
(a beam's is copied when beams are reordered); JSON is written without optional whitespace, with ", " and ": "
between items, as ``json.dumps`` writes it.
"""
from __future__ import annotations

import copy
import json
import weakref
from typing import Any, Optional, Sequence

import jsonschema
import llguidance
import llguidance.numpy as llnp
import numpy as np

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT: dict = {"type": "object"}  # what OpenAI's {"type": "json_object"} asks for

_ENGINE_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_EXECUTOR: Optional[llguidance.LLExecutor] = None


class GrammarError(ValueError):
    """A schema that is not a valid JSON Schema or that uses what the engine lacks, or a tokenizer it cannot read."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def compile_schema(schema: Any) -> str:
    """The engine's grammar for ``schema``, after checking that it is a valid JSON Schema (its draft's
    meta-schema, with ``jsonschema``) that the engine can compile (llguidance refuses keywords it does not
    implement, e.g. ``uniqueItems`` or ``not``, rather than ignoring them). Needs no tokenizer."""
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON Schema must be a JSON object, got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise GrammarError(f"not a valid JSON Schema: {_one_line(exc.message)}"
                           + (f" (at {where})" if where else "")) from None
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError(f"the schema uses what the grammar engine (llguidance) cannot follow: {_one_line(error)}")
    return grammar


def engine_tokenizer(tokenizer) -> llguidance.LLTokenizer:
    """``tokenizer`` (a transformers tokenizer backed by ``tokenizers``) as the engine reads it; built once per
    tokenizer (about a second at 152k tokens)."""
    try:
        return _ENGINE_TOKENIZERS[tokenizer]
    except KeyError:
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GrammarError(f"the grammar engine reads only tokenizers backed by the tokenizers library; "
                           f"{type(tokenizer).__name__} is not")
    backend = copy.copy(backend)
    backend.no_padding()
    backend.no_truncation()
    try:
        converted = llguidance.LLTokenizer(backend.to_str(), eos_token=tokenizer.eos_token_id)
    except ValueError as exc:
        raise GrammarError(f"the grammar engine (llguidance) cannot read this tokenizer: {_one_line(exc)}") from None
    _ENGINE_TOKENIZERS[tokenizer] = converted
    return converted


def is_complete(text: str, schema: dict) -> bool:
    """Whether ``text`` is a JSON document that ``schema`` accepts (a constrained row that ran out of tokens is
    not)."""
    try:
        document = json.loads(text)
    except ValueError:
        return False
    return jsonschema.validators.validator_for(schema)(schema).is_valid(document)


class JsonGrammar:
    """A JSON Schema compiled for one tokenizer: what ``generate(grammar=...)`` takes. Compiling checks the
    schema (:func:`compile_schema`) and the tokenizer (:func:`engine_tokenizer`), raising ``GrammarError``."""

    def __init__(self, schema: dict, tokenizer):
        self.schema = schema
        self.tokenizer = engine_tokenizer(tokenizer)
        self._start = llguidance.LLMatcher(self.tokenizer, compile_schema(schema))
        if self._start.is_error():
            raise GrammarError(f"the grammar engine (llguidance) cannot compile the schema: "
                               f"{_one_line(self._start.get_error())}")

    def matchers(self, live: np.ndarray, eos: Sequence[int]) -> "RowMatchers":
        """Fresh matchers for the rows of one generate call (``live`` False: a filler row, never constrained)."""
        return RowMatchers([self._start.deep_copy() if alive else None for alive in live], self.tokenizer, eos)


class RowMatchers:
    """The grammar's state in every row of one generate call; a row without a matcher (a filler, a finished
    row, a dead beam) may take any token."""

    def __init__(self, rows: list, tokenizer: llguidance.LLTokenizer, eos: Sequence[int]):
        if not eos:
            raise ValueError("a grammar needs an end token (eos_token_id): rows end when their JSON is complete")
        self.rows = rows
        self.eos = np.asarray(eos, np.int64)
        self.engine_eos = np.asarray(tokenizer.eos_tokens, np.int64)
        self.bits = llnp.allocate_token_bitmask(len(rows), tokenizer.vocab_size)

    def allowed(self, vocab: int) -> np.ndarray:
        """(rows, ``vocab``) bool: the tokens each row may take next; its end tokens only when its JSON is
        complete, in place of the engine's own end token."""
        global _EXECUTOR
        active = [(m, i) for i, m in enumerate(self.rows) if m is not None]
        if _EXECUTOR is None:
            _EXECUTOR = llguidance.LLExecutor()
        llnp.fill_next_token_bitmask_par(_EXECUTOR, active, self.bits)
        bits = np.unpackbits(self.bits.view(np.uint8), axis=1, count=min(vocab, self.bits.shape[1] * 32),
                             bitorder="little").astype(bool)
        mask = np.zeros((len(self.rows), vocab), bool)
        mask[:, :bits.shape[1]] = bits
        rows = np.array([i for _, i in active], np.int64)
        accepting = np.array([m.is_accepting() for m, _ in active], bool)
        engine_eos = self.engine_eos[self.engine_eos < vocab]
        mask[rows[:, None], engine_eos[None, :]] = False
        eos = self.eos[self.eos < vocab]
        mask[rows[accepting][:, None], eos[None, :]] = True
        mask[[m is None for m in self.rows]] = True
        return mask

    def advance(self, tokens: np.ndarray, keep: np.ndarray) -> None:
        """Each kept row takes its token; the other rows stop being constrained (they ended or died)."""
        for i, m in enumerate(self.rows):
            if m is None:
                continue
            if not keep[i]:
                self.rows[i] = None
            elif not m.consume_token(int(tokens[i])):
                raise RuntimeError(f"the grammar refused token {int(tokens[i])} that its own mask allowed: "
                                   f"{_one_line(m.get_error())}")

    def reorder(self, index: np.ndarray) -> None:
        """Row ``i`` becomes a copy of row ``index[i]`` (beam search): a row taken twice is copied."""
        taken: set = set()
        rows = []
        for i in index.tolist():
            m = self.rows[i]
            rows.append(m.deep_copy() if m is not None and i in taken else m)
            taken.add(i)
        self.rows = rows
