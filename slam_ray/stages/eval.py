"""`slam-ray eval`: every task of `eval.tasks`, for every checkpoint of `eval.checkpoints`.

Likelihood tasks (slam_ray/evals/tasks/*.yaml, read by slam_ray/evals/readers.py) are comparisons of audio: the
official ZeroSpeech 2021 sWUGGY/sBLIMP, SpokenStoryCloze sSC/tSC, SALMon, a JSONL manifest of your own, and the
built-in grammar minimal pairs (`lexical`, `word_order`, `agreement`, spoken by the synth engine; no download).
Audio becomes units with the experiment's own tokenizer (the extract stage's), cached under
WORKDIR/eval_units/ and WORKDIR/eval_pairs/ for every model evaluated on the same data; NLLs come from a pool
of Ray Data actors (slam_ray/lm/scoring.py). The `generate` task continues spoken prompts (slam_ray/stages/generation.py).
A task that fails (dataset missing, say) is reported and the other tasks still run; the stage then ends
`partial`, and the next run keeps every finished task and computes only the failed ones.

Outputs: `results.json` (per task and checkpoint: accuracy, n, 95% CI, breakdowns, how it was scored),
`scores.csv` (one row per comparison and checkpoint: `final`, `init`, `step_10`, ...), `learning_curve.png` with
`checkpoints: [all]`. Each finished task is kept on its own (see `task_store`), so a rerun redoes only failed ones.
MLflow: `eval/<task>/accuracy` for the final model, `eval/<task>/<checkpoint>_accuracy` for the others,
`eval/<task>/by_<column>/<value>/accuracy` breakdowns, `eval/<task>/curve_accuracy` by training step.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pandas as pd

from slam_ray.config import EvalTask, Experiment, with_values
from slam_ray.config.tasks import CROSS_MODAL_READERS, TaskSpec, load_task
from slam_ray.core.runner import StageResult, cached_json, init_ray, run_stage
from slam_ray.core.stage_io import (
    CROSS_MODAL_VERSION,
    StageDir,
    Timer,
    evaluates_trained_stage,
    stage_key,
    stage_payload,
    trained_checkpoint_dir,
    trained_stage,
    upstream_dir,
)
from slam_ray.core.storage import (
    cache_root,
    exists,
    in_filesystem,
    is_remote,
    join,
    model_source,
    read_text,
    workdir_location,
)
from slam_ray.core.tracking import Tracker
from slam_ray.errors import SlamError
from slam_ray.evals import grammar
from slam_ray.evals.readers import read_comparisons
from slam_ray.lm.scoring import aggregate, group_outcome
from slam_ray.lm.vocabulary import (
    MergedVocabulary,
    Vocabulary,
    load_text_tokenizer,
    speech_sequence,
    tokenizer_source,
    vocabulary_of,
)
from slam_ray.parallel.audio_units import audio_units, tokenizer_dir
from slam_ray.parallel.encode import encode_spoken
from slam_ray.parallel.nll import score_sequences

NAMED_CHECKPOINTS = {"final": ("", "checkpoint"), "before_dpo": ("@before_dpo", "checkpoint_before_dpo"),
                     "init": ("@init", "checkpoint_init")}


def metric_name(result_key: str, field: str = "accuracy") -> str:
    """MLflow name of a results.json key: `word_order` -> eval/word_order/accuracy, `word_order@init` ->
    eval/word_order/init_accuracy (MLflow metric names cannot hold '@')."""
    task, _, checkpoint = result_key.partition("@")
    return f"eval/{task}/{checkpoint + '_' if checkpoint else ''}{field}"


def _metric_safe(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", value.replace(">", "gt").replace("<", "lt"))


# --- checkpoints -------------------------------------------------------------------------------------------------


def resolve_checkpoints(exp: Experiment) -> list[tuple[str, str, int | None]]:
    """(result suffix, HF folder's location, training step or None) for every entry of `eval.checkpoints`;
    a folder in object storage is fetched by whichever process loads it."""
    out: list[tuple[str, str, int | None]] = []
    trained = trained_checkpoint_dir(exp) if evaluates_trained_stage(exp) else None
    for entry in exp.eval.checkpoints:
        if entry in NAMED_CHECKPOINTS:
            suffix, folder = NAMED_CHECKPOINTS[entry]
            if exists(trained.location(folder, "config.json")):
                out.append((suffix, trained.location(folder), None))
            elif entry == "final":
                raise SlamError(f"eval.checkpoints: the final checkpoint {trained.location(folder)} is missing; rerun "
                                f"`slam-ray {trained_stage(exp)}`")
        elif entry == "all":
            listing = upstream_dir(exp, "train").local("checkpoints.json")
            if not listing.is_file():
                raise SlamError(f"eval.checkpoints: [all] needs {listing}, written by training since this version; "
                                "rerun `slam-ray train` into a fresh workdir, or list checkpoint folders")
            by_step = {c["step"]: c for c in json.loads(listing.read_text())}  # final wins a shared step
            for step, c in sorted(by_step.items()):
                location = c["path"]
                if not exists(location) and is_remote(exp.train.storage_path):  # listings that held bucket paths
                    location = in_filesystem(exp.train.storage_path, location)
                out.append((f"@step_{step}", location, step))
        else:
            folder = Path(entry).expanduser()
            if not (folder / "config.json").is_file():
                raise SlamError(f"eval.checkpoints: {entry!r} is neither final/before_dpo/init/all nor a folder "
                                "holding a Hugging Face checkpoint (config.json)")
            out.append((f"@{_metric_safe(folder.name)}", str(folder.absolute()), None))
    if not out:  # before_dpo and init are skipped when absent; with nothing left there is nothing to score
        raise SlamError(f"eval.checkpoints: none of {exp.eval.checkpoints} exists in {trained.root} (before_dpo is "
                        "written by the dpo stage, init by training); add `final`, or list a checkpoint folder")
    return out


def _check_vocabulary(exp: Experiment, folder: str, vocab: Vocabulary) -> None:
    from transformers import AutoConfig

    size = AutoConfig.from_pretrained(model_source(folder)).vocab_size
    if size < vocab.size:
        what = ("the merged vocabulary (pack.interleave)" if isinstance(vocab, MergedVocabulary)
                else f"this experiment's tokenizer ({exp.extract.tokenizer.n_units} units + 2)")
        raise SlamError(f"checkpoint {folder} has a vocabulary of {size} ids but {what} needs {vocab.size}: "
                        "was it trained on other units?")


# --- comparisons and their units ---------------------------------------------------------------------------------


def build_pairs(exp: Experiment) -> list[grammar.MinimalPair]:
    held_out = exp.synth.corpus.held_out_percent
    return [p for task in exp.eval.grammar_tasks
            for p in grammar.make_minimal_pairs(task, exp.eval.n_pairs, exp.eval.seed, held_out)]


def _voiced_items(exp: Experiment, groups: list[tuple[str, list[tuple[str, str]]]], cache: StageDir) -> list[dict]:
    """Texts to speak, one voice and speed per group (a pair's or a triple's sides then differ in their words
    only): `groups` = (audio subfolder, [(item id, text), ...]). A group's draw is seeded by the group itself, so
    a task's audio is the same whichever other tasks are listed beside it (its stored result is keyed alone)."""
    low, high = exp.synth.speed
    items = []
    for folder, parts in groups:
        rng = random.Random(f"{exp.eval.seed}:{folder}:{parts[0][0]}")
        voice, speed = rng.choice(exp.synth.voices), round(rng.uniform(low, high), 2)
        items += [{"id": uid, "text": text, "voice": voice, "speed": speed, "speaker": voice,
                   "path": cache.location("audio", *([folder] if folder else []), f"{uid}.flac")}
                  for uid, text in parts]
    return items


def _spoken_units(exp: Experiment, what: dict[str, Any], groups: Any) -> tuple[dict[str, list[int]], list[dict]]:
    """Built-in texts spoken by the synth voices and tokenised: (units by item id, errors). They depend on the
    texts (`what` keys them), the voices and the tokenizer but not on the model, so they are made once under
    WORKDIR/eval_pairs/<key>/ and shared by every checkpoint evaluated on them (each trial of a sweep).
    `groups()` gives `_voiced_items`' groups, called only when the cache is made."""
    payload = stage_payload(exp, "eval")
    payload.pop(trained_stage(exp), None)
    payload.pop("readers_version")
    payload.pop("cross_modal_version", None)  # adding a cross-modal task does not change the grammar pairs
    payload["eval"] = what

    def speak_and_tokenise(cache: StageDir) -> dict:
        init_ray(exp)
        encoded, bad = encode_spoken(exp, _voiced_items(exp, groups(), cache), tokenizer_dir(exp))
        return {"units": {r["id"]: [int(u) for u in r["units"]] for r in encoded},
                "errors": [{k: e.get(k) for k in ("id", "path", "error")} for e in bad]}

    _, cached = cached_json(exp, "eval_pairs", payload, "units.json", speak_and_tokenise)
    return cached["units"], cached["errors"]


def _grammar_units(exp: Experiment) -> tuple[dict[str, list[int]], list[dict]]:
    """The grammar pairs spoken and tokenised: (units by item id, errors)."""
    return _spoken_units(exp, {"tasks": exp.eval.grammar_tasks, "n_pairs": exp.eval.n_pairs, "seed": exp.eval.seed},
                         lambda: [(p.task, [(f"{p.id}-pos", p.positive), (f"{p.id}-neg", p.negative)])
                                  for p in build_pairs(exp)])


def _grammar_comparisons(exp: Experiment, kind: str, pairs: list[grammar.MinimalPair]) -> pd.DataFrame:
    rows = [{"item": p.id, "positive": f"{p.id}-pos", "negatives": [f"{p.id}-neg"], "positive_text": p.positive,
             "negative_text": p.negative} for p in pairs if p.task == kind]
    return pd.DataFrame(rows)


def _cross_modal_units(exp: Experiment) -> tuple[list, dict[str, list[int]], list[dict]]:
    """The held-out grammar preference triples of the cross-modal tasks, each part (prompt, chosen, rejected)
    spoken by one voice per triple and tokenised, once for all four directions and every checkpoint:
    (triples, units by `<triple id>-<part>`, errors)."""
    from slam_ray.lm.preferences import grammar_preference_triples

    triples = grammar_preference_triples(exp.eval.n_pairs, exp.eval.seed, exp.synth.corpus.held_out_percent, "held_out")
    units, errors = _spoken_units(
        exp, {"cross_modal": CROSS_MODAL_VERSION, "n_pairs": exp.eval.n_pairs, "seed": exp.eval.seed},
        lambda: [("", [(f"{t.id}-{part}", getattr(t, part)) for part in ("prompt", "chosen", "rejected")])
                 for t in triples])
    return triples, units, errors


def _storycloze_comparisons(exp: Experiment, entry: EvalTask, spec: TaskSpec, vocab: Vocabulary
                            ) -> tuple[pd.DataFrame, dict[str, tuple[list[int], int]], list[dict]]:
    """The cross-modal StoryCloze folder (`evals/cross_modal.py`): its speech tokenised like any task's audio (for
    speech to speech, each context joined with each ending first, under the cache root's cm_sc/)."""
    from slam_ray.evals.cross_modal import join_story_audio, read_story_parts, storycloze_comparisons

    context, continuation = spec.reader_args["context"], spec.reader_args["continuation"]
    stories, incomplete = read_story_parts(Path(entry.path).expanduser(), context, continuation)
    if entry.limit is not None:
        stories = dict(list(stories.items())[: entry.limit])
    join_errors: list[dict] = []
    if context == continuation == "speech":
        audio, join_errors = join_story_audio(stories, cache_root() / "cm_sc")
    else:
        audio = {f"{story}/{part}": f for story, parts in stories.items() for part, f in parts.items()
                 if f.suffix.lower() != ".txt"}
    by_path, _, errors = audio_units(exp, [str(f) for f in audio.values()])
    units = {key: by_path[str(f)] for key, f in audio.items() if str(f) in by_path}
    comparisons, sequences = storycloze_comparisons(stories, context, continuation, units,
                                                    load_text_tokenizer(tokenizer_source(exp)), vocab, entry.key)
    errors = [{**e, "task": entry.key} for e in join_errors + errors]
    if incomplete:
        errors.append({"task": entry.key, "error": f"{len(incomplete)} stories lack a {context} context or a "
                       f"{continuation} ending: {', '.join(incomplete[:10])}"})
    if len(comparisons) < len(stories):
        errors.append({"task": entry.key, "error": f"{len(stories) - len(comparisons)} stories dropped: an audio "
                       "file of theirs could not be tokenised (see the file errors)"})
    return comparisons, sequences, errors


def scores_speech_only(exp: Experiment, spec: TaskSpec, vocab: Vocabulary) -> bool:
    """Whether a task's sequences are scored over the speech ids alone: speech-only tasks of an interleaved model
    under `eval.speech_logits_only` (text logits masked)."""
    return (exp.eval.speech_logits_only and isinstance(vocab, MergedVocabulary)
            and spec.reader not in CROSS_MODAL_READERS)


def load_comparisons(exp: Experiment, entry: EvalTask, spec: TaskSpec, grammar_pairs: list[grammar.MinimalPair],
                     vocab: Vocabulary) -> tuple[pd.DataFrame, dict[str, tuple], list[dict]]:
    """(comparisons whose audio all has units, scored sequences by key, errors)."""
    if spec.reader in CROSS_MODAL_READERS and not isinstance(vocab, MergedVocabulary):
        raise SlamError(f"{entry.key} compares text and speech: it needs an interleaved model (pack.interleave)")
    if spec.reader == "cross_modal":
        from slam_ray.evals.cross_modal import cross_modal_comparisons

        triples, units, errors = _cross_modal_units(exp)
        comparisons, sequences = cross_modal_comparisons(
            triples, units, spec.reader_args["context"], spec.reader_args["continuation"],
            load_text_tokenizer(tokenizer_source(exp)), vocab)
        if len(comparisons) < len(triples):
            errors.append({"error": f"{len(triples) - len(comparisons)} comparisons dropped: a part of theirs could "
                                    "not be spoken and tokenised (see the file errors)"})
        return comparisons, sequences, [{**e, "task": entry.key} for e in errors]
    if spec.reader == "cross_modal_storycloze":
        return _storycloze_comparisons(exp, entry, spec, vocab)
    if spec.reader == "grammar":
        comparisons = _grammar_comparisons(exp, spec.reader_args["kind"], grammar_pairs)
        units, errors = _grammar_units(exp)
    else:
        comparisons = read_comparisons(spec, entry.path, entry.reader_options, entry.limit)
        files = [*comparisons["positive"], *(p for negs in comparisons["negatives"] for p in negs)]
        units, _, errors = audio_units(exp, files)
    complete = [c["positive"] in units and all(n in units for n in c["negatives"])
                for c in comparisons[["positive", "negatives"]].to_dict("records")]
    errors = [{**e, "task": entry.key} for e in errors]
    if not all(complete):
        errors.append({"task": entry.key, "error": f"{len(complete) - sum(complete)} comparisons dropped: an audio "
                       "file of theirs could not be tokenised (see the file errors)"})
    speech_only = scores_speech_only(exp, spec, vocab)
    sequences = {k: (*speech_sequence(vocab, u), speech_only) for k, u in units.items()}
    return comparisons[complete].reset_index(drop=True), sequences, errors


# --- the stage ---------------------------------------------------------------------------------------------------


def _score_task(comparisons: pd.DataFrame, nll: dict[str, float]) -> pd.DataFrame:
    scored = comparisons.copy()
    scored["nll_positive"] = [nll[p] for p in scored["positive"]]
    scored["nll_negatives"] = [[nll[n] for n in negs] for negs in scored["negatives"]]
    scored["outcome"] = [group_outcome(p, ns) for p, ns in zip(scored["nll_positive"], scored["nll_negatives"],
                                                                  strict=True)]
    return scored


def _flat_metrics(key: str, result: dict[str, Any]) -> dict[str, float]:
    metrics = {metric_name(key): result["accuracy"]}
    for field, table in result.items():
        if field.startswith("by_"):
            for value, stats in table.items():
                metrics[metric_name(key, f"{field}/{_metric_safe(value)}/accuracy")] = stats["accuracy"]
    return metrics


def _plot_curve(curve: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for task, points in curve.items():
        ax.plot(*zip(*points, strict=True), marker="o", label=task)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="training step", ylabel="accuracy", title="accuracy by checkpoint")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _failure(key: str, e: Exception) -> str:
    reason = str(e) if isinstance(e, SlamError) else f"{type(e).__name__}: {e}"
    print(f"[eval] task {key} failed: {reason}")
    return reason


def task_store(exp: Experiment, out: StageDir, index: int) -> StageDir:
    """Where the `index`th task of `eval.tasks` is kept once finished (`task.json`, `scores.csv`). A likelihood
    task: WORKDIR/eval_tasks/<key>/, keyed as the eval stage of an experiment with this one task, so any eval
    that would score it the same way reuses it — this stage rerun after ending partial, or the new key made
    when a missing dataset of another task arrives. A generate task: tasks/<name>/ in the stage folder, beside
    the files it wrote there."""
    entry = exp.eval.task_entries()[index]
    if load_task(entry.task).reader == "generate":
        return StageDir("eval", out.key, out.location("tasks", _metric_safe(entry.key)))
    item = exp.eval.tasks[index]
    alone = with_values(exp, {"eval.tasks": [item if isinstance(item, str) else item.model_dump(mode="json")]},
                        f"eval.tasks[{index}]")
    key = stage_key(alone, "eval")
    return StageDir("eval_tasks", key, join(workdir_location(exp), "eval_tasks", key))


def _save_task(store: StageDir, saved: dict[str, Any], scores: pd.DataFrame | None) -> dict[str, Any]:
    """Keep a finished task: its scored rows, then its record (task.json, written last, says it finished)."""
    store.path.mkdir(parents=True, exist_ok=True)
    if scores is not None:
        scores.to_csv(store.path / "scores.csv", index=False)
        saved["scores"] = "scores.csv"
    tmp = store.path / "task.json.tmp"
    tmp.write_text(json.dumps(saved, indent=2, default=str))
    tmp.replace(store.path / "task.json")
    store.publish()
    return saved


def _finished_task(store: StageDir) -> dict[str, Any] | None:
    text = read_text(store.location("task.json"))
    return json.loads(text) if text is not None else None


def _evaluate(exp: Experiment, out: StageDir, tracker: Tracker, timer: Timer) -> StageResult:
    checkpoints = resolve_checkpoints(exp)
    vocab = vocabulary_of(exp)
    for _, folder, _ in checkpoints:
        _check_vocabulary(exp, folder, vocab)
    entries = exp.eval.task_entries()
    stores = {entry.key: task_store(exp, out, i) for i, entry in enumerate(entries)}
    done: dict[str, dict[str, Any]] = {}  # task -> what _save_task kept
    for entry in entries:
        if (saved := _finished_task(stores[entry.key])) is not None:
            print(f"[eval] task {entry.key}: finished by an earlier run, kept ({stores[entry.key].root})")
            done[entry.key] = saved
    pending = [entry for entry in entries if entry.key not in done]
    failed: dict[str, str] = {}
    tasks: dict[str, tuple[TaskSpec, pd.DataFrame, list[dict]]] = {}
    sequences: dict[str, tuple] = {}
    generate: list[EvalTask] = []

    with timer.phase("load"):
        grammar_pairs = build_pairs(exp) if any(e.task in exp.eval.grammar_tasks for e in pending) else []
        for entry in pending:
            spec = load_task(entry.task)
            if spec.reader == "generate":
                generate.append(entry)
                continue
            try:
                comparisons, task_sequences, task_errors = load_comparisons(exp, entry, spec, grammar_pairs, vocab)
                if not len(comparisons):  # saved with n 0 and no accuracy, it was kept as finished and never redone
                    reasons = [str(e.get("error", e)) for e in task_errors]
                    raise SlamError("no comparison could be built: " + ("; ".join(reasons[:3]) or "the dataset holds none")
                                    + (f" (and {len(reasons) - 3} more)" if len(reasons) > 3 else ""))
            except Exception as e:  # this task cannot run (dataset missing, say); the others still do
                failed[entry.key] = _failure(entry.key, e)
                continue
            tasks[entry.key] = (spec, comparisons, task_errors)
            sequences.update(task_sequences)
    if not tasks and not generate and not done:
        raise SlamError("no eval task could be loaded:\n" + "\n".join(f"  {k}: {e}" for k, e in failed.items()))

    scored: dict[str, list[pd.DataFrame]] = {key: [] for key in tasks}
    task_results: dict[str, dict[str, Any]] = {key: {} for key in tasks}
    needed = {k: sequences[k] for _, c, _ in tasks.values()
              for k in [*c["positive"], *(n for ns in c["negatives"] for n in ns)]}
    with timer.phase("score"):
        init_ray(exp)
        speech_ids = ((vocab.unit_offset, vocab.n_units, vocab.eos_id) if isinstance(vocab, MergedVocabulary)
                      else None)
        nlls = (score_sequences(exp, [folder for _, folder, _ in checkpoints], needed, vocab.pad_id, speech_ids)
                if tasks else {})
        for suffix, folder, step in checkpoints if tasks else []:
            nll = nlls[str(folder)]
            for key, (spec, comparisons, _) in tasks.items():
                if key in failed:
                    continue
                try:
                    rows = _score_task(comparisons, nll)
                except ValueError as e:  # NaN scores (a diverged checkpoint): this task fails, the others still score
                    failed[key] = _failure(key, ValueError(f"checkpoint {folder}: {e}"))
                    continue
                result = aggregate(rows, spec.aggregate_by, spec.breakdown)
                task_results[key][f"{key}{suffix}"] = {
                    **result, "task": spec.name, "reader": spec.reader, "aggregate_by": spec.aggregate_by,
                    "convention": exp.eval.convention, "checkpoint": str(folder), **({"step": step} if step is not None else {}),
                    **({"speech_logits_only": True} if scores_speech_only(exp, spec, vocab) else {})}
                rows.insert(0, "checkpoint", suffix.removeprefix("@") or "final")
                rows.insert(0, "task", key)
                scored[key].append(rows)
    for key, (_, comparisons, task_errors) in tasks.items():
        if key in failed:
            continue
        table = pd.concat(scored[key], ignore_index=True)
        table["negatives"] = ["|".join(n) for n in table["negatives"]]
        done[key] = _save_task(stores[key], {"task": key, "results": task_results[key], "errors": task_errors,
                                             "comparisons": len(comparisons)}, table)

    if generate:
        from slam_ray.stages.generation import run_generation

        with timer.phase("generate"):
            final = next((folder for suffix, folder, _ in checkpoints if suffix == ""), checkpoints[0][1])
            for entry in generate:
                try:
                    result = run_generation(exp, entry, final, out, entry.key, vocab)
                except Exception as e:
                    failed[entry.key] = _failure(entry.key, e)
                    continue
                done[entry.key] = _save_task(stores[entry.key], {"task": entry.key, "results": {entry.key: result},
                                                                 "errors": []}, None)

    # Assemble the outputs from every finished task, this run's and the kept ones alike, in config order.
    results: dict[str, dict] = {}
    errors: list[dict] = []
    tables: list[pd.DataFrame] = []
    for entry in entries:
        if entry.key in failed:
            results[entry.key] = {"error": failed[entry.key]}
            errors.append({"task": entry.key, "error": failed[entry.key]})
            continue
        saved = done[entry.key]
        results.update(saved["results"])
        errors += saved["errors"]
        if "scores" in saved:  # read as text: the rows go back out exactly as they were written
            tables.append(pd.read_csv(stores[entry.key].local(saved["scores"]), dtype=str, keep_default_na=False))
    outputs: dict[str, Any] = {"results": "results.json",
                               "tasks": {k: store.root for k, store in stores.items() if k in done}}
    (out.path / "results.json").write_text(json.dumps(results, indent=2, default=str))
    tracker.log_artifact(out.path / "results.json")
    if tables:
        pd.concat(tables, ignore_index=True).to_csv(out.path / "scores.csv", index=False)
        tracker.log_artifact(out.path / "scores.csv")
        outputs["scores"] = "scores.csv"
    metrics: dict[str, float] = {}
    curve: dict[str, list[tuple[int, float]]] = {}
    for key, r in results.items():
        if "accuracy" in r:
            metrics.update(_flat_metrics(key, r))
            print(f"[eval] {key:<24} accuracy {r['accuracy']:.3f}  (n={r['n']}, 95% CI "
                  f"{r['ci95_low']:.3f}-{r['ci95_high']:.3f})")
            if "step" in r:
                curve.setdefault(key.partition("@")[0], []).append((r["step"], r["accuracy"]))
        elif "error" not in r:  # generation: its own figures
            metrics.update({f"eval/{key}/{name}": v for name, v in r.items() if isinstance(v, int | float)})
    for key, points in curve.items():
        for step, acc in sorted(points):
            tracker.log_metrics({f"eval/{key}/curve_accuracy": acc}, step=step)
    if curve:
        _plot_curve(curve, out.path / "learning_curve.png")
        tracker.log_artifact(out.path / "learning_curve.png")
        outputs["learning_curve"] = "learning_curve.png"
    counts = {"comparisons": sum(saved.get("comparisons", 0) for saved in done.values()), "tasks": len(entries),
              "failed_tasks": len(failed), "checkpoints": len(checkpoints)}
    return StageResult(counts=counts, outputs=outputs, errors=errors, metrics=metrics, failed=failed)


def evaluate(exp: Experiment) -> StageDir:
    return run_stage(exp, "eval", _evaluate)
