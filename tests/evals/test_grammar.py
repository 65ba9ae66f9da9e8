from __future__ import annotations

import pytest

from slam_ray.evals import grammar


def test_sentences_are_distinct_and_seeded():
    a = grammar.generate_sentences(3000, seed=0, held_out_percent=10)
    assert len(set(a)) == 3000
    assert a == grammar.generate_sentences(3000, seed=0, held_out_percent=10)
    assert a != grammar.generate_sentences(3000, seed=1, held_out_percent=10)


def test_training_and_held_out_sides_never_overlap():
    train = set(grammar.generate_sentences(4000, seed=0, held_out_percent=10))
    held = set(grammar.generate_sentences(300, seed=0, held_out_percent=10, held_out=True))
    assert not train & held
    for task in grammar.TASKS:
        for pair in grammar.make_minimal_pairs(task, 100, seed=3, held_out_percent=10):
            assert pair.positive not in train and pair.negative not in train
            assert grammar.is_held_out(pair.positive, 10)


def test_pairs_differ_as_their_task_says():
    known = grammar._known_words()
    for pair in grammar.make_minimal_pairs("lexical", 50, seed=0, held_out_percent=10):
        pos, neg = pair.positive.split(), pair.negative.split()
        diff = [(a, b) for a, b in zip(pos, neg, strict=False) if a != b]
        assert len(diff) >= 1 and all(b not in known for _, b in diff)
    for pair in grammar.make_minimal_pairs("word_order", 50, seed=0, held_out_percent=10):
        assert sorted(pair.positive.split()) == sorted(pair.negative.split())
        assert pair.positive != pair.negative
    for pair in grammar.make_minimal_pairs("agreement", 50, seed=0, held_out_percent=10):
        pos, neg = pair.positive.split(), pair.negative.split()
        diff = [(a, b) for a, b in zip(pos, neg, strict=True) if a != b]
        assert len(diff) == 1
        assert grammar._flip_number(diff[0][0]) == diff[0][1]


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown minimal-pair task"):
        grammar.make_minimal_pairs("semantics", 5, 0, 10)

