from __future__ import annotations

import pytest
import torch

from slam_ray.config import ModelConfig
from slam_ray.errors import SlamError
from slam_ray.lm.model import build_model


def save_text_lm(path, tie: bool, dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=64, tie_word_embeddings=tie, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    model = Qwen2ForCausalLM(cfg)
    model.to(dtype).save_pretrained(path)
    return model


def save_pythia_lm(path):
    """A tiny GPT-NeoX (Pythia's architecture): untied head, partial rotary, real nn.Dropout modules."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5})
    model = GPTNeoXForCausalLM(cfg)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_twist_with_a_merged_vocabulary_keeps_every_text_row_and_appends_unit_marker_and_pad_rows(tmp_path, tie):
    """Interleaving: the text LM's rows all stay (text tokens keep their meaning), the model grows to the merged
    size with new rows near the old rows' mean (mean resizing), and the config carries the merged special ids."""
    from slam_ray.lm.vocabulary import MergedVocabulary

    text_lm = save_text_lm(tmp_path / "lm", tie)  # 300 rows
    vocab = MergedVocabulary(text_size=290, n_units=20, bos_id=5, eos_id=5)  # a tokenizer of 290 < 300 rows
    model = build_model(ModelConfig(init="twist", base=str(tmp_path / "lm")), vocab.size, vocabulary=vocab)
    emb, old = model.get_input_embeddings().weight, text_lm.get_input_embeddings().weight
    assert emb.shape == (vocab.size, 32) and vocab.size == 313
    assert torch.equal(emb[:300], old)  # every row the text LM had, the tokenizer's 290 included
    new = emb[300:]
    assert not torch.equal(new, torch.zeros_like(new))
    assert torch.allclose(new.mean(0), old.mean(0), atol=0.5 * old.std().item())  # drawn around the old mean
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (vocab.pad_id, 5, 5)
    if not tie:
        assert torch.equal(model.get_output_embeddings().weight[:300], text_lm.get_output_embeddings().weight)
    small = MergedVocabulary(text_size=400, n_units=20, bos_id=5, eos_id=5)  # a tokenizer bigger than the model
    with pytest.raises(SlamError, match="fewer than the 400 tokens"):
        build_model(ModelConfig(init="twist", base=str(tmp_path / "lm")), small.size, vocabulary=small)


@pytest.mark.parametrize("tie", [True, False])
def test_twist_init_keeps_the_text_lm_and_cuts_the_vocabulary(tmp_path, tie):
    text_lm = save_text_lm(tmp_path / "lm", tie)
    speech_lm = build_model(ModelConfig(init="twist", base=str(tmp_path / "lm"), rope_theta=10_000), vocab_size=52)
    emb = speech_lm.get_input_embeddings().weight
    assert emb.shape == (52, 32)
    assert torch.equal(emb, text_lm.get_input_embeddings().weight[:52])
    head = speech_lm.get_output_embeddings().weight
    assert head.shape == (52, 32)
    if tie:
        assert head.data_ptr() == emb.data_ptr()
    else:
        assert torch.equal(head, text_lm.get_output_embeddings().weight[:52])
    text_state = text_lm.state_dict()
    for name, value in speech_lm.state_dict().items():
        if "layers." in name:
            assert torch.equal(value, text_state[name]), name
    assert speech_lm.config.vocab_size == 52
    assert speech_lm.config.rope_parameters["rope_theta"] == 10_000
    # the checkpoint loads with plain transformers
    from transformers import AutoModelForCausalLM

    speech_lm.save_pretrained(tmp_path / "speech")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "speech")
    assert torch.equal(again.get_input_embeddings().weight, emb)


@pytest.mark.parametrize("saved_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_random_init_from_a_base_config_trains_in_fp32(tmp_path, saved_dtype):
    """The base's shape, not its weights, and fp32 whatever dtype its config records (Qwen2.5's bf16, pythia's
    fp16): built in that dtype, one AdamW step made fp16 weights -inf and bf16 rounded small updates away."""
    text_lm = save_text_lm(tmp_path / "lm", True, saved_dtype)
    model = build_model(ModelConfig(init="random", base=str(tmp_path / "lm")), vocab_size=40)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 40
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight.to(saved_dtype),
                           text_lm.model.layers[0].mlp.up_proj.weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    model(input_ids=torch.arange(2, 22).reshape(1, 20), labels=torch.arange(2, 22).reshape(1, 20)).loss.backward()
    optimizer.step()
    after = model.model.layers[0].mlp.up_proj.weight.detach()
    assert torch.isfinite(after).all() and (after != before).float().mean() > 0.9  # every weight moved


def test_missing_base_is_a_clear_error(tmp_path):
    with pytest.raises(SlamError, match="cannot load text LM"):
        build_model(ModelConfig(init="twist", base=str(tmp_path / "nothing")), vocab_size=10)


def test_attention_implementations_agree_and_a_missing_one_is_a_clear_error():
    """`sdpa` (default) and `eager` compute the same model; flash_attention_2 needs flash-attn and a GPU."""
    x = torch.arange(2, 50).reshape(2, 24)
    logits = {}
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64,
                                        attn_implementation=impl), vocab_size=52).eval()
        assert model.config._attn_implementation == impl
        with torch.no_grad():
            logits[impl] = model(input_ids=x).logits
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-4, atol=1e-5)
    if not torch.cuda.is_available():
        with pytest.raises(SlamError, match="flash_attention_2.*not available here.*sdpa"):
            build_model(ModelConfig(attn_implementation="flash_attention_2"), vocab_size=52)


def test_a_saved_checkpoint_reloads_in_fp32_with_the_runs_attention(tmp_path):
    """What DPO starts its policy, reference and reference-log-prob actors from: a bf16-saved checkpoint comes back
    fp32 (AdamW's weights) and with `train.model.attn_implementation` (the saved config does not keep it)."""
    from slam_ray.lm.model import load_checkpoint
    from slam_ray.stages.dpo import ReferenceLogps

    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64),
                        vocab_size=52)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "ckpt")
    for loaded in (load_checkpoint(str(tmp_path / "ckpt"), "eager"), ReferenceLogps(str(tmp_path / "ckpt"), False,
                                                                                    attn_implementation="eager").model):
        assert loaded.config._attn_implementation == "eager"
        assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert load_checkpoint(str(tmp_path / "ckpt")).config._attn_implementation == "sdpa"
    if not torch.cuda.is_available():
        with pytest.raises(SlamError, match="flash_attention_2.*not available here.*sdpa"):
            load_checkpoint(str(tmp_path / "ckpt"), "flash_attention_2")


@pytest.mark.parametrize("base", ["none", "qwen2_tied", "qwen2_untied_bf16", "pythia"])
def test_the_trained_model_is_the_model_its_checkpoint_reloads(tmp_path, base):
    """rope_theta and dropout reach the modules when the model is built (the rotary inv_freq and dropout
    modules are fixed then), so the object that trains and `AutoModelForCausalLM.from_pretrained` of its saved
    checkpoint are the same model: same inv_freq, same dropout, same logits — for a random init and for TWIST
    from tied, untied (saved in bf16) and GPT-NeoX text LMs whose own theta is 1e6 and dropout 0."""
    from transformers import AutoModelForCausalLM

    if base == "none":
        cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
    else:
        {"qwen2_tied": lambda p: save_text_lm(p, True), "qwen2_untied_bf16": lambda p: save_text_lm(p, False, torch.bfloat16),
         "pythia": save_pythia_lm}[base](tmp_path / "lm")
        cfg = ModelConfig(init="twist", base=str(tmp_path / "lm"))
    cfg = cfg.model_copy(update={"rope_theta": 10_000.0, "dropout": 0.25})
    model = build_model(cfg, vocab_size=52)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # AdamW's weights: fp32, whatever the base's

    def rotary(m):
        [inv_freq] = [b for name, b in m.named_buffers() if name.endswith(".inv_freq")]
        return inv_freq

    def dropouts(m):
        """p of every nn.Dropout module and every attention's dropout rate."""
        return ([mod.p for mod in m.modules() if isinstance(mod, torch.nn.Dropout)]
                + [mod.attention_dropout for mod in m.modules() if isinstance(getattr(mod, "attention_dropout", None), float)])

    # the theta this run asked for, not the base's 1e6: inv_freq[-1] = theta^(-(d-2)/d) over the rotary dims d
    inv_freq = rotary(model)
    d = 2 * len(inv_freq)
    torch.testing.assert_close(inv_freq[-1].item(), 10_000.0 ** (-(d - 2) / d))
    assert dropouts(model) and set(dropouts(model)) == {0.25}

    # train a few steps (dropout active), as the train stage does, then save the way it does
    x = torch.randint(2, 52, (4, 24))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path / "checkpoint")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint")
    assert torch.equal(rotary(again), inv_freq)
    assert dropouts(again) == dropouts(model)
    assert (again.get_output_embeddings().weight.data_ptr() == again.get_input_embeddings().weight.data_ptr()) == \
        (model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr())
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(input_ids=x).logits, model.eval()(input_ids=x).logits, rtol=0, atol=0)
