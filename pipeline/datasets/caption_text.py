"""Caption text clean-up: boilerplate openings and repetition loops.

Captioners open with boilerplate ("The video shows ...") that a text-to-video model
should not learn, and sometimes fall into a loop ("MM-Vet, MM-Vet, MM-Vet, ...") until
the token limit. Both are fixed here, for the runner (after generation) and for
``datautil`` (on existing captions), so the two agree.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import CONFIG_DIR, ConfigError, load_yaml

CLEANUP_CONFIG = CONFIG_DIR / "cleanup.yaml"
MIN_REPEATS = 3  # a unit seen this many times in a row (or a sentence this many times) is a loop
MIN_LOOP_WORDS = 6  # ... and the repeated run covers at least this many words
MAX_UNIT_WORDS = 50  # longest repeated unit looked for (a longer one is a sentence loop)

_WORD = re.compile(r"\S+")
_SENTENCE = re.compile(r"[^.!?]+[.!?]+")


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
    return re.sub(r"\W+", "", word.lower())


def _loop_start(words: list[str]) -> tuple[int, int] | None:
    """(start, unit length) of the first run of MIN_REPEATS or more consecutive copies of a word
    unit that covers MIN_LOOP_WORDS or more words; None when there is none."""
    keys = [_norm(w) for w in words]
    n = len(keys)
    for start in range(n):
        for unit in range(1, min(MAX_UNIT_WORDS, (n - start) // MIN_REPEATS) + 1):
            copies = 1
            while (start + (copies + 1) * unit <= n
                   and keys[start + copies * unit:start + (copies + 1) * unit] == keys[start:start + unit]):
                copies += 1
            if copies >= MIN_REPEATS and copies * unit >= MIN_LOOP_WORDS and any(keys[start:start + unit]):
                return start, unit
    return None


@dataclass(frozen=True)
class Cut:
    text: str
    repetition: bool


def cut_repetition(text: str) -> Cut:
    """Cut a repetition loop after its first occurrence: a sentence said MIN_REPEATS or more times,
    or a run of repeated words (see ``_loop_start``). Text before the loop is kept as written."""
    sentences = [(m.start(), m.end(), " ".join(_norm(w) for w in m.group().split()))
                 for m in _SENTENCE.finditer(text)]
    seen: dict[str, list[int]] = {}
    for start, end, key in sentences:
        seen.setdefault(key, []).append(start)
    looping = [starts for key, starts in seen.items() if key and len(starts) >= MIN_REPEATS]
    if looping:
        cut_at = min(starts[1] for starts in looping)
        return Cut(text[:cut_at].rstrip(), True)
    matches = list(_WORD.finditer(text))
    found = _loop_start([m.group() for m in matches])
    if found is None:
        return Cut(text, False)
    start, unit = found
    end = matches[start + unit - 1].end()
    return Cut(text[:end].rstrip(" ,;:"), True)


def word_count(text: str) -> int:
    return len(_WORD.findall(text))
