"""`slam-ray eval`: spoken minimal pairs from held-out grammar sentences, scored by the trained model.

Tasks, in the shape of the real benchmarks: `lexical` (a word replaced by a pronounceable non-word, like
sWUGGY), `word_order` (two adjacent words swapped, like sBLIMP's word-order items) and `agreement` (the
verb's number flipped). Both members of a pair are spoken with the same voice and speed by the synth backend,
tokenised with the extract stage's tokeniser, and scored by NLL (`eval.convention`). The untrained model
(`checkpoint_init`) is scored too: `<task>@init` is the chance baseline.
Outputs: `results.json`, `scores.csv` (one row per pair and checkpoint); the pair audio and units are cached
under `WORKDIR/eval_pairs/` for every model evaluated on the same pairs.
"""

from __future__ import annotations

import json
import random

import pandas as pd

from slam_ray import grammar
from slam_ray.config import Experiment
from slam_ray.runner import StageResult, cached_json, init_ray, run_stage
from slam_ray.scoring import accuracy_with_ci, pair_outcomes, sequence_nll
from slam_ray.stage_io import (
    StageDir,
    Timer,
    stage_payload,
    trained_checkpoint_dir,
    trained_stage,
    upstream_dir,
)
from slam_ray.tokenizer import encode_files
from slam_ray.tracking import Tracker
from slam_ray.tts import speak_items


def build_pairs(exp: Experiment) -> list[grammar.MinimalPair]:
    held_out = exp.synth.corpus.held_out_percent
    return [p for task in exp.eval.tasks for p in grammar.make_minimal_pairs(task, exp.eval.n_pairs, exp.eval.seed, held_out)]


def metric_name(result_key: str) -> str:
    """MLflow name of a results.json key: `word_order` -> eval/word_order/accuracy, `word_order@init` ->
    eval/word_order/init_accuracy (MLflow metric names cannot hold '@')."""
    task, _, checkpoint = result_key.partition("@")
    return f"eval/{task}/{checkpoint + '_' if checkpoint else ''}accuracy"


def _speech_items(exp: Experiment, pairs: list[grammar.MinimalPair], out: StageDir) -> list[dict]:
    rng = random.Random(exp.eval.seed)
    low, high = exp.synth.speed
    items = []
    for pair in pairs:
        voice, speed = rng.choice(exp.synth.voices), round(rng.uniform(low, high), 2)
        for side, text in (("pos", pair.positive), ("neg", pair.negative)):
            uid = f"{pair.id}-{side}"
            items.append({"id": uid, "text": text, "voice": voice, "speed": speed, "speaker": voice,
                          "path": str(out.path / "audio" / pair.task / f"{uid}.flac")})
    return items


def _pair_units(exp: Experiment, timer: Timer) -> tuple[dict[str, list[int]], list[dict]]:
    """The pairs spoken and tokenised: (units by item id, errors). They depend on the pairs, the voices and
    the tokenizer but not on the model, so they are made once under WORKDIR/eval_pairs/<key>/ and shared by
    every checkpoint evaluated on them (each trial of a sweep)."""
    payload = stage_payload(exp, "eval")
    payload.pop(trained_stage(exp))
    payload["eval"] = {k: payload["eval"][k] for k in ("tasks", "n_pairs", "seed")}

    def speak_and_tokenise(cache: StageDir) -> dict:
        init_ray(exp)
        with timer.phase("speak"):
            spoken, errors = speak_items(exp, _speech_items(exp, build_pairs(exp), cache), exp.synth.backend,
                                         exp.synth.sample_rate, exp.synth.num_actors, exp.synth.batch_size)
        with timer.phase("tokenise"):
            tokenizer_dir = upstream_dir(exp, "extract").path / "tokenizer"
            encoded, bad = encode_files(exp, spoken, tokenizer_dir, exp.extract.num_actors, exp.extract.batch_size)
        return {"units": {r["id"]: [int(u) for u in r["units"]] for r in encoded},
                "errors": [{k: e.get(k) for k in ("id", "path", "error")} for e in errors + bad]}

    _, cached = cached_json(exp, "eval_pairs", payload, "units.json", speak_and_tokenise)
    return cached["units"], cached["errors"]


def _evaluate(exp: Experiment, out: StageDir, tracker: Tracker, timer: Timer) -> StageResult:
    from transformers import AutoModelForCausalLM

    trained = trained_checkpoint_dir(exp)
    pairs = build_pairs(exp)
    units, errors = _pair_units(exp, timer)
    complete = [p for p in pairs if f"{p.id}-pos" in units and f"{p.id}-neg" in units]

    results: dict[str, dict] = {}
    rows = []
    with timer.phase("score"):
        checkpoints = [("", trained.path / "checkpoint"), ("@before_dpo", trained.path / "checkpoint_before_dpo"),
                       ("@init", trained.path / "checkpoint_init")]  # the middle one after DPO, the last if known
        checkpoints = [(suffix, folder) for suffix, folder in checkpoints if suffix == "" or folder.is_dir()]
        for suffix, folder in checkpoints:
            model = AutoModelForCausalLM.from_pretrained(folder)
            pos = sequence_nll(model, [units[f"{p.id}-pos"] for p in complete], exp.eval.convention, exp.eval.batch_size)
            neg = sequence_nll(model, [units[f"{p.id}-neg"] for p in complete], exp.eval.convention, exp.eval.batch_size)
            outcome = pair_outcomes(pos, neg)
            for task in exp.eval.tasks:
                mask = [p.task == task for p in complete]
                stats = accuracy_with_ci(outcome[mask])
                results[f"{task}{suffix}"] = {**stats, "convention": exp.eval.convention, "checkpoint": str(folder)}
            rows += [{"id": p.id, "task": p.task, "checkpoint": f"final{suffix}", "positive": p.positive,
                      "negative": p.negative, "nll_positive": a, "nll_negative": b, "outcome": o}
                     for p, a, b, o in zip(complete, pos, neg, outcome, strict=True)]
    (out.path / "results.json").write_text(json.dumps(results, indent=2))
    pd.DataFrame(rows).to_csv(out.path / "scores.csv", index=False)
    tracker.log_artifact(out.path / "results.json")
    tracker.log_artifact(out.path / "scores.csv")
    for key, r in results.items():
        print(f"[eval] {key:<20} accuracy {r['accuracy']:.3f}  (n={r['n']}, 95% CI {r['ci95_low']:.3f}-{r['ci95_high']:.3f})")
    metrics = {metric_name(key): r["accuracy"] for key, r in results.items()}
    return StageResult(counts={"pairs": len(complete), "tasks": len(exp.eval.tasks)},
                       outputs={"results": "results.json", "scores": "scores.csv"},
                       errors=errors, metrics=metrics)


def evaluate(exp: Experiment) -> StageDir:
    return run_stage(exp, "eval", _evaluate)

