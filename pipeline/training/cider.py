"""CIDEr-D in plain Python/numpy, for the SCST reward (no Java, no subprocess per step).

CIDEr-D (Vedantam et al. 2015, the "-D" variant used by the COCO server) scores a
candidate against a video's references as the mean over n = 1..4 of the cosine
similarity of TF-IDF n-gram vectors, with two changes over plain CIDEr that make it
hard to game: candidate weights are clipped by the reference's (an n-gram repeated
more often than a reference has it earns nothing extra) and each candidate/reference
similarity is multiplied by a Gaussian length penalty ``exp(-(len_c - len_r)^2 / (2
sigma^2))``, sigma = 6. Similarities are averaged over the references and scaled x10.

Document frequencies: one "document" per video, the set of n-grams of all its
references. ``CiderD`` computes them ONCE from a reference corpus (the training
references), as SCST needs: a reward must not depend on which videos share a batch.
pycocoevalcap's ``Cider`` is the same formula (its scorer already clips and applies
the sigma=6 penalty), but it takes the document frequencies from the references of
the set being scored. So ``CiderD(corpus)`` equals pycocoevalcap's ``Cider`` exactly
when ``corpus`` holds the references of the scored videos; the tests check that.

Like the reference code, a sentence's "length" is its number of bigrams (its word
count minus one), so the penalty sees the same length differences except when one
side is empty.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from functools import lru_cache

import numpy as np

Tokenizer = Callable[[str], list[str]]
NGram = tuple[str, ...]
# Per n: {n-gram: tf-idf weight}, the per-n vector norms, and the sentence length.
Vector = tuple[list[dict[NGram, float]], list[float], int]

_CLITICS = ("'s", "'re", "'ve", "'ll", "'d", "'m", "n't")
_CLITIC = re.compile(r"(\w)(" + "|".join(_CLITICS) + r")\b")
# Punctuation except apostrophes, hyphens and a decimal point or comma between digits.
_PUNCT = re.compile(r"[^\w\s'.,-]|(?<!\d)[.,]|[.,](?!\d)")


def simple_tokenize(text: str) -> list[str]:
    """Lowercase, split clitics ("man's" -> "man 's"), drop punctuation, split on whitespace.

    A Java-free approximation of pycocoevalcap's PTBTokenizer + punctuation removal, so
    rewards computed on generated text see the same tokens evaluation would (hyphenated
    words stay one token, as in PTB); quotes and hyphens around a word are dropped.
    """
    text = _CLITIC.sub(r"\1 \2", text.lower())
    tokens = (tok if tok in _CLITICS else tok.strip("'-") for tok in _PUNCT.sub(" ", text).split())
    return [tok for tok in tokens if tok]


def ngram_counts(words: Sequence[str], n: int) -> Counter[NGram]:
    """Counts of all 1..n-grams of a tokenised sentence."""
    counts: Counter[NGram] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


class CiderD:
    """CIDEr-D with document frequencies fixed by a reference corpus.

    refs_corpus: the references of every video of the corpus (dict id -> captions, or
    a list of caption lists); one document per video. tokenizer: applied to corpus,
    candidates and references alike (``str.split`` for text that is already tokenised).
    """

    def __init__(self, refs_corpus: Mapping[Hashable, Sequence[str]] | Sequence[Sequence[str]],
                 n: int = 4, sigma: float = 6.0, tokenizer: Tokenizer = simple_tokenize,
                 cache_size: int = 65536) -> None:
        documents = list(refs_corpus.values()) if isinstance(refs_corpus, Mapping) else list(refs_corpus)
        if not documents:
            raise ValueError("the reference corpus is empty; give at least one video's references")
        self.n = n
        self.sigma = sigma
        self.tokenizer = tokenizer
        self.document_frequency: Counter[NGram] = Counter()
        for refs in documents:
            seen: set[NGram] = set()
            for ref in refs:
                seen.update(ngram_counts(tokenizer(ref), n))
            self.document_frequency.update(seen)
        self.log_num_documents = math.log(float(len(documents)))
        # SCST scores many candidates against the same references, step after step.
        self._ref_vectors = lru_cache(maxsize=cache_size)(self._vectors)

    def _vector(self, sentence: str) -> Vector:
        counts = ngram_counts(self.tokenizer(sentence), self.n)
        vec: list[dict[NGram, float]] = [{} for _ in range(self.n)]
        squares = [0.0] * self.n
        length = 0
        for ngram, tf in counts.items():
            order = len(ngram) - 1
            idf = self.log_num_documents - math.log(max(1.0, self.document_frequency[ngram]))
            weight = tf * idf
            vec[order][ngram] = weight
            squares[order] += weight * weight
            if order == 1:
                length += tf
        return vec, [math.sqrt(s) for s in squares], length

    def _vectors(self, refs: tuple[str, ...]) -> tuple[Vector, ...]:
        return tuple(self._vector(ref) for ref in refs)

    def _similarity(self, cand: Vector, ref: Vector) -> float:
        """Mean over n of the clipped, length-penalised cosine similarity."""
        cand_vec, cand_norm, cand_len = cand
        ref_vec, ref_norm, ref_len = ref
        penalty = math.exp(-((cand_len - ref_len) ** 2) / (2 * self.sigma ** 2))
        total = 0.0
        for order in range(self.n):
            ref_weights = ref_vec[order]
            dot = 0.0
            for ngram, weight in cand_vec[order].items():
                ref_weight = ref_weights.get(ngram, 0.0)
                dot += min(weight, ref_weight) * ref_weight
            if cand_norm[order] != 0 and ref_norm[order] != 0:
                dot /= cand_norm[order] * ref_norm[order]
            total += dot * penalty
        return total / self.n

    def score(self, candidates: Sequence[str], refs: Sequence[Sequence[str]]) -> np.ndarray:
        """CIDEr-D of each candidate against its own references (``refs[i]`` for ``candidates[i]``).

        For SCST pass every beam of a video with that video's reference list; the
        references' vectors are cached, so repeated reference lists cost nothing.
        """
        if len(candidates) != len(refs):
            raise ValueError(f"{len(candidates)} candidates but {len(refs)} reference lists")
        scores = np.empty(len(candidates), dtype=np.float64)
        for i, (cand, cand_refs) in enumerate(zip(candidates, refs)):
            if not cand_refs:
                raise ValueError(f"candidate {i} ({cand!r}) has no references")
            ref_vectors = self._ref_vectors(tuple(cand_refs))
            vector = self._vector(cand)
            scores[i] = 10.0 * sum(self._similarity(vector, r) for r in ref_vectors) / len(ref_vectors)
        return scores

    def corpus_score(self, candidates: Sequence[str], refs: Sequence[Sequence[str]]) -> tuple[float, np.ndarray]:
        """Mean CIDEr-D over candidates and the per-candidate scores (pycocoevalcap's return shape)."""
        scores = self.score(candidates, refs)
        return float(scores.mean()) if len(scores) else 0.0, scores
