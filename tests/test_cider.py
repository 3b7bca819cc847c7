"""Our CIDEr-D against pycocoevalcap's Cider, and its clipping and length penalty on hand-built cases."""
from __future__ import annotations

import math
import random
import shutil
import time

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from pipeline.training.cider import CiderD, simple_tokenize

WORDS = "a man is playing guitar on the stage woman cooks food in kitchen dog runs park".split()


def _sentence(rng: random.Random, low: int = 1, high: int = 14) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _random_set(seed: int, videos: int = 40) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    rng = random.Random(seed)
    gts = {i: [_sentence(rng) for _ in range(rng.randint(1, 7))] for i in range(videos)}
    res = {i: [_sentence(rng, 0)] for i in range(videos)}
    # Edge cases: empty and one-word candidates, a candidate equal to a reference, repeats.
    res[0], res[1], res[2] = [""], ["dog"], [gts[2][0]]
    res[3] = ["dog dog dog dog dog dog"]
    return gts, res


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_pycocoevalcap_cider_when_df_comes_from_the_same_refs(seed):
    gts, res = _random_set(seed)
    expected_mean, expected = Cider().compute_score(gts, res)
    ours = CiderD(gts, tokenizer=str.split)
    mean, scores = ours.corpus_score([res[k][0] for k in gts], [gts[k] for k in gts])
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    assert abs(mean - expected_mean) < 1e-6
    assert np.abs(scores - expected).max() < 1e-12  # in fact the same to rounding


def test_corpus_as_list_equals_dict():
    gts, res = _random_set(3)
    cands, refs = [res[k][0] for k in gts], [gts[k] for k in gts]
    np.testing.assert_array_equal(CiderD(gts, tokenizer=str.split).score(cands, refs),
                                  CiderD(list(gts.values()), tokenizer=str.split).score(cands, refs))


def test_document_frequencies_are_fixed_by_the_corpus():
    """A reward must not depend on which other videos share the batch (pycocoevalcap's does)."""
    gts, res = _random_set(4)
    scorer = CiderD(gts, tokenizer=str.split)
    keys = list(gts)
    full = scorer.score([res[k][0] for k in keys], [gts[k] for k in keys])
    part = scorer.score([res[k][0] for k in keys[5:9]], [gts[k] for k in keys[5:9]])
    np.testing.assert_array_equal(part, full[5:9])
    subset = {k: gts[k] for k in keys[5:9]}
    _, coco_subset = Cider().compute_score(subset, {k: res[k] for k in subset})
    assert not np.allclose(coco_subset, part)  # df from 4 videos only: other numbers


def test_clipping_and_hand_computed_value():
    # Two documents: "a" is in both (idf 0), "dog"/"runs" only in the first (idf log 2).
    scorer = CiderD([["a dog runs"], ["a cat sleeps"]], tokenizer=str.split)
    # "dog" vs "a dog runs": unigram cosine 1/sqrt(2), no bigrams; lengths (bigram counts) 0 vs 2.
    single = scorer.score(["dog"], [["a dog runs"]])[0]
    assert single == pytest.approx(10 * (1 / math.sqrt(2)) * math.exp(-4 / 72) / 4, abs=1e-12)
    # Repeating "dog" three times: weight 3*log2 is clipped to the reference's log2, so the
    # dot product stays log2^2 while the norm triples; lengths now match (2 bigrams each).
    repeated = scorer.score(["dog dog dog"], [["a dog runs"]])[0]
    assert repeated == pytest.approx(10 * (1 / (3 * math.sqrt(2))) / 4, abs=1e-12)
    # Without clipping the unigram cosine would be 1/sqrt(2) again and the score 10/sqrt(2)/4.
    assert repeated < 10 / math.sqrt(2) / 4


def test_identical_caption_scores_ten():
    scorer = CiderD([["a man plays the red guitar"], ["a woman cooks"]], tokenizer=str.split)
    # "a" is in every document (idf 0) but every order still has a positive-weight n-gram.
    assert scorer.score(["a man plays the red guitar"], [["a man plays the red guitar"]])[0] == pytest.approx(10.0)


def test_gaussian_length_penalty_sigma_6():
    corpus = [["a man plays the red guitar"], ["a woman cooks"]]
    cand, ref = "a man plays the red guitar on a stage in front of people", "a man plays the red guitar"
    penalised = CiderD(corpus, tokenizer=str.split).score([cand], [[ref]])[0]
    flat = CiderD(corpus, sigma=1e12, tokenizer=str.split).score([cand], [[ref]])[0]
    delta = len(cand.split()) - len(ref.split())  # 7
    assert penalised / flat == pytest.approx(math.exp(-delta ** 2 / (2 * 6.0 ** 2)), rel=1e-12)


def test_scst_batch_is_fast_and_per_candidate():
    rng = random.Random(5)
    corpus = {i: [_sentence(rng, 6, 14) for _ in range(20)] for i in range(500)}
    scorer = CiderD(corpus)
    videos = list(corpus)[:64]
    cands = [_sentence(rng, 6, 14) for _ in videos for _ in range(5)]  # 5 beams per video
    refs = [corpus[v] for v in videos for _ in range(5)]
    start = time.perf_counter()
    scores = scorer.score(cands, refs)
    elapsed = time.perf_counter() - start
    assert scores.shape == (320,) and np.all(scores >= 0)
    assert elapsed < 2.0, f"64 videos x 5 beams x 20 refs took {elapsed:.2f}s"
    np.testing.assert_array_equal(scorer.score(cands[:5], refs[:5]), scores[:5])


def test_errors():
    with pytest.raises(ValueError, match="empty"):
        CiderD({})
    scorer = CiderD([["a dog"]])
    with pytest.raises(ValueError, match="2 candidates but 1"):
        scorer.score(["a", "b"], [["a dog"]])
    with pytest.raises(ValueError, match="no references"):
        scorer.score(["a"], [[]])


def test_simple_tokenize():
    assert simple_tokenize("A man's T-shirt isn't red, \"really\"... (yes)! 3.5 kg") == [
        "a", "man", "'s", "t-shirt", "is", "n't", "red", "really", "yes", "3.5", "kg"]


@pytest.mark.skipif(shutil.which("java") is None, reason="PTBTokenizer needs Java")
def test_simple_tokenize_agrees_with_ptb_on_typical_captions():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = ["A man is playing a guitar.", "Two dogs run in the park!", "a woman's cooking pasta, tomatoes",
                "kids play soccer -- outside", "The T-shirt isn't red; it's blue.", "\"Hello\" says the man",
                "someone is slicing 2.5 onions", "a cat, a dog and a bird"]
    ptb = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    assert [" ".join(simple_tokenize(c)) for c in captions] == [ptb[i][0] for i in range(len(captions))]
