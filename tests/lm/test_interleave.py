"""Interleaving's span samplers and the units a spoken span keeps (no Ray, no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slam_ray.lm.interleave import (
    Span,
    alternating_spans,
    slamkit_placements,
    slamkit_spans,
    span_units,
    spans_of,
    unit_end_times,
)


def test_slamkit_spans_never_overlap_nor_start_inside_or_right_after_a_span_and_reach_the_share():
    rng = np.random.default_rng(0)
    reached = {0.1: [], 0.3: [], 0.5: []}
    for n in rng.integers(1, 120, size=2000).tolist():
        eta = float(rng.choice(list(reached)))
        placed = slamkit_placements(n, rng, lam=10.0, eta=eta)
        mask = np.zeros(n, dtype=bool)
        for start, stop in placed:
            assert 0 <= start < stop <= n
            assert not mask[start:stop].any()  # a draw overlapping an earlier span is thrown away, not cut
            assert not (start > 0 and mask[start - 1])  # never on the word right after a span
            mask[start:stop] = True
        if mask.sum() >= math.ceil(eta * n):
            # the last span placed is what crossed the share: without it the share was not reached
            assert mask.sum() - (placed[-1][1] - placed[-1][0]) < math.ceil(eta * n)
        reached[eta].append(mask.sum() >= math.ceil(eta * n))
        assert np.array_equal(slamkit_spans(n, np.random.default_rng(n), 10.0, eta),
                              slamkit_spans(n, np.random.default_rng(n), 10.0, eta))  # seeded
    # it stops below the share only when no start is left (short utterances, large shares): rarely
    assert all(np.mean(v) > 0.95 for v in reached.values()), {k: np.mean(v) for k, v in reached.items()}


def test_slamkit_span_lengths_are_poisson_where_nothing_cuts_them():
    """On a long utterance with a small share a draw rarely meets a span, so the lengths placed are Poisson(lambda)
    (mean and variance lambda; a zero draw places nothing)."""
    lengths = []
    for seed in range(20):
        n = 20_000
        for start, stop in slamkit_placements(n, np.random.default_rng(seed), lam=10.0, eta=0.05):
            if stop < n:
                lengths.append(stop - start)
    lengths = np.array(lengths)
    assert len(lengths) > 1500
    assert lengths.mean() == pytest.approx(10.0, abs=0.3)
    assert lengths.var() == pytest.approx(10.0, rel=0.15)
    assert lengths.min() >= 1 and lengths.max() < 30


def test_alternating_spans_take_turns_within_their_length_ranges():
    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(rng.integers(1, 200))
        runs = spans_of(alternating_spans(n, rng))
        assert runs[0].start == 0 and runs[-1].stop == n
        for a, b in zip(runs, runs[1:], strict=False):
            assert a.modality != b.modality and a.stop == b.start
        for run in runs[:-1]:  # the last may be cut by the utterance's end
            lo, hi = (5, 15) if run.modality == "speech" else (10, 30)
            assert lo <= run.stop - run.start <= hi


def test_a_speech_span_keeps_exactly_the_units_inside_its_words_times():
    # 25 Hz units: durations in frames -> end times 0.08, 0.16, 0.40, 0.52, 0.60, 1.00, 1.20
    durations = [2, 2, 6, 3, 2, 10, 5]
    ends = unit_end_times(durations, 25)
    np.testing.assert_allclose(ends, [0.08, 0.16, 0.40, 0.52, 0.60, 1.00, 1.20])
    words = [("the", 0.05, 0.16), ("big", 0.20, 0.52), ("dog", 0.55, 1.00), ("barks", 1.02, 1.20)]
    # "big dog": units ending in [0.20, 1.00]: 0.40, 0.52, 0.60, 1.00
    assert span_units(words, Span("speech", 1, 3), ends) == (2, 6)
    # "the": [0.05, 0.16]: 0.08, 0.16 (an end exactly at the word's end is inside)
    assert span_units(words, Span("speech", 0, 1), ends) == (0, 2)
    # "barks": [1.02, 1.20]: 1.20 only
    assert span_units(words, Span("speech", 3, 4), ends) == (6, 7)
    # slamkit's convention at the edges: a unit ending exactly at the span's first word's start is kept (its end
    # is inside), one straddling the last word's end is dropped ("dog" [0.55, 0.95] ends inside unit 5's 0.60-1.00)
    assert span_units([("x", 0.16, 0.40)], Span("speech", 0, 1), ends) == (1, 3)
    assert span_units([("dog", 0.55, 0.95)], Span("speech", 0, 1), ends) == (4, 5)
    # a word too short for any unit to end inside it keeps none
    assert span_units([("a", 0.41, 0.45)], Span("speech", 0, 1), ends) == (3, 3)


def test_span_units_on_random_alignments_match_a_scan_of_every_unit():
    rng = np.random.default_rng(2)
    for _ in range(300):
        durations = rng.integers(1, 8, size=int(rng.integers(1, 60)))
        ends = unit_end_times(durations, 25)
        bounds = np.sort(rng.uniform(0, ends[-1] + 0.2, size=2 * int(rng.integers(1, 10))))
        words = [(f"w{i}", float(bounds[2 * i]), float(bounds[2 * i + 1])) for i in range(len(bounds) // 2)]
        start = int(rng.integers(len(words)))
        span = Span("speech", start, int(rng.integers(start + 1, len(words) + 1)))
        first, stop = span_units(words, span, ends)
        inside = [i for i, e in enumerate(ends) if words[span.start][1] <= e <= words[span.stop - 1][2]]
        assert list(range(first, stop)) == inside


def test_bad_sampler_settings_name_the_setting():
    with pytest.raises(ValueError, match="eta"):
        slamkit_placements(10, np.random.default_rng(0), eta=0)
    with pytest.raises(ValueError, match="lam"):
        slamkit_placements(10, np.random.default_rng(0), lam=0)


def tiny_tokenizer():
    """A byte-level BPE trained here, as a Hugging Face fast tokenizer (what a text LM's folder holds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the big dog barks at the cat", "a small bird sings"] * 20,
                            trainers.BpeTrainer(vocab_size=120, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def test_interleaved_tokens_round_trip_to_their_words_and_units_and_ids_never_collide():
    from slam_ray.lm.interleave import MergedVocabulary, interleaved_tokens

    tokenizer = tiny_tokenizer()
    vocab = MergedVocabulary(text_size=len(tokenizer), n_units=50)
    assert vocab.unit_offset == len(tokenizer) and vocab.size == len(tokenizer) + 53
    assert len({vocab.text_marker, vocab.speech_marker, vocab.pad_id, vocab.unit_offset, vocab.unit_offset + 49}) == 5
    assert vocab.pad_id == vocab.size - 1 and vocab.text_marker > vocab.unit_offset + 49

    rng = np.random.default_rng(3)
    durations = rng.integers(1, 6, size=80)
    units = rng.integers(0, 50, size=80)
    ends = unit_end_times(durations, 25)
    names = ["the", "big", "dog", "barks", "at", "the", "cat", "a", "small", "bird", "sings"]
    edges = np.linspace(0, ends[-1], len(names) + 1)
    words = [(w, float(edges[i]), float(edges[i + 1])) for i, w in enumerate(names)]
    for seed in range(50):
        mask = slamkit_spans(len(words), np.random.default_rng(seed), lam=3.0, eta=0.3)
        pieces = interleaved_tokens(words, mask, units, ends, tokenizer, vocab)
        assert [p[0] for p in pieces] == spans_of(mask)
        for span, ids in pieces:
            body = ids[1:]
            if span.modality == "speech":
                assert ids[0] == vocab.speech_marker
                assert ((body >= vocab.unit_offset) & (body < vocab.text_marker)).all()
                first, stop = span_units(words, span, ends)
                assert np.array_equal(body - vocab.unit_offset, units[first:stop])
            else:
                assert ids[0] == vocab.text_marker and (body < vocab.text_size).all()
                assert tokenizer.decode(body.tolist()).strip() == " ".join(names[span.start : span.stop])
    with pytest.raises(ValueError, match="units must be in"):
        vocab.unit_ids([50])


def rejection_placements(n_words: int, rng: np.random.Generator, lam: float = 10.0, eta: float = 0.3):
    """slamkit's loop as it is written: draw a start and a Poisson length, throw the pair away on overlap."""
    speech, eligible, placed = np.zeros(n_words, bool), np.ones(n_words, bool), []
    target, selected = int(np.ceil(eta * n_words)), 0
    while selected < target:
        starts = np.flatnonzero(eligible)
        if starts.size == 0:
            break
        start = int(rng.choice(starts))
        stop = min(n_words, start + int(rng.poisson(lam)))
        if speech[start:stop].any():
            continue
        speech[start:stop] = True
        eligible[start : stop + 1] = False
        if stop > start:
            placed.append((start, stop))
            selected += stop - start
    return placed


@pytest.mark.parametrize("n_words", [4, 9, 25])
def test_the_direct_sampler_places_spans_as_slamkits_rejection_loop_does(n_words):
    """`slamkit_placements` draws the first pair that would fit instead of redrawing (thousands of draws on short
    utterances): over 4,000 seeded utterances each, the same means as the loop (within 4 standard errors) of the
    span count, the first span's start and length, the second span's start and length, the speech words and the
    share of utterances that reach eta. (A mutant that cuts an overlapping draw instead fails this.)"""
    def features(placements) -> list[float]:
        first = placements[0] if placements else (0, 0)
        second = placements[1] if len(placements) > 1 else (0, 0)
        spoken = sum(b - a for a, b in placements)
        return [len(placements), first[0], first[1] - first[0], second[0], second[1] - second[0], spoken,
                spoken >= math.ceil(0.3 * n_words)]

    direct = np.array([features(slamkit_placements(n_words, np.random.default_rng(i))) for i in range(4000)], float)
    loop = np.array([features(rejection_placements(n_words, np.random.default_rng(10**6 + i))) for i in range(4000)],
                    float)
    se = np.sqrt(direct.var(0) / len(direct) + loop.var(0) / len(loop)) + 1e-12
    z = np.abs(direct.mean(0) - loop.mean(0)) / se
    assert (z < 4).all(), (n_words, z.round(2), direct.mean(0).round(3), loop.mean(0).round(3))
