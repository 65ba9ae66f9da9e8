"""Text–speech interleaving: which words of an aligned utterance are spoken (units) and which are written (text),
and the units a spoken span keeps. The first building block of interleaved training (issue: text–speech
interleaving); `pack`, the merged vocabulary and cross-modal evaluation build on it.

An aligned utterance is its words with their times, `[(word, start_s, end_s), ...]` (slamkit's `aligned_text`;
synth writes them for espeak and piper), and its de-duplicated units with their durations in frames.

Two span samplers, both seeded:

- `slamkit_spans` (slamkit's default, its `select_spans_poisson`): repeatedly pick a start word and a Poisson(λ)
  length for a speech span until at least ⌈η n⌉ of the n words are speech. A start must be a text word not right
  after a speech span; a draw that would overlap a span placed before is thrown away (drawn again), one of length
  0 removes its start from the candidates; a span may end against a later one (the two merge) and is cut at the
  utterance's end, so realised lengths are not exactly Poisson. When no start is left the sampler stops, even
  below η. The other words are text.
- `alternating_spans` (SpiritLM): text spans of 10–30 words and speech spans of 5–15 words in turn, from a
  random first modality.

A speech span keeps the units whose end time (cumulative duration × frame length) lies in [its first word's
start, its last word's end] — slamkit's bisect convention: pauses inside the span are kept; a unit straddling the
span's start (a de-duplicated pause unit often does) is kept whole, as is one ending exactly at that start, while
a unit straddling the span's end is dropped.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from slam_ray.lm.vocabulary import MergedVocabulary

Word = tuple[str, float, float]  # (word, start_s, end_s)


@dataclass(frozen=True)
class Span:
    """Words [start, stop) of an utterance in one modality."""

    modality: str  # "speech" or "text"
    start: int
    stop: int


def spans_of(is_speech: np.ndarray) -> list[Span]:
    """Maximal runs of one modality, in order."""
    out: list[Span] = []
    for i, flag in enumerate(is_speech.tolist()):
        modality = "speech" if flag else "text"
        if out and out[-1].modality == modality:
            out[-1] = Span(modality, out[-1].start, i + 1)
        else:
            out.append(Span(modality, i, i + 1))
    return out


@functools.lru_cache(maxsize=16)
def _poisson_cdf(lam: float, upto: int) -> np.ndarray:
    """P(X <= k) for k = 0..upto, X ~ Poisson(lam)."""
    pmf = np.empty(upto + 1)
    pmf[0] = math.exp(-lam)
    for k in range(1, upto + 1):
        pmf[k] = pmf[k - 1] * lam / k
    return np.minimum(np.cumsum(pmf), 1.0)


def slamkit_placements(n_words: int, rng: np.random.Generator, lam: float = 10.0, eta: float = 0.3
                       ) -> list[tuple[int, int]]:
    """The speech spans slamkit's sampler places, in placement order, as word ranges [start, stop) (module
    docstring); adjacent ones read as one span.

    slamkit draws a start and a length and throws the pair away when the span would overlap one placed before,
    until a pair fits; on a short utterance that can take thousands of draws (a Poisson(10) length rarely fits a
    gap of 2 words). This draws the pair that would first fit directly, with the same distribution: a start s
    with probability proportional to P(length <= gap(s)) (gap = words to the next span after s; unbounded when
    none follows, the span is then cut at the end), then the length from the Poisson truncated to the gap."""
    if not 0 < eta <= 1:
        raise ValueError(f"eta (the least speech share of an utterance's words) must be in (0, 1], not {eta}")
    if lam <= 0:
        raise ValueError(f"lam (the mean speech span length in words) must be > 0, not {lam}")
    speech = np.zeros(n_words, dtype=bool)
    eligible = np.ones(n_words, dtype=bool)  # starts left: not in a span, not right after one, no 0 drawn there
    cdf = _poisson_cdf(float(lam), n_words)
    placed: list[tuple[int, int]] = []
    target, selected = math.ceil(eta * n_words), 0
    while selected < target:
        starts = np.flatnonzero(eligible)
        if starts.size == 0:  # nowhere left to start a span: stop, below eta if need be (as slamkit does)
            break
        spoken = np.flatnonzero(speech)
        gaps = np.full(len(starts), -1)  # words to the first span word after each start; -1: no span follows
        if len(spoken):
            following = np.searchsorted(spoken, starts)
            gaps = np.where(following < len(spoken), spoken[np.minimum(following, len(spoken) - 1)] - starts, -1)
        fits = np.where(gaps >= 0, cdf[np.maximum(gaps, 0)], 1.0)  # P(a length drawn at s fits)
        cumulative = np.cumsum(fits)
        pick = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
        start, gap = int(starts[pick]), int(gaps[pick])
        if gap >= 0:  # the length given that it fits the gap: the Poisson's inverse CDF below the gap
            length = int(np.searchsorted(cdf[: gap + 1], rng.random() * cdf[gap], side="right"))
        else:
            length = int(rng.poisson(lam))
        stop = min(n_words, start + length)
        speech[start:stop] = True
        eligible[start : stop + 1] = False  # the span and the word right after it (a 0 draw: its start alone)
        if stop > start:
            placed.append((start, stop))
            selected += stop - start
    return placed


def slamkit_spans(n_words: int, rng: np.random.Generator, lam: float = 10.0, eta: float = 0.3) -> np.ndarray:
    """Which of `n_words` words are speech (a boolean mask), by slamkit's sampler."""
    speech = np.zeros(n_words, dtype=bool)
    for start, stop in slamkit_placements(n_words, rng, lam, eta):
        speech[start:stop] = True
    return speech


def alternating_spans(n_words: int, rng: np.random.Generator, text_words: tuple[int, int] = (10, 30),
                      speech_words: tuple[int, int] = (5, 15)) -> np.ndarray:
    """Which words are speech under SpiritLM's alternation of text and speech spans (lengths uniform, inclusive)."""
    speech = np.zeros(n_words, dtype=bool)
    spoken, i = bool(rng.integers(2)), 0
    while i < n_words:
        lo, hi = speech_words if spoken else text_words
        length = int(rng.integers(lo, hi + 1))
        speech[i : i + length] = spoken
        i, spoken = i + length, not spoken
    return speech


def unit_end_times(durations: Sequence[int] | np.ndarray, frame_rate: float) -> np.ndarray:
    """End time in seconds of each de-duplicated unit: its cumulative duration in frames over the frame rate."""
    return np.cumsum(np.asarray(durations, dtype=np.float64)) / frame_rate


def span_units(words: Sequence[Word], span: Span, ends: np.ndarray) -> tuple[int, int]:
    """Unit index range [first, last + 1) of a speech span: from the first unit ending at or after its first word's
    start to the last unit ending at or before its last word's end (empty when no unit fits)."""
    first_start, last_end = words[span.start][1], words[span.stop - 1][2]
    first = int(np.searchsorted(ends, first_start, side="left"))
    stop = int(np.searchsorted(ends, last_end, side="right"))
    return first, max(first, stop)


def interleaved_tokens(words: Sequence[Word], is_speech: np.ndarray, units: Sequence[int] | np.ndarray,
                       ends: np.ndarray, tokenizer, vocab: MergedVocabulary) -> list[tuple[Span, np.ndarray]]:
    """An aligned utterance as (span, token ids) pieces in order, each opened by its modality's marker: a text
    span is its words as running text (a leading space after the first span, as inside a sentence), tokenised by
    the text LM's tokenizer; a speech span is the units inside its words' times (`span_units`). Words are taken
    as given (slamkit's words carry their leading space, espeak's and whisper's too: strip them first for
    this joining)."""
    units = np.asarray(units, dtype=np.int64)
    pieces = []
    for span in spans_of(np.asarray(is_speech, dtype=bool)):
        if span.modality == "speech":
            first, stop = span_units(words, span, ends)
            body = vocab.unit_ids(units[first:stop])
            marker = vocab.speech_marker
        else:
            text = " ".join(w for w, _, _ in words[span.start : span.stop])
            body = np.asarray(tokenizer.encode(text if span.start == 0 else " " + text, add_special_tokens=False),
                              dtype=np.int64)
            if body.size and body.max() >= vocab.text_size:
                raise ValueError(f"the tokenizer gave id {int(body.max())} >= the vocabulary's text size {vocab.text_size}")
            marker = vocab.text_marker
        pieces.append((span, np.concatenate([[marker], body]).astype(np.int64)))
    return pieces
