"""Cross-modal comparisons (`slam_ray/evals/cross_modal.py`): the sequence of each direction, token by token."""

from __future__ import annotations

import pytest
from helpers import save_tiny_qwen25

from slam_ray.evals.cross_modal import cross_modal_comparisons, cross_modal_sequence
from slam_ray.lm.preferences import TextPreference
from slam_ray.lm.vocabulary import MergedVocabulary


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = save_tiny_qwen25(tmp_path_factory.mktemp("lm") / "lm", ["the dog runs", "the dogs run fast"])
    return AutoTokenizer.from_pretrained(folder)


def test_each_direction_is_context_then_continuation_with_a_marker_only_at_a_switch(tokenizer):
    vocab = MergedVocabulary.of(tokenizer, 10)
    prompt, rest = ("the dog", [1, 2]), ("runs", [3, 4, 5])
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    units = lambda u: [vocab.unit_offset + x for x in u]  # noqa: E731
    t, s = vocab.text_marker, vocab.speech_marker
    bos, eos = vocab.bos_id, vocab.eos_id
    expected = {
        ("text", "text"): ([bos, t, *enc("the dog"), *enc(" runs"), eos], 2 + len(enc("the dog"))),
        ("text", "speech"): ([bos, t, *enc("the dog"), s, *units([3, 4, 5]), eos], 3 + len(enc("the dog"))),
        ("speech", "text"): ([bos, s, *units([1, 2]), t, *enc(" runs"), eos], 5),
        ("speech", "speech"): ([bos, s, *units([1, 2]), *units([3, 4, 5]), eos], 4),
    }
    for (context, continuation), want in expected.items():
        assert cross_modal_sequence(context, continuation, prompt, rest, tokenizer, vocab) == want
    # the text pieces read back as the sentence
    tokens, first = expected[("text", "text")]
    assert tokenizer.decode(tokens[2:-1]) == "the dog runs" and tokenizer.decode(tokens[first:-1]) == " runs"


def test_comparisons_pair_the_grammatical_rest_against_the_corrupted_one_and_drop_unspoken_triples(tokenizer):
    vocab = MergedVocabulary.of(tokenizer, 10)
    triples = [TextPreference("a", "word_order", "the dog", "runs fast", "fast runs"),
               TextPreference("b", "agreement", "the dogs", "run", "runs")]
    units = {f"a-{p}": [1, 2] for p in ("prompt", "chosen", "rejected")}  # b was not spoken
    comparisons, sequences = cross_modal_comparisons(triples, units, "speech", "text", tokenizer, vocab)
    assert list(comparisons["item"]) == ["a"] and list(comparisons["kind"]) == ["word_order"]
    chosen, rejected = comparisons["positive"][0], comparisons["negatives"][0][0]
    assert sequences[chosen][1] == sequences[rejected][1]  # the same context, scored from the same index
    assert tokenizer.decode(sequences[chosen][0][sequences[chosen][1]:-1]) == " runs fast"
    text_only, _ = cross_modal_comparisons(triples, units, "text", "text", tokenizer, vocab)
    assert list(text_only["item"]) == ["a", "b"]  # text needs no speech
    with pytest.raises(ValueError, match="one of"):
        cross_modal_comparisons(triples, units, "audio", "text", tokenizer, vocab)
