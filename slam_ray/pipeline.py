"""The pipeline: which function runs each stage (the stage registry) and running an experiment's stages in
order. The stages import the stage contract (slam_ray/core/), never this module, so imports run one way:
cli -> sweeps -> pipeline -> stages (docs/layout.md). A new stage is its own module in slam_ray/stages/, one line
in `STAGE_FUNCTIONS`, its config section, and (for now) its format version and key's branch in core/stage_io.py
(docs/layout.md has the checklist)."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable

from slam_ray.config import Experiment
from slam_ray.core.stage_io import StageDir, stage_dir
from slam_ray.core.storage import workdir_location
from slam_ray.core.tracking import experiment_run, ui_hint
from slam_ray.errors import SlamError

# stage -> "module:function", imported on first use: `slam-ray config show` should not pay for torch and Ray.
STAGE_FUNCTIONS: dict[str, str] = {
    "synth": "slam_ray.stages.synth:synth",
    "extract": "slam_ray.stages.extract:extract",
    "pack": "slam_ray.stages.pack:pack",
    "train": "slam_ray.stages.train:train",
    "eval": "slam_ray.stages.eval:evaluate",
    "dpo": "slam_ray.stages.dpo:dpo",
}


def stage_function(stage: str) -> Callable[[Experiment], StageDir]:
    """A stage's entry point: it runs the stage (or reuses its complete output) and returns its output folder."""
    if stage not in STAGE_FUNCTIONS:
        raise SlamError(f"unknown stage {stage!r}; the stages are {', '.join(STAGE_FUNCTIONS)}")
    module, name = STAGE_FUNCTIONS[stage].split(":")
    return getattr(importlib.import_module(module), name)


def summary_metrics(exp: Experiment) -> dict[str, float]:
    """The headline figures of a finished experiment, from its stage manifests: final validation loss,
    tokens and seconds trained, and every evaluation metric."""
    out: dict[str, float] = {}
    finished = ("complete", "partial")  # a running or failed manifest has no figures yet
    train = stage_dir(exp, "train").read_manifest() if "train" in exp.stages else None
    if train and train.get("status") in finished:
        out["val/loss"] = train["metrics"]["val/loss_final"]
        out["train/tokens"] = train["counts"]["tokens"]
        out["train/steps"] = train["counts"]["steps"]
        for key in ("params", "flops_6nd", "flops"):  # compute accounting (`slam-ray scaling`); absent before 0.2
            if key in train["counts"]:
                out[f"train/{key}"] = train["counts"][key]
        out["train/seconds"] = train["metrics"]["train/seconds"]
    evaluation = stage_dir(exp, "eval").read_manifest() if "eval" in exp.stages else None
    if evaluation and evaluation.get("status") in finished:
        out.update(evaluation.get("metrics", {}))  # a partial eval: the tasks that finished
    return out


def run_experiment(exp: Experiment) -> tuple[dict[str, float], dict[str, dict[str, str]]]:
    """Run the stages the experiment lists, in order, under one parent MLflow run; returns seconds per stage and
    the stages that ended `partial` (with their failed parts). A partial stage does not stop the stages after
    it: no stage reads eval's output, the only one that can be partial."""
    for stage in exp.stages:
        stage_function(stage)  # fail before any work if a listed stage is unavailable
    wall: dict[str, float] = {}
    partial: dict[str, dict[str, str]] = {}
    with experiment_run(exp) as parent:
        for stage in exp.stages:
            start = time.perf_counter()
            out = stage_function(stage)(exp)
            wall[stage] = round(time.perf_counter() - start, 1)
            parent.set_tags({f"slam_ray.output.{stage}": out.root})
            if failed := out.failed_parts():
                partial[stage] = failed
                parent.set_tags({"slam_ray.status": "partial", f"slam_ray.failed.{stage}": ",".join(failed)})
        parent.log_metrics({**{f"time/{s}_s": v for s, v in wall.items()}, **summary_metrics(exp)})
    print("\nwall time per stage (s): " + ", ".join(f"{s} {v}" for s, v in wall.items()))
    print(f"outputs: {workdir_location(exp)}")
    print(ui_hint(exp))
    return wall, partial
