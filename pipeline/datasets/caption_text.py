"""Caption text clean-up: boilerplate openings and repetition loops.

Captioners open with boilerplate ("The video shows ...") that a text-to-video model
should not learn, and sometimes fall into a loop ("MM-Vet, MM-Vet, MM-Vet, ...") until
the token limit. Both are fixed here, for the runner (after generation) and for
``datautil`` (on existing captions), so the two agree.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Openings stripped by default: a description that starts with one reads the same without it.
DEFAULT_OPENINGS = (
    "the video shows", "the video depicts", "the video features", "the video captures",
    "the video presents", "the video displays", "the video begins with", "the video starts with",
    "this video shows", "this video depicts", "this video features", "this video captures",
    "in this video,", "in the video,", "the clip shows", "this clip shows", "the footage shows",
    "the image shows", "this image shows", "the scene shows",
)
MIN_REPEATS = 3  # a unit seen this many times in a row (or a sentence this many times) is a loop
MIN_LOOP_WORDS = 6  # ... and the repeated run covers at least this many words
MAX_UNIT_WORDS = 50  # longest repeated unit looked for (a longer one is a sentence loop)

_WORD = re.compile(r"\S+")
_SENTENCE = re.compile(r"[^.!?]+[.!?]+")


def strip_opening(text: str, openings: tuple[str, ...] | list[str] = DEFAULT_OPENINGS) -> str:
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
