"""Generation's actor without Ray: a model that ends its continuation at once (EOS first) said nothing — an empty
transcript and no audio file, not a failed task (found by the miniature `slam` run: a freshly DPO-tuned model
did it, and vocoding zero units raised "audio has no samples")."""

from __future__ import annotations

import pandas as pd
import torch
from helpers import TINY_HIFIGAN, save_weight_normed

from slam_ray.config import GenerationConfig


def test_an_empty_continuation_is_an_empty_transcript_and_a_prompt_is_still_spoken(tmp_path):
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from slam_ray.speech.vocoder import UnitHifiGan
    from slam_ray.stages.generation import GenerateActor

    n_units = 20
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=n_units + 2, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    # every id but EOS (1) suppressed: whatever it samples, the model ends at once
    model.generation_config = HFGenerationConfig(suppress_tokens=[i for i in range(n_units + 2) if i != 1])
    model.save_pretrained(tmp_path / "lm")
    save_weight_normed(UnitHifiGan({**TINY_HIFIGAN, "num_embeddings": n_units}), tmp_path / "vocoder")
    settings = {**GenerationConfig(vocoder=str(tmp_path / "vocoder"), max_new_tokens=5).model_dump(mode="json"),
                "wer": False}
    batch = pd.DataFrame([{"key": "p-0", "id": "p", "sample": 0, "seed": 1, "units": list(range(12))}])

    row = GenerateActor(str(tmp_path / "lm"), settings, str(tmp_path / "audio"))(batch).iloc[0]
    assert row["units"] == [] and row["transcript"] == "" and row["audio"] is None
    assert not (tmp_path / "audio").exists()

    # with the prompt kept (drop_prompt false) there is speech to vocode and transcribe, empty continuation or not
    row = GenerateActor(str(tmp_path / "lm"), {**settings, "drop_prompt": False}, str(tmp_path / "audio"))(batch).iloc[0]
    assert row["units"] == [] and isinstance(row["transcript"], str) and (tmp_path / "audio" / "p-0.wav").is_file()


def test_an_interleaved_model_continues_a_spoken_prompt_in_units_only(tmp_path):
    """A merged vocabulary (64 text ids, 20 units, markers, pad): the same random model samples text ids when
    unconstrained, but the actor's continuations are units alone (text ids masked), its prompt `BOS <speech> units`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from slam_ray.lm.vocabulary import MergedVocabulary
    from slam_ray.stages.generation import GenerateActor

    vocab = MergedVocabulary(text_size=64, n_units=20, bos_id=3, eos_id=2)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab.size, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    model.save_pretrained(tmp_path / "lm")
    settings = {**GenerationConfig(max_new_tokens=40, top_k=vocab.size).model_dump(mode="json"), "wer": False}
    prompt = list(range(12))
    batch = pd.DataFrame([{"key": f"p-{k}", "id": "p", "sample": k, "seed": k, "units": prompt} for k in range(4)])

    actor = GenerateActor(str(tmp_path / "lm"), settings, str(tmp_path / "audio"), vocabulary=vocab.index_entry())
    prompts_seen = []
    generate = actor.model.generate
    actor.model.generate = lambda **kw: prompts_seen.append(kw["input_ids"][0].tolist()) or generate(**kw)
    rows = actor(batch)
    # the prompt as interleaved training reads speech: BOS <speech>, then the units in the merged ids
    assert prompts_seen[0] == [vocab.bos_id, vocab.speech_marker, *vocab.unit_ids(prompt).tolist()]
    continuations = rows["units"].tolist()
    assert sum(map(len, continuations)) > 20
    assert all(0 <= u < vocab.n_units for units in continuations for u in units)

    ids = torch.tensor([[vocab.bos_id, vocab.speech_marker, *vocab.unit_ids(prompt).tolist()]])
    torch.manual_seed(0)
    free = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=vocab.size,
                          max_new_tokens=40, eos_token_id=vocab.eos_id, pad_token_id=vocab.pad_id)[0, ids.shape[1]:]
    assert (free < vocab.unit_offset).any()  # unconstrained, the model wanders into text


def test_one_modality_sampling_leaves_exactly_its_ids_and_eos():
    from slam_ray.lm.vocabulary import MergedVocabulary
    from slam_ray.stages.generation import OneModality

    vocab = MergedVocabulary(text_size=64, n_units=20, bos_id=3, eos_id=2)
    for modality, allowed in (("speech", {vocab.eos_id, *range(vocab.unit_offset, vocab.unit_offset + vocab.n_units)}),
                              ("text", set(range(vocab.text_size)))):
        scores = OneModality(vocab, modality)(None, torch.zeros(2, vocab.size))
        assert {int(i) for i in torch.isfinite(scores[1]).nonzero().flatten()} == allowed, modality
        assert torch.equal(torch.isfinite(scores[0]), torch.isfinite(scores[1]))
    # a text tokenizer's special tokens stay out of a text continuation
    scores = OneModality(vocab, "text", [5, 7])(None, torch.zeros(1, vocab.size))
    assert {int(i) for i in torch.isfinite(scores[0]).nonzero().flatten()} == set(range(vocab.text_size)) - {5, 7}


def test_an_interleaved_model_continues_a_spoken_prompt_in_text(tmp_path):
    """modality text: after `BOS <speech> units <text>` only text ids are sampled (the same random model wanders
    into units unconstrained), decoded by the text tokenizer into the transcript; nothing is vocoded."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from slam_ray.lm.vocabulary import GRAMMAR_TOKENIZER, MergedVocabulary, grammar_tokenizer
    from slam_ray.stages.generation import GenerateActor

    tokenizer = grammar_tokenizer()
    vocab = MergedVocabulary.of(tokenizer, 20)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab.size, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    model.save_pretrained(tmp_path / "lm")
    settings = {**GenerationConfig(max_new_tokens=30, top_k=vocab.size, modality="text").model_dump(mode="json"),
                "wer": False}
    prompt = list(range(12))
    batch = pd.DataFrame([{"key": f"p-{k}", "id": "p", "sample": k, "seed": k, "units": prompt} for k in range(3)])
    actor = GenerateActor(str(tmp_path / "lm"), settings, str(tmp_path / "audio"), vocabulary=vocab.index_entry(),
                          text_tokenizer=GRAMMAR_TOKENIZER)
    prompts_seen = []
    generate = actor.model.generate
    actor.model.generate = lambda **kw: prompts_seen.append(kw["input_ids"][0].tolist()) or generate(**kw)
    rows = actor(batch)
    assert prompts_seen[0] == [vocab.bos_id, vocab.speech_marker, *vocab.unit_ids(prompt).tolist(), vocab.text_marker]
    ids = rows["text_ids"].tolist()
    assert sum(map(len, ids)) > 20 and all(0 <= i < vocab.text_size for row in ids for i in row)
    assert not set(tokenizer.all_special_ids) & {i for row in ids for i in row}  # no special token sampled
    for row, text in zip(ids, rows["transcript"], strict=True):
        assert text == tokenizer.decode(row, skip_special_tokens=True).strip()
    assert any(rows["transcript"]) and rows["units"].map(len).sum() == 0 and rows["audio"].isna().all()

    ids_in = torch.tensor([prompts_seen[0]])
    torch.manual_seed(0)
    free = model.generate(input_ids=ids_in, attention_mask=torch.ones_like(ids_in), do_sample=True, top_k=vocab.size,
                          max_new_tokens=30, eos_token_id=vocab.eos_id, pad_token_id=vocab.pad_id)[0, ids_in.shape[1]:]
    assert (free >= vocab.text_size).any()  # unconstrained, it samples units and markers too



def test_prompts_with_one_file_name_in_two_subfolders_are_two_prompts_and_a_repeated_id_is_named(tmp_path):
    """A folder of prompts is searched recursively: a/1.wav and b/1.wav were both id '1' (one audio file written
    twice, two rows with one key); now a__1 and b__1. Two JSONL lines with one id are an error naming both."""
    import json

    import pytest

    from slam_ray.errors import SlamError
    from slam_ray.stages.generation import _prompt_sources

    for sub in ("a", "b"):
        (tmp_path / "prompts" / sub).mkdir(parents=True)
        (tmp_path / "prompts" / sub / "1.wav").write_bytes(b"")
    (tmp_path / "prompts" / "2.wav").write_bytes(b"")
    assert sorted(r["id"] for r in _prompt_sources(str(tmp_path / "prompts"), 10)) == ["2", "a__1", "b__1"]
    manifest = tmp_path / "p.jsonl"
    manifest.write_text("".join(json.dumps({"path": f"{sub}/1.wav"}) + "\n" for sub in ("a", "b")))
    with pytest.raises(SlamError, match=r"two prompts .* have the id '1' \(.*a/1\.wav and .*b/1\.wav\)"):
        _prompt_sources(str(manifest), 10)
