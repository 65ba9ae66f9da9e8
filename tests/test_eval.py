"""The eval stage on a real local Ray: miniature official layouts spoken by espeak-ng, every checkpoint of a
training run, a missing dataset that does not stop the other tasks, and generation with a vocoder + ASR."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import make_benchmark_layouts, save_tiny_text_lm, small_experiment, speak_wav

from slam_ray.config import with_values
from slam_ray.runner import stage_function
from slam_ray.stage_io import StageDir, stage_dir, stage_payload

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_local, espeak):
    """A tiny experiment trained for 30 steps with a checkpoint every 10, plus the miniature layouts."""
    root = tmp_path_factory.mktemp("eval")
    exp = small_experiment(root / "work", train={"max_steps": 30, "checkpoint_every": 10})
    for stage in ("synth", "extract", "pack", "train"):
        stage_function(stage)(exp)
    return exp, make_benchmark_layouts(root / "data")


def plain_nll(model, units: list[int]) -> float:
    """slamkit's convention by hand: mean NLL of every token after BOS, EOS included, one unpadded sequence."""
    ids = torch.tensor([[1, *(u + 2 for u in units), 1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return -logp.gather(-1, ids[0, 1:, None]).mean().item()


def test_every_task_and_checkpoint_with_a_missing_dataset(trained, tmp_path):
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    exp, data = trained
    tasks = ["lexical", {"task": "swuggy", "path": str(data["zerospeech"])},
             {"task": "sblimp", "path": str(data["zerospeech"])}, {"task": "ssc", "path": str(data["ssc"])},
             {"task": "salmon", "path": str(data["salmon"]), "subsets": ["gender_consistency", "speaker_consistency"]},
             {"task": "manifest", "path": str(data["manifest"]), "name": "mine"},
             {"task": "tsc", "path": str(tmp_path / "not_downloaded")}]
    exp = with_values(exp, {"eval.tasks": tasks, "eval.checkpoints": ["final", "init", "all"], "eval.num_actors": 2},
                      "test")
    out = stage_function("eval")(exp)
    results = json.loads((out.path / "results.json").read_text())

    assert "does not exist" in results["tsc"]["error"]  # reported, and every other task still ran
    errors = [json.loads(line) for line in out.errors_path.read_text().splitlines()]
    assert any(e["task"] == "tsc" for e in errors)
    expect = {"lexical": (12, 12), "swuggy": (4, 8), "sblimp": (3, 6), "ssc": (3, 3), "salmon": (6, 6), "mine": (2, 2)}
    for task, (n_items, n_comparisons) in expect.items():
        for suffix in ("", "@init", "@step_0", "@step_10", "@step_20", "@step_30"):
            r = results[f"{task}{suffix}"]
            assert (r["n"], r["comparisons"]) == (n_items, n_comparisons), (task, suffix)
            assert 0 <= r["ci95_low"] <= r["accuracy"] <= r["ci95_high"] <= 1 and r["convention"] == "mean"
    assert set(results["swuggy"]["by_frequency_band"]) == {"oov", "1-5", "21-100", ">100"}
    assert set(results["sblimp"]["by_type"]) == {"agreement", "word_order"}
    assert set(results["salmon"]["by_subset"]) == {"gender_consistency", "speaker_consistency"}
    assert results["mine@step_30"]["checkpoint"] != results["mine"]["checkpoint"]
    # the step-30 checkpoint of the run holds the final weights: same scores
    assert results["swuggy@step_30"]["accuracy"] == results["swuggy"]["accuracy"]
    assert (out.path / "learning_curve.png").stat().st_size > 1000

    # per-comparison scores: outcomes follow the NLLs, and an NLL equals a plain forward pass on the units
    scores = pd.read_csv(out.path / "scores.csv")
    final = scores[scores["checkpoint"] == "final"]
    group = final[final["task"] == "mine"].iloc[1]
    negatives = json.loads(group["nll_negatives"])
    assert len(negatives) == 2 and group["outcome"] == (1.0 if group["nll_positive"] < min(negatives) else 0.0)
    units = {}  # one cache per task's file list
    for cache in (exp.workdir_path / "eval_units").glob("*/units.json"):
        units.update(json.loads(cache.read_text())["units"])
    model = AutoModelForCausalLM.from_pretrained(stage_dir(exp, "train").path / "checkpoint").eval()
    for row in final[final["task"].isin(["ssc", "swuggy"])].head(4).itertuples():
        assert row.nll_positive == pytest.approx(plain_nll(model, units[row.positive]), rel=1e-4)

    # MLflow: accuracies, breakdowns and the learning curve by step
    client = MlflowClient(exp.tracking_uri)
    experiment = client.get_experiment_by_name(exp.name)
    run = client.search_runs([experiment.experiment_id], "tags.`slam_ray.stage` = 'eval'")[0]
    assert run.data.metrics["eval/swuggy/accuracy"] == pytest.approx(results["swuggy"]["accuracy"])
    assert "eval/swuggy/by_frequency_band/gt100/accuracy" in run.data.metrics
    curve = client.get_metric_history(run.info.run_id, "eval/sblimp/curve_accuracy")
    assert sorted(m.step for m in curve) == [0, 10, 20, 30]

    # a checkpoint folder given by path needs no training stage in the payload
    alone = with_values(exp, {"eval.tasks": [tasks[3]], "eval.checkpoints": [str(stage_dir(exp, "train").path / "checkpoint")]},
                        "test")
    assert "train" not in stage_payload(alone, "eval")
    again = json.loads((stage_function("eval")(alone).path / "results.json").read_text())
    assert again["ssc@checkpoint"]["accuracy"] == results["ssc"]["accuracy"]


def test_generation_with_vocoder_asr_and_text_lm(trained, tmp_path):
    from test_vocoder import TINY, save_weight_normed

    from slam_ray.generation import run_generation
    from slam_ray.vocoder import UnitHifiGan

    exp, data = trained
    torch.manual_seed(0)
    save_weight_normed(UnitHifiGan({**TINY, "num_embeddings": exp.extract.tokenizer.n_units}), tmp_path / "vocoder")
    text_lm = save_tiny_text_lm(tmp_path / "text_lm")
    prompts = tmp_path / "prompts.jsonl"
    texts = ["the dog runs in the park", "one two three four five six"]
    prompts.write_text("".join(json.dumps({"path": str(speak_wav(tmp_path / f"p{i}.wav", t)), "text": t}) + "\n"
                               for i, t in enumerate(texts)))
    gen = {"vocoder": str(tmp_path / "vocoder"), "text_lm": str(text_lm), "max_new_tokens": 20,
           "samples_per_prompt": 2, "prompt_seconds": 1.0}
    exp = with_values(exp, {"eval.tasks": [{"task": "generate", "path": str(prompts)}], "eval.checkpoints": ["final"],
                            **{f"eval.generation.{k}": v for k, v in gen.items()}}, "test")
    out = stage_function("eval")(exp)
    result = json.loads((out.path / "results.json").read_text())["generate"]
    rows = [json.loads(line) for line in (out.path / "generate" / "generated.jsonl").read_text().splitlines()]

    assert result["prompts"] == 2 and result["samples"] == len(rows) == 4
    assert result["settings"]["max_new_tokens"] == 20 and result["settings"]["vocoder"] == gen["vocoder"]
    for row in rows:
        assert 0 < len(row["prompt_units"]) <= 25 * 1.0 + 1 and len(row["units"]) <= 20
        assert all(0 <= u < exp.extract.tokenizer.n_units for u in row["units"])
        if row["units"]:  # drop_prompt: only the continuation is vocoded, 20 samples per unit
            assert sf.info(row["audio"]).frames == 20 * len(row["units"])
    assert result["transcripts"] == 4 and 0 <= result["empty_transcripts"] <= 4
    if result["empty_transcripts"] < 4:
        assert math.isfinite(result["genppl"]) and 0 <= result["auto_bleu_2"] <= 1
    assert 0 <= result["asr_wer"] < 0.7  # pocketsphinx on the espeak prompts, whose text the manifest gives

    # seeded: the same samples again, from 2 actors instead of 1
    again = run_generation(with_values(exp, {"eval.num_actors": 2}, "test"), exp.eval.task_entries()[0],
                           str(stage_dir(exp, "train").path / "checkpoint"), StageDir("eval", "again", str(tmp_path)), "again")
    rows2 = [json.loads(line) for line in (tmp_path / "again" / "generated.jsonl").read_text().splitlines()]
    assert [r["units"] for r in rows2] == [r["units"] for r in rows] and again["samples"] == 4
    assert np.mean([len(r["units"]) for r in rows]) == pytest.approx(result["mean_new_units"])
