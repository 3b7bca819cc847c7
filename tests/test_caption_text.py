"""Caption clean-up (openings, repetition loops) and datautil's caption filters."""
from __future__ import annotations

import csv
import random
import re
import time

import pandas as pd
import pytest

from pipeline.config import ConfigError
from pipeline.datasets.caption_text import (MAX_UNIT_WORDS, MIN_LOOP_WORDS, MIN_REPEATS, Cleanup, cut_repetition,
                                            default_openings, strip_opening, word_count)
from pipeline.datasets.datautil import main as datautil
from tests.tiny_models import save_word_tokenizer


OPENINGS = default_openings()


def test_boilerplate_openings_are_stripped_and_capitalised():
    assert strip_opening("The video shows a man in a red jacket walking his dog along a beach at sunset.", OPENINGS) == \
        "A man in a red jacket walking his dog along a beach at sunset."
    assert strip_opening("In this video, a chef slices onions on a wooden board.", OPENINGS) == \
        "A chef slices onions on a wooden board."
    assert strip_opening("THE VIDEO DEPICTS: two cars racing.", OPENINGS) == "Two cars racing."
    assert strip_opening("The clip shows a timelapse.", ["the clip shows"]) == "A timelapse."


def test_captions_without_an_opening_stay_as_they_are():
    for caption in ("A red circle bounces on a white background.",
                    "The videographer films a wedding from a balcony.",
                    "The video showcases a new phone.",  # not "the video shows" + a word
                    "The video shows",  # nothing would be left
                    ""):
        assert strip_opening(caption, OPENINGS) == caption


def test_cleanup_config_is_read_and_checked(tmp_path):
    assert "the video shows" in OPENINGS and Cleanup.from_yaml().strip_openings
    bad = tmp_path / "cleanup.yaml"
    bad.write_text("openings: the video shows\n")
    with pytest.raises(ConfigError, match="list of openings"):
        Cleanup.from_yaml(bad)


def test_a_word_loop_is_cut_after_its_first_occurrence():
    sample = ("The model is evaluated on benchmarks including MMMU, MathVista, MM-Vet, MM-Vet, MM-Vet, "
              "MM-Vet, MM-Vet, MM-Vet, MM-Vet, MM-Vet")
    cut = cut_repetition(sample)
    assert cut.repetition and cut.text == "The model is evaluated on benchmarks including MMMU, MathVista, MM-Vet"
    phrase = "a woman is dancing and spinning around, "
    cut = cut_repetition("In a studio, " + phrase * 4 + "a woman")
    assert cut.repetition and cut.text == "In a studio, a woman is dancing and spinning around"


def test_a_repeated_sentence_is_cut_after_its_first_occurrence():
    caption = ("A dog runs through a park. The dog is brown. The dog is brown. The dog is brown. "
               "The dog is")
    cut = cut_repetition(caption)
    assert cut.repetition and cut.text == "A dog runs through a park. The dog is brown."


def test_ordinary_repetition_is_left_alone():
    for caption in ("The man smiles. He waves. The man smiles.",  # twice is not a loop
                    "A very very very small kitten sleeps.",  # a short run, fewer than 6 words
                    "Waves crash on rocks; waves crash on sand."):
        cut = cut_repetition(caption)
        assert not cut.repetition and cut.text == caption
    assert word_count("  two\twords ") == 2


def _words(count: int) -> str:
    return " ".join(f"w{i}" for i in range(count))


def test_cleanup_takes_linear_time_on_long_and_adversarial_text():
    """Text without .!? took quadratic time (100k characters: 46 s), and so did runs of punctuation-only
    words in the loop search; each shape is 100k or 1M characters here."""
    million = 1_000_000
    cases = [
        (_words(17_000)[:100_000], None),  # no sentence punctuation
        (_words(150_000)[:million], None),
        ("a" * million, None),  # one character
        ("A cat" + " " * million + "sleeps", None),  # a whitespace run
        ("- " * (million // 2), None),  # repeated "words" without a word: not a loop
        ("!" * million, None),
        (_words(140_000) + " the dog runs" * 10, _words(140_000) + " the dog runs"),  # a loop at the end
        (" ".join(f"Sentence {i}." for i in range(80_000)) + " The dog is brown." * 3,
         " ".join(f"Sentence {i}." for i in range(80_000)) + " The dog is brown."),
    ]
    cleanup = Cleanup.from_yaml()
    for text, expected in cases:
        start = time.perf_counter()
        cleaned, repetition = cleanup.clean(text)
        seconds = time.perf_counter() - start
        assert seconds < 2, f"{len(text)} characters ({text[:20]!r}...) took {seconds:.1f} s"
        assert (cleaned, repetition) == ((text, False) if expected is None else (expected, True))


def _reference_cut(text: str) -> tuple[str, bool]:
    """cut_repetition by the direct search: every start, every unit, counting copies."""
    def norm(word: str) -> str:
        return re.sub(r"\W+", "", word.lower())

    seen: dict[str, list[int]] = {}
    for m in re.finditer(r"[^.!?]+[.!?]+", text):
        seen.setdefault(" ".join(norm(w) for w in m.group().split()), []).append(m.start())
    looping = [starts[1] for key, starts in seen.items() if key and len(starts) >= MIN_REPEATS]
    if looping:
        return text[:min(looping)].rstrip(), True
    matches = list(re.finditer(r"\S+", text))
    keys = [norm(m.group()) for m in matches]
    for start in range(len(keys)):
        for unit in range(1, min(MAX_UNIT_WORDS, (len(keys) - start) // MIN_REPEATS) + 1):
            copies = 1
            while keys[start + copies * unit:start + (copies + 1) * unit] == keys[start:start + unit]:
                copies += 1
            if copies >= MIN_REPEATS and copies * unit >= MIN_LOOP_WORDS and any(keys[start:start + unit]):
                return text[:matches[start + unit - 1].end()].rstrip(" ,;:"), True
    return text, False


def test_repetition_cut_matches_the_direct_search():
    rng = random.Random(0)
    vocab = ["a", "A", "dog", "dog,", "Dog!", "-", "--", "\u2014", ",", "...", "the", "runs.", "cat?"]
    separators = [" ", "  ", "\n", ". ", ", ", "", "! "]
    cuts = 0
    for _ in range(3000):
        chosen = rng.sample(vocab, rng.randint(1, len(vocab)))
        text = "".join(rng.choice(chosen) + rng.choice(separators) for _ in range(rng.randint(0, 40)))
        if rng.random() < 0.5:
            unit = " ".join(rng.choice(chosen) for _ in range(rng.randint(1, 12))) + rng.choice(separators)
            at = rng.randint(0, len(text))
            text = text[:at] + unit * rng.randint(2, 7) + text[at:]
        cut = cut_repetition(text)
        assert (cut.text, cut.repetition) == _reference_cut(text), repr(text)
        cuts += cut.repetition
    assert cuts > 1000


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_datautil_caption_filters_with_counts(tmp_path, capsys):
    captions = [
        ("a.mp4", "ok", "The video shows a cat chasing a red ball across the kitchen floor."),
        ("b.mp4", "ok", "A cat chasing a red ball across the kitchen floor."),  # a duplicate once stripped
        ("c.mp4", "error", ""),
        ("d.mp4", "ok", "   "),
        ("e.mp4", "ok", "Rain."),
        ("f.mp4", "ok", "In this video, a train crosses a long bridge over a misty river at dawn."),
    ]
    source = tmp_path / "out.csv"
    pd.DataFrame(captions, columns=["path", "status", "text"]).assign(id=range(6)).to_csv(source, index=False)
    tokenizer = tmp_path / "tok"
    save_word_tokenizer(tokenizer, 64, {"<pad>": 0, "</s>": 1, "<unk>": 2})
    target = tmp_path / "train.csv"
    assert datautil([str(source), "--filter-status", "ok", "--text-remove-prefix", "--text-filter-empty",
                     "--text-dedup", "--min-words", "3", "--max-words", "40", "--count-num-token", str(tokenizer),
                     "--output", str(target)]) == 0
    printed = capsys.readouterr().out
    for line in ("filter-status: removed 1 rows", "text-remove-prefix: stripped an opening from 2 captions",
                 "remove-empty-caption: removed 1 rows", "text-dedup: removed 1 rows", "words: removed 1 rows",
                 "count-num-token: added text_len", "wrote 2 rows"):
        assert line in printed, printed
    rows = _rows(target)
    assert [r["path"] for r in rows] == ["a.mp4", "f.mp4"]
    assert rows[1]["text"] == "A train crosses a long bridge over a misty river at dawn."
    assert [r["id"] for r in rows] == ["0", "5"] and all(int(r["text_len"]) > 10 for r in rows)


def test_datautil_filters_name_a_missing_column(tmp_path, capsys):
    source = tmp_path / "meta.csv"
    pd.DataFrame({"path": ["a.mp4"]}).to_csv(source, index=False)
    assert datautil([str(source), "--filter-status", "ok"]) == 1
    assert "no 'status' column" in capsys.readouterr().err
    assert datautil([str(source), "--text-dedup"]) == 1
    assert "no caption column 'text'" in capsys.readouterr().err
