"""The shipped `slam` recipe in miniature, end to end through `slam-ray run slam`: only what a CPU and a few minutes
need is overridden (sizes, data paths, budgets, GPUs, `stages` with `dpo` added, the eval tasks). Its seams are the
real ones: TWIST from a Qwen2.5-shaped text LM folder with its tokenizer files (RoPE theta 1e6, cut to the recipe's
10,000), an mHuBERT-25Hz-shaped HuBERT with slamkit's sklearn k-means `.bin` centroids (`trust_pickle`), real speech
beside synthesized speech as extract's inputs, bf16 with document masking, DPO from a slamkit preference JSONL,
and eval on miniatures of the official releases plus `generate` with a vocoder and pocketsphinx. The eval results
are checked against a rescoring written here with plain transformers and sklearn and the official pairing rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import (
    FIXTURES,
    TINY_HIFIGAN,
    plain_nll,
    save_tiny_hubert,
    save_tiny_qwen25,
    save_tiny_text_lm,
    save_weight_normed,
    slamkit_jsonl,
    speak_wav,
)

from slam_ray.config import load_experiment
from slam_ray.core.stage_io import stage_dir, stage_payload
from slam_ray.core.storage import workdir_path
from slam_ray.core.tracking import flatten
from slam_ray.speech.audio import decode_audio

# own_ray: the CLI starts a local Ray of its own, as a user's run does; make test runs it in its second lane
pytestmark = [pytest.mark.ray, pytest.mark.own_ray, pytest.mark.slow]

LAYER, N_UNITS = 2, 24  # the tiny HuBERT has 3 layers; the real recipe reads layer 11 of 12 with 500 units
STAGES = ["extract", "pack", "train", "dpo", "eval"]


def hubert_layer(model, audio: np.ndarray) -> np.ndarray:
    """Layer LAYER's output for one utterance, with plain transformers (all layers computed, one read)."""
    with torch.no_grad():
        return model(torch.from_numpy(audio)[None], output_hidden_states=True).hidden_states[LAYER][0].numpy()


def dedup(units: np.ndarray) -> list[int]:
    return [int(u) for i, u in enumerate(units) if i == 0 or u != units[i - 1]]


def outcome(positive: float, negative: float) -> float:
    return 1.0 if positive < negative else 0.0 if positive > negative else 0.5


def official_scores(data: dict[str, Path], score) -> dict[str, float]:
    """Each task's accuracy by its release's own rules: ZeroSpeech 2021 pairs a correct and an incorrect file of
    the same id and voice (gold.csv) and averages an id's voices first; StoryCloze pairs `<n>_correct` with
    `<n>_incorrect`; SALMon prefers `sample_<n>_0` to the other files of sample n."""
    out = {}
    for task, part in (("swuggy", "lexical"), ("sblimp", "syntactic")):
        folder = data["zerospeech"] / part / "dev"
        gold = pd.read_csv(folder / "gold.csv")
        per_id: dict[int, list[float]] = {}
        for (item, _voice), rows in gold.groupby(["id", "voice"]):
            good = folder / f"{rows[rows.correct == 1].filename.iloc[0]}.wav"
            bad = folder / f"{rows[rows.correct == 0].filename.iloc[0]}.wav"
            per_id.setdefault(item, []).append(outcome(score(good), score(bad)))
        out[task] = float(np.mean([np.mean(v) for v in per_id.values()]))
    stories = sorted({int(p.stem.split("_")[0]) for p in data["ssc"].glob("*.wav")})
    out["ssc"] = float(np.mean([outcome(score(data["ssc"] / f"{n}_correct.wav"), score(data["ssc"] / f"{n}_incorrect.wav"))
                                for n in stories]))
    salmon = []
    for subset in ("gender_consistency", "speaker_consistency"):
        for first in sorted((data["salmon"] / subset).glob("sample_*_0.wav")):
            negatives = [score(p) for p in sorted(first.parent.glob(first.name.replace("_0.wav", "_*.wav"))) if p != first]
            salmon.append(outcome(score(first), min(negatives)))
    out["salmon"] = float(np.mean(salmon))
    return out


def test_the_slam_recipe_in_miniature_end_to_end(tmp_path, espeak, benchmark_layouts):
    import joblib
    from sklearn.cluster import MiniBatchKMeans
    from transformers import AutoModelForCausalLM, HubertModel

    from slam_ray.lm.packed import PackedWindows
    from slam_ray.speech.vocoder import UnitHifiGan
    from slam_ray.stages.train import window_inputs

    # --- what a user of the recipe brings: models, centroids, speech, preferences, benchmarks ----------------------
    text_lm = save_tiny_qwen25(tmp_path / "Qwen2.5-0.5B", ["the dog runs", "a cat sat on the mat", "one two three four"])
    hubert_dir = save_tiny_hubert(tmp_path / "mhubert-base-25hz", rate=25)
    hubert = HubertModel.from_pretrained(hubert_dir).eval()
    synthetic = tmp_path / "sTinyStories"  # synthesized speech, as the recipe's sTinyStories is
    subjects, verbs, things = ["the dog", "a cat", "my friend", "the old man"], ["sees", "finds", "likes"], \
        ["the ball", "a red box", "the little bird", "some bread", "the tree"]
    for i, (s, v, t) in enumerate((s, v, t) for s in subjects for v in verbs for t in things):
        speak_wav(synthetic / f"story_{i:03d}.wav", f"{s} {v} {t}", "en-us" if i % 2 else "en-gb")
    speech = [decode_audio(p) for p in sorted(FIXTURES.glob("*.flac")) + sorted(synthetic.glob("*.wav"))[:10]]
    kmeans = MiniBatchKMeans(n_clusters=N_UNITS, random_state=0, n_init=3).fit(
        np.concatenate([hubert_layer(hubert, a) for a in speech]))
    joblib.dump(kmeans, tmp_path / "km500.bin")  # slamkit/fairseq ship k-means as a joblib-pickled sklearn model
    rng = np.random.default_rng(0)
    tokens = lambda n: rng.integers(2, N_UNITS + 2, size=n).tolist()  # noqa: E731
    slamkit_jsonl(tmp_path / "spoken_swag.jsonl", [{"prompt": tokens(8), "chosen": tokens(10), "rejected": tokens(10)}
                                                   for _ in range(40)])
    data = benchmark_layouts
    torch.manual_seed(0)
    save_weight_normed(UnitHifiGan({**TINY_HIFIGAN, "num_embeddings": N_UNITS}), tmp_path / "vocoder")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"path": str(speak_wav(tmp_path / f"prompt{i}.wav", t)), "text": t}) + "\n"
                               for i, t in enumerate(["the dog runs in the park", "one two three four five"])))

    overrides = [
        f"workdir={tmp_path / 'work'}", f"stages={json.dumps(STAGES)}",
        "ray.actor_cpus=0.5", "ray.worker_cpus=1",  # two cores: fractional requests
        f"extract.inputs={json.dumps([str(FIXTURES), str(synthetic)])}",
        f"extract.tokenizer.model={hubert_dir}", f"extract.tokenizer.layer={LAYER}",
        f"extract.tokenizer.n_units={N_UNITS}", f"extract.tokenizer.centroids={tmp_path / 'km500.bin'}",
        "extract.tokenizer.trust_pickle=true", "extract.num_gpus_per_actor=0",
        "pack.context_len=64", "pack.val_fraction=0.1",
        f"train.model.base={text_lm}", "train.use_gpu=false", "train.batch_size=2", "train.grad_accum=2",
        "train.max_steps=8",
        f"dpo.inputs={json.dumps([str(tmp_path / 'spoken_swag.jsonl')])}", "dpo.grad_accum=1", "dpo.max_steps=4",
        "eval.tasks=" + json.dumps([{"task": "swuggy", "path": str(data["zerospeech"])},
                                    {"task": "sblimp", "path": str(data["zerospeech"])},
                                    {"task": "ssc", "path": str(data["ssc"])},
                                    {"task": "salmon", "path": str(data["salmon"]),
                                     "subsets": ["gender_consistency", "speaker_consistency"]},
                                    {"task": "generate", "path": str(prompts)}]),
        f"eval.generation.vocoder={tmp_path / 'vocoder'}", f"eval.generation.text_lm={save_tiny_text_lm(tmp_path / 'gpt')}",
        "eval.generation.max_new_tokens=20",
    ]
    run = subprocess.run([sys.executable, "-m", "slam_ray.cli", "run", "slam",
                          *(a for o in overrides for a in ("--set", o))],
                         cwd=tmp_path, capture_output=True, text=True, timeout=1200,
                         env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})  # a local Ray of its own
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    # --- the recipe as shipped, but for the overridden fields, is what ran ----------------------------------------
    exp = load_experiment("slam", overrides)
    recipe = load_experiment("slam")

    ran, shipped = flatten(exp.model_dump(mode="json")), flatten(recipe.model_dump(mode="json"))
    changed = {k for k in ran.keys() | shipped.keys() if ran.get(k) != shipped.get(k)}
    overridden = {o.split("=", 1)[0] for o in overrides}
    assert changed and all(any(k == o or k.startswith(o + ".") for o in overridden) for k in changed), changed
    assert exp.train.precision == "bf16" and exp.train.document_mask and exp.train.model.init == "twist"
    for stage in STAGES:
        manifest = stage_dir(exp, stage).read_manifest()
        assert manifest["status"] == "complete", (stage, manifest.get("error"))
        assert manifest["config"] == json.loads(json.dumps(stage_payload(exp, stage))), stage
    # both kinds of input came through: every file of each folder was encoded
    extracted = stage_dir(exp, "extract").read_manifest()["counts"]
    assert extracted["files"] == extracted["encoded"] == 2 + len(list(synthetic.glob("*.wav"))), extracted

    # --- TWIST: the text LM's transformer at the recipe's RoPE theta, cut to the unit vocabulary ------------------
    train_out = stage_dir(exp, "train").path
    base = AutoModelForCausalLM.from_pretrained(text_lm).state_dict()
    init = AutoModelForCausalLM.from_pretrained(train_out / "checkpoint_init")
    assert init.config.vocab_size == N_UNITS + 2 and init.config.rope_parameters["rope_theta"] == 10_000
    for name, value in init.state_dict().items():
        if "embed_tokens" in name or "lm_head" in name:
            torch.testing.assert_close(value, base[name][: N_UNITS + 2])  # the first rows kept, tied
        else:
            torch.testing.assert_close(value, base[name], msg=name)

    # --- the saved checkpoint is the model that trained: its validation loss (bf16, document masks) is the one the
    # worker measured on the trained object ---------------------------------------------------------------------
    trained = AutoModelForCausalLM.from_pretrained(train_out / "checkpoint").eval()
    val = PackedWindows(stage_dir(exp, "pack").path, "val")
    assert len(val) > 0
    losses, targets, threads = [], [], torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker (one CPU): bf16 sums in the same order
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for start in range(0, len(val), exp.train.batch_size):
                inputs = window_inputs(val, np.arange(start, min(start + exp.train.batch_size, len(val))),
                                       document_mask=True)
                losses.append(trained(**inputs).loss.item())
                targets.append(int((inputs["labels"][:, 1:] != -100).sum()))  # the batch's share of the mean
    finally:
        torch.set_num_threads(threads)
    worker = stage_dir(exp, "train").read_manifest()["metrics"]["val/loss_final"]
    assert np.average(losses, weights=targets) == pytest.approx(worker, rel=1e-4)

    # --- DPO trained on top of it, in the recipe's bf16 ----------------------------------------------------------
    dpo_out = stage_dir(exp, "dpo")
    assert dpo_out.read_manifest()["counts"]["steps"] == 4
    final = AutoModelForCausalLM.from_pretrained(dpo_out.path / "checkpoint").eval()
    before = AutoModelForCausalLM.from_pretrained(dpo_out.path / "checkpoint_before_dpo").state_dict()
    assert any(not torch.equal(v, before[k]) for k, v in final.state_dict().items())

    # --- eval: the results equal a rescoring by hand (plain HuBERT + sklearn units, plain transformers NLLs) -------
    results = json.loads((stage_dir(exp, "eval").path / "results.json").read_text())
    units_cache: dict[Path, list[int]] = {}

    def score(wav: Path) -> float:
        if wav not in units_cache:
            units_cache[wav] = dedup(kmeans.predict(hubert_layer(hubert, decode_audio(wav))))
        return plain_nll(final, units_cache[wav])

    expected = official_scores(data, score)
    # first the units: the eval stage's (its cache) are the ones computed here, so a difference shows where it starts
    cached = {}
    for cache in (workdir_path(exp) / "eval_units").glob("*/units.json"):
        cached.update(json.loads(cache.read_text())["units"])
    assert units_cache and all(cached[str(wav)] == units for wav, units in units_cache.items())
    for task, accuracy in expected.items():
        assert results[task]["accuracy"] == pytest.approx(accuracy), (task, results[task], accuracy)
        assert results[task]["ci95_low"] <= results[task]["accuracy"] <= results[task]["ci95_high"]
        assert f"{task}@before_dpo" in results and f"{task}@init" in results
    generated = results["generate"]
    assert generated["prompts"] == 2 and generated["samples"] == 2 and generated["transcripts"] == 2
