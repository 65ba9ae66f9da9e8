"""The scoring actor without Ray: what it returns equals `token_nll` in this process, speech-only marks included."""

from __future__ import annotations

import pandas as pd
import pytest

torch = pytest.importorskip("torch")


def test_the_nll_actor_scores_as_token_nll_does_with_speech_only_marks(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from slam_ray.lm.scoring import token_nll
    from slam_ray.parallel.nll import NllActor

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    model.save_pretrained(tmp_path / "lm")
    speech_ids = (5, 20, 2)
    sequences = [([1, 4, 5, 9, 12, 2], 2, True), ([1, 4, 5, 9, 12, 2], 2, False), ([1, 27, 8, 6, 2], 2, True)]
    batch = pd.DataFrame([{"checkpoint": str(tmp_path / "lm"), "key": f"k{i}", "tokens": t, "first": f, "speech_only": m}
                          for i, (t, f, m) in enumerate(sequences)])
    out = NllActor("mean", 2, speech_ids=speech_ids)(batch)
    expected = token_nll(model, sequences, "mean", 2, speech_ids=speech_ids)
    assert out["key"].tolist() == ["k0", "k1", "k2"]
    assert out["nll"].to_numpy() == pytest.approx(expected, rel=1e-6)
    assert expected[0] < expected[1]  # the mark changed the score
