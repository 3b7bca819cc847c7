"""Caption text clean-up: boilerplate openings and repetition loops.

Captioners open with boilerplate ("The video shows ...") that a text-to-video model
should not learn, and sometimes fall into a loop ("MM-Vet, MM-Vet, MM-Vet, ...") until
the token limit. Both are fixed here, for the runner (after generation) and for
``datautil`` (on existing captions), so the two agree. The clean-up takes time linear in the
text's length, whatever the text (no sentence punctuation, one character repeated, a reply of
millions of characters).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.config import CONFIG_DIR, ConfigError, load_yaml

CLEANUP_CONFIG = CONFIG_DIR / "cleanup.yaml"
MIN_REPEATS = 3  # a unit seen this many times in a row (or a sentence this many times) is a loop
MIN_LOOP_WORDS = 6  # ... and the repeated run covers at least this many words
MAX_UNIT_WORDS = 50  # longest repeated unit looked for (a longer one is a sentence loop)

_WORD = re.compile(r"\S+")
_SENTENCE_END = re.compile(r"[.!?]+")
_NON_WORD = re.compile(r"\W+")


@dataclass(frozen=True)
class Cleanup:
    """What to clean after generation (``configs/cleanup.yaml``)."""

    strip_openings: bool = True
    cut_repetition: bool = True
    openings: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_yaml(cls, path: str | Path = CLEANUP_CONFIG) -> Cleanup:
        values = load_yaml(path)
        unknown = sorted(set(values) - {"strip_openings", "cut_repetition", "openings"})
        openings = values.get("openings", [])
        if unknown or not isinstance(openings, list) or not all(isinstance(o, str) for o in openings):
            raise ConfigError(f"{path}: expected strip_openings, cut_repetition and a list of openings "
                              f"(unknown keys: {unknown})")
        return cls(bool(values.get("strip_openings", True)), bool(values.get("cut_repetition", True)),
                   tuple(openings))


    def clean(self, text: str) -> tuple[str, bool]:
        """The cleaned caption, and whether a repetition loop was cut from it."""
        repetition = False
        if self.cut_repetition:
            cut = cut_repetition(text)
            text, repetition = cut.text, cut.repetition
        if self.strip_openings:
            text = strip_opening(text, self.openings)
        return text, repetition


def default_openings() -> tuple[str, ...]:
    return Cleanup.from_yaml().openings


def strip_opening(text: str, openings: tuple[str, ...] | list[str]) -> str:
    """``text`` without a leading boilerplate opening (case-insensitive), its first letter upper case.

    The opening must end at a word boundary, and something must remain, otherwise the
    text is returned as it is.
    """
    stripped = text.lstrip()
    lowered = stripped.lower()
    for opening in sorted(openings, key=len, reverse=True):
        opening = opening.strip().lower()
        if not opening or not lowered.startswith(opening):
            continue
        rest = stripped[len(opening):]
        if rest and rest[0].isalnum() and opening[-1].isalnum():
            continue  # "The video showsomething": not the opening
        rest = rest.lstrip(" ,:;-\u2014")
        if rest:
            return rest[0].upper() + rest[1:]
    return text


def _norm(word: str) -> str:
    return _NON_WORD.sub("", word.lower())


def _loop_start(words: list[str]) -> tuple[int, int] | None:
    """(start, unit length) of the first run of MIN_REPEATS or more consecutive copies of a word
    unit that covers MIN_LOOP_WORDS or more words, a unit holding a word (not only punctuation);
    the shortest unit at that start; None when there is none.

    A start has ``copies`` copies of a unit when each of the (copies - 1) * unit words from it equals
    the word a unit further on: one vectorised pass over the words per unit length.
    """
    norms = {word: _norm(word) for word in set(words)}
    keys = [norms[word] for word in words]
    ids: dict[str, int] = {}
    codes = np.array([ids.setdefault(key, len(ids)) for key in keys], dtype=np.int64)
    words_before = np.concatenate(([0], np.cumsum([bool(key) for key in keys])))
    found = None
    for unit in range(1, MAX_UNIT_WORDS + 1):
        copies = max(MIN_REPEATS, -(-MIN_LOOP_WORDS // unit))
        starts = len(keys) - copies * unit + 1  # the starts with room for the copies
        if starts <= 0:
            break
        span = (copies - 1) * unit
        same_before = np.concatenate(([0], np.cumsum(codes[:-unit] == codes[unit:])))
        looping = ((same_before[span:span + starts] - same_before[:starts] == span)
                   & (words_before[unit:unit + starts] > words_before[:starts]))
        if looping.any():
            start = int(looping.argmax())
            if found is None or start < found[0]:
                found = start, unit
    return found


@dataclass(frozen=True)
class Cut:
    text: str
    repetition: bool


def _sentences(text: str) -> Iterator[tuple[int, str]]:
    """(start, text) of each sentence: a run of characters other than ``.!?`` and the ``.!?`` run
    closing it. (The regex ``[^.!?]+[.!?]+`` finds the same, in time quadratic in a run without ``.!?``.)"""
    start = 0
    for end in _SENTENCE_END.finditer(text):
        if end.start() > start:
            yield start, text[start:end.end()]
        start = end.end()


def cut_repetition(text: str) -> Cut:
    """Cut a repetition loop after its first occurrence: a sentence said MIN_REPEATS or more times,
    or a run of repeated words (see ``_loop_start``). Text before the loop is kept as written."""
    seen: dict[str, list[int]] = {}
    for start, sentence in _sentences(text):
        seen.setdefault(" ".join(_norm(w) for w in sentence.split()), []).append(start)
    looping = [starts for key, starts in seen.items() if key and len(starts) >= MIN_REPEATS]
    if looping:
        cut_at = min(starts[1] for starts in looping)
        return Cut(text[:cut_at].rstrip(), True)
    found = _loop_start(_WORD.findall(text))
    if found is None:
        return Cut(text, False)
    start, unit = found
    last_word = next(islice(_WORD.finditer(text), start + unit - 1, None))
    return Cut(text[:last_word.end()].rstrip(" ,;:"), True)


def word_count(text: str) -> int:
    return len(_WORD.findall(text))
