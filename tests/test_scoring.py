from __future__ import annotations

import numpy as np
import pytest
import torch

from slam_ray.scoring import accuracy_with_ci, pair_outcomes, sequence_nll
from slam_ray.units import units_to_tokens


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
