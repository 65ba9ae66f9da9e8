from __future__ import annotations

import numpy as np
import pytest
import torch

from slam_ray.lm.scoring import accuracy_with_ci, pair_outcomes, sequence_nll
from slam_ray.speech.units import units_to_tokens


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=22, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval()


def reference_nll(model, units, convention):
    """One sequence, no padding, plain forward pass: NLL of every token after BOS (EOS included)."""
    ids = torch.from_numpy(units_to_tokens(units))[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
    nll = -logp.gather(-1, ids[0, 1:, None]).sum().item()
    return nll / (len(units) + 1) if convention == "mean" else nll


@pytest.mark.parametrize("convention", ["mean", "sum"])
def test_batched_nll_matches_a_plain_forward_pass(tiny_lm, convention):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 20, size=n).tolist() for n in (3, 17, 9, 1, 30, 12)]
    batched = sequence_nll(tiny_lm, seqs, convention, batch_size=4)
    expected = [reference_nll(tiny_lm, s, convention) for s in seqs]
    np.testing.assert_allclose(batched, expected, rtol=1e-4, atol=1e-4)


def test_ties_count_half():
    out = pair_outcomes(np.array([1.0, 2.0, 3.0]), np.array([2.0, 1.0, 3.0]))
    assert out.tolist() == [1.0, 0.0, 0.5]
    stats = accuracy_with_ci(out)
    assert stats["accuracy"] == pytest.approx(0.5) and stats["n"] == 3
    assert 0.0 <= stats["ci95_low"] < 0.5 < stats["ci95_high"] <= 1.0


def test_groups_score_one_only_when_the_positive_is_strictly_best():
    from slam_ray.lm.scoring import group_outcome

    assert group_outcome(1.0, [2.0, 3.0]) == 1.0
    assert group_outcome(2.5, [2.0, 3.0]) == 0.0
    assert group_outcome(2.0, [2.0, 3.0]) == 0.5  # a tie with one negative
    assert group_outcome(2.0, [2.0, 2.0]) == pytest.approx(1 / 3)  # a three-way tie
    assert group_outcome(1.0, [1.5]) == pair_outcomes(np.array([1.0]), np.array([1.5]))[0]


def test_aggregate_averages_voices_per_item_first_then_breaks_down():
    import pandas as pd

    from slam_ray.lm.scoring import aggregate

    scored = pd.DataFrame({"item": ["a", "a", "b", "b", "c", "c"], "voice": ["v1", "v2"] * 3,
                           "type": ["x", "x", "x", "x", "y", "y"], "outcome": [1, 0, 1, 1, 0, 0.5]})
    result = aggregate(scored, "item", ["type"])
    # items: a = 0.5, b = 1, c = 0.25 -> 0.5833 (a plain mean over the 6 comparisons would give 0.583 too,
    # so check n and the breakdown, which differ)
    assert result["accuracy"] == pytest.approx((0.5 + 1 + 0.25) / 3) and result["n"] == 3
    assert result["comparisons"] == 6
    assert result["by_type"]["x"]["accuracy"] == pytest.approx(0.75) and result["by_type"]["x"]["n"] == 2
    assert result["by_type"]["y"]["accuracy"] == pytest.approx(0.25) and result["by_type"]["y"]["n"] == 1
    flat = aggregate(scored, None, [])
    assert flat["n"] == 6


def test_ci_shrinks_with_n_and_is_the_binomial_one_for_0_1_outcomes():
    small = accuracy_with_ci(np.array([1, 0] * 10, dtype=float))
    large = accuracy_with_ci(np.array([1, 0] * 1000, dtype=float))
    assert small["ci95_high"] - small["ci95_low"] > large["ci95_high"] - large["ci95_low"]
    half = 1.96 * np.sqrt(0.25 / 20)
    assert small["ci95_low"] == pytest.approx(0.5 - half) and small["ci95_high"] == pytest.approx(0.5 + half)


def test_a_speech_only_sequence_is_scored_over_the_speech_ids_alone(tiny_lm):
    """A sequence marked speech only: its targets' log-probs renormalised over the unit ids and EOS (every other
    logit masked), so its NLL is the masked softmax's and below the whole vocabulary's; unmarked ones unchanged."""
    import torch

    from slam_ray.lm.scoring import token_nll

    vocab_size = tiny_lm.config.vocab_size
    offset, n_units, eos = 4, vocab_size - 6, 2  # ids 0, 1, 3 and the last two play text
    tokens = [1, 3, *range(offset, offset + 9), eos]
    both = token_nll(tiny_lm, [(tokens, 2), (tokens, 2, True)], speech_ids=(offset, n_units, eos))
    with torch.no_grad():
        logits = tiny_lm(torch.tensor([tokens])).logits[0, :-1].float()
    blocked = torch.ones(vocab_size, dtype=torch.bool)
    blocked[offset : offset + n_units] = False
    blocked[eos] = False
    for masked, row in ((False, 0), (True, 1)):
        scores = logits.masked_fill(blocked, float("-inf")) if masked else logits
        picked = torch.log_softmax(scores, -1)[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]
        assert both[row] == pytest.approx(float(-picked[1:].mean()), rel=1e-5)
    assert both[1] < both[0]
    with pytest.raises(ValueError, match="speech_ids"):
        token_nll(tiny_lm, [(tokens, 2, True)])
    with pytest.raises(ValueError, match="outside the units and EOS"):  # the marker (3) scored: first index 1
        token_nll(tiny_lm, [(tokens, 1, True)], speech_ids=(offset, n_units, eos))


def test_a_nan_score_is_an_error_not_a_tie_or_a_win():
    """NaN compares as neither more nor less likely: a pair with one scored as a tie (0.5), a group as the positive's
    win (1.0), so a model whose weights diverged still had an accuracy."""
    from slam_ray.lm.scoring import group_outcome

    with pytest.raises(ValueError, match="1 of 4 NLLs are NaN"):
        pair_outcomes(np.array([1.0, np.nan]), np.array([2.0, 0.5]))
    for positive, negatives in ((np.nan, [1.0]), (1.0, [np.nan, 2.0])):
        with pytest.raises(ValueError, match="NaN"):
            group_outcome(positive, negatives)
