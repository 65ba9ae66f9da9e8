from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from slam_ray.errors import SlamError
from slam_ray.evals import grammar
from slam_ray.lm.dpo_loss import (
    build_preference_batch,
    dpo_loss,
    preference_logps,
    preference_tokens,
    reference_logps,
    sequence_logps,
)
from slam_ray.lm.preferences import grammar_preference_triples, read_slamkit_preferences
from slam_ray.speech.units import BOS_ID, EOS_ID, PAD_ID, UNIT_OFFSET

VOCAB = 22  # 20 units


def tiny_lm(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval()


def rule_batch(rng: np.random.Generator, n: int):
    """Toy triples with a rule to learn: chosen continuations use even unit ids, rejected ones odd ids."""
    prompts = [rng.integers(UNIT_OFFSET, VOCAB, size=rng.integers(2, 6)).tolist() for _ in range(n)]
    lengths = [int(rng.integers(2, 6)) for _ in range(n)]
    chosen = [(2 * rng.integers(1, VOCAB // 2, size=k)).tolist() for k in lengths]
    rejected = [(2 * rng.integers(1, VOCAB // 2 - 1, size=k) + 1).tolist() for k in lengths]
    return build_preference_batch(prompts, chosen, rejected, context_len=16)


# --- the loss, by hand --------------------------------------------------------------------------------------

T = torch.tensor


def test_sigmoid_loss_matches_a_hand_computation():
    # pair 1: policy gains 1 nat on chosen, loses 1 on rejected -> beta * logits = 0.5 * 2 = 1
    # pair 2: chosen unchanged, rejected gains 1 nat -> beta * logits = 0.5 * -1 = -0.5
    loss, stats = dpo_loss(T([-10.0, -5.0]), T([-12.0, -4.0]), T([-11.0, -5.0]), T([-11.0, -5.0]), beta=0.5)
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(0.5))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["rewards/chosen"] == pytest.approx((0.5 + 0.0) / 2)
    assert stats["rewards/rejected"] == pytest.approx((-0.5 + 0.5) / 2)
    assert stats["rewards/accuracy"] == pytest.approx(0.5)
    assert stats["rewards/margin"] == pytest.approx((1.0 - 0.5) / 2)


def test_ipo_loss_matches_a_hand_computation():
    # per-token log-ratio differences: pair 1: 1/2 - (-1)/4 = 0.75; pair 2: 0/4 - 1/1 = -1
    # target: 1 / (2 * 0.5) = 1
    args = T([-10.0, -5.0]), T([-12.0, -4.0]), T([-11.0, -5.0]), T([-11.0, -5.0])
    loss, _ = dpo_loss(*args, beta=0.5, loss_type="ipo", chosen_lengths=T([2, 4]), rejected_lengths=T([4, 1]))
    assert loss.item() == pytest.approx(((0.75 - 1) ** 2 + (-1 - 1) ** 2) / 2)  # = 2.03125
    with pytest.raises(ValueError, match="ipo"):
        dpo_loss(*args, beta=0.5, loss_type="ipo")
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*args, beta=0.5, loss_type="hinge")


def test_nll_term_adds_the_chosen_mean_token_nll():
    args = T([-10.0, -5.0]), T([-12.0, -4.0]), T([-11.0, -5.0]), T([-11.0, -5.0])
    base, _ = dpo_loss(*args, beta=0.5)
    given, _ = dpo_loss(*args, beta=0.5, nll_weight=0.5, chosen_nll=T(2.0))
    assert given.item() == pytest.approx(base.item() + 1.0)
    # derived: 15 nats over 2 + 4 chosen tokens = 2.5 per token
    derived, stats = dpo_loss(*args, beta=0.5, nll_weight=0.5, chosen_lengths=T([2, 4]))
    assert derived.item() == pytest.approx(base.item() + 0.5 * 2.5)
    assert stats["loss/nll"] == pytest.approx(2.5)


def test_no_gradient_reaches_the_reference():
    pc, pr = T([-3.0], requires_grad=True), T([-4.0], requires_grad=True)
    rc, rr = T([-3.5], requires_grad=True), T([-3.5], requires_grad=True)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    loss.backward()
    assert pc.grad is not None and pc.grad.item() < 0 < pr.grad.item()
    assert rc.grad is None and rr.grad is None


# --- batches and log-probs ----------------------------------------------------------------------------------

def test_batch_layout_chosen_rows_first_and_mask_on_the_continuation():
    batch = build_preference_batch([[5, 6], [7]], [[8], [9, 10]], [[11, 12], [13]], context_len=32)
    assert batch.input_ids.tolist() == [
        [BOS_ID, 5, 6, 8, EOS_ID, PAD_ID],
        [BOS_ID, 7, 9, 10, EOS_ID, PAD_ID],
        [BOS_ID, 5, 6, 11, 12, EOS_ID],
        [BOS_ID, 7, 13, EOS_ID, PAD_ID, PAD_ID],
    ]
    assert batch.loss_mask.int().tolist() == [
        [0, 0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 1],
        [0, 0, 1, 1, 0, 0],
    ]
    chosen, rejected = batch.continuation_lengths()
    assert chosen.tolist() == [2, 3] and rejected.tolist() == [3, 2]


def test_truncation_keeps_the_prompt_end_then_cuts_the_continuation_end():
    # the longer continuation (3 units + EOS) leaves room for BOS + 1 prompt token: the LAST one, in both rows
    batch = build_preference_batch([[2, 3, 4, 5, 6]], [[7, 8]], [[9, 10, 11]], context_len=6)
    assert batch.input_ids.tolist() == [[BOS_ID, 6, 7, 8, EOS_ID, PAD_ID], [BOS_ID, 6, 9, 10, 11, EOS_ID]]
    assert batch.loss_mask.int().tolist() == [[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    # a continuation longer than the context on its own: the prompt goes, BOS stays, the end (EOS) is cut
    batch = build_preference_batch([[2, 3]], [[7, 8, 9, 10]], [[11]], context_len=4)
    assert batch.input_ids.tolist() == [[BOS_ID, 7, 8, 9], [BOS_ID, 11, EOS_ID, PAD_ID]]
    assert batch.loss_mask.int().tolist() == [[0, 1, 1, 1], [0, 1, 1, 0]]
    assert batch.input_ids.shape[1] <= 4


def test_preference_tokens_count_the_tokens_the_model_reads():
    # what the DPO token budget counts: the non-padding tokens of a triple's two rows, after truncation
    for prompt, chosen, rejected, context_len in [([2, 3, 4], [5, 6], [7], 64), ([2, 3, 4, 5, 6], [7, 8], [9, 10, 11], 6),
                                                  ([2, 3], [7, 8, 9, 10], [11], 4)]:
        batch = build_preference_batch([prompt], [chosen], [rejected], context_len)
        assert preference_tokens(prompt, chosen, rejected, context_len) == int((batch.input_ids != PAD_ID).sum())
    assert preference_tokens([2, 3, 4], [5, 6], [7], 64) == 2 * 4 + 3 + 2


def test_batch_rejects_special_ids_and_bad_shapes():
    with pytest.raises(ValueError, match="ids <"):
        build_preference_batch([[0, 3]], [[4]], [[5]], context_len=8)  # raw units, not vocabulary ids
    with pytest.raises(ValueError, match="need one each"):
        build_preference_batch([[2]], [[4]], [], context_len=8)
    with pytest.raises(ValueError, match="context_len"):
        build_preference_batch([[2]], [[4]], [[5]], context_len=1)


def test_sequence_logps_match_an_unpadded_forward_pass():
    model = tiny_lm()
    batch = rule_batch(np.random.default_rng(1), 4)
    got = sequence_logps(model, batch.input_ids, batch.loss_mask)
    for row in range(batch.input_ids.shape[0]):
        ids = batch.input_ids[row][batch.input_ids[row] != PAD_ID][None]
        mask = batch.loss_mask[row][: ids.shape[1]]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        logp = logp.gather(-1, ids[0, 1:, None])[:, 0]
        assert got[row].item() == pytest.approx(logp[mask[1:]].sum().item(), abs=1e-4)


# --- training -----------------------------------------------------------------------------------------------

def dpo_steps(policy, batches, refs, steps: int, lr: float, ref_model=None) -> list[float]:
    """`steps` AdamW steps of DPO over `batches` in turn; reference from `refs`, or live from `ref_model`."""
    opt = torch.optim.AdamW(policy.parameters(), lr=lr)
    policy.train()
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        if ref_model is None:
            ref_c, ref_r = refs[step % len(batches)]
        else:
            with torch.no_grad():
                ref_c, ref_r = preference_logps(ref_model, batch)
        pol_c, pol_r = preference_logps(policy, batch)
        loss, _ = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_precomputed_reference_gives_the_same_training_as_a_frozen_reference_model():
    ref = tiny_lm()
    rng = np.random.default_rng(2)
    batches = [rule_batch(rng, 4) for _ in range(2)]
    ref.train()
    refs = reference_logps(ref, batches)
    assert ref.training  # mode restored for a caller that passed its policy
    ref.eval()
    a, b = copy.deepcopy(ref), copy.deepcopy(ref)
    live = dpo_steps(a, batches, None, steps=4, lr=1e-2, ref_model=ref)
    precomputed = dpo_steps(b, batches, refs, steps=4, lr=1e-2)
    assert live == precomputed
    assert live[0] == pytest.approx(math.log(2))  # policy == reference at step 0
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_dpo_training_learns_the_preference_and_generalises():
    ref = tiny_lm()
    rng = np.random.default_rng(0)
    train = [rule_batch(rng, 8) for _ in range(4)]
    unseen = rule_batch(rng, 32)
    refs = reference_logps(ref, train)
    (unseen_ref_c, unseen_ref_r), = reference_logps(ref, [unseen])
    policy = copy.deepcopy(ref)

    def unseen_stats():
        with torch.no_grad():
            pol_c, pol_r = preference_logps(policy.eval(), unseen)
        return dpo_loss(pol_c, pol_r, unseen_ref_c, unseen_ref_r, beta=0.1)[1]

    before = unseen_stats()
    assert before["rewards/accuracy"] == 0.0 and before["rewards/margin"] == 0.0
    losses = dpo_steps(policy, train, refs, steps=30, lr=3e-3)
    after = unseen_stats()
    assert np.mean(losses[-4:]) < 0.5 * math.log(2)
    assert after["rewards/accuracy"] >= 0.9
    assert after["rewards/margin"] > 0.3
    assert after["rewards/chosen"] > 0 > after["rewards/rejected"]


# --- preference data ----------------------------------------------------------------------------------------

def test_grammar_triples_never_use_held_out_sentences():
    triples = grammar_preference_triples(1500, seed=0, held_out_percent=10)
    assert len({(t.prompt, t.chosen, t.rejected) for t in triples}) == 1500
    assert {t.task for t in triples} == set(grammar.TASKS)
    eval_sentences = set(grammar.generate_sentences(300, seed=0, held_out_percent=10, held_out=True))
    for task in grammar.TASKS:
        pairs = grammar.make_minimal_pairs(task, 200, seed=0, held_out_percent=10)
        eval_sentences |= {p.positive for p in pairs}
    for t in triples:
        good, bad = f"{t.prompt} {t.chosen}", f"{t.prompt} {t.rejected}"
        assert not grammar.is_held_out(good, 10) and not grammar.is_held_out(bad, 10)
        assert good not in eval_sentences
        assert t.prompt and t.chosen and t.rejected and t.chosen != t.rejected
    held = grammar_preference_triples(100, seed=0, held_out_percent=10, split="held_out")
    assert all(grammar.is_held_out(f"{t.prompt} {t.chosen}", 10) for t in held)


def test_grammar_triples_corrupt_only_the_continuation():
    known = grammar._known_words()
    for t in grammar_preference_triples(300, seed=1, held_out_percent=10):
        good, bad = t.chosen.split(), t.rejected.split()
        if t.task == "agreement":
            diff = [(a, b) for a, b in zip(good, bad, strict=True) if a != b]
            assert len(diff) == 1 and grammar._flip_number(diff[0][0]) == diff[0][1]
        elif t.task == "word_order":
            assert sorted(good) == sorted(bad)
        else:
            assert any(w not in known for w in bad)
    assert grammar_preference_triples(50, 3, 10) == grammar_preference_triples(50, 3, 10)
    with pytest.raises(ValueError, match="split"):
        grammar_preference_triples(5, 0, 10, split="test")


def test_reads_slamkit_preference_jsonl(tmp_path):
    rows = [
        {"prompt_path": "p0.wav", "chosen_path": "c0.wav", "rejected_path": "r0.wav",
         "prompt": {"units": [0, 17, 499], "duration": [2, 1, 3]},
         "chosen": {"units": [5], "duration": [4]},
         "rejected": {"units": [6, 7], "duration": [1, 1]}},
        {"prompt_path": "p1.wav", "chosen_path": "c1.wav", "rejected_path": "r1.wav",
         "prompt": {"audio_repr": "<Un3><Un4>"}, "chosen": "<Un8>",
         "rejected": {"units": [], "duration": []}},
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefs = read_slamkit_preferences(path)
    assert [p.prompt for p in prefs] == [[2, 19, 501], [5, 6]]
    assert [p.chosen for p in prefs] == [[7], [10]]
    assert [p.rejected for p in prefs] == [[8, 9], []]
    assert prefs[0].id == "prefs-0000000"
    batch = build_preference_batch([p.prompt for p in prefs], [p.chosen for p in prefs],
                                   [p.rejected for p in prefs], context_len=1024)
    # an empty continuation is just EOS
    assert batch.input_ids[3].tolist() == [BOS_ID, 5, 6, EOS_ID] + [PAD_ID] * 3
    assert batch.loss_mask.sum(1).tolist() == [2, 2, 3, 1]

    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt_path": "p.wav", "chosen_path": "c.wav"}) + "\n")
    with pytest.raises(SlamError, match="'prompt'"):
        read_slamkit_preferences(tmp_path / "bad.jsonl")
