"""The walking skeleton end to end: real Ray, real espeak-ng, real MLflow store, through the real CLI; and what a
user sees on the terminal: stage progress, results and real warnings, not Ray's internals (they stay in Ray's log
files). One run checks both (each CLI run of the reduced quickstart costs minutes on 2 cores)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from slam_ray.core.stage_io import stage_dir
from slam_ray.core.tracking import tracking_uri
from slam_ray.lm.packed import PackedWindows

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def slam_ray(*argv: str, cwd, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "slam_ray.cli", *argv], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_reduced_quickstart_runs_every_stage_then_reuses_them(reduced_quickstart, tmp_path):
    """The session's reduced quickstart (`reduced_quickstart`: the CLI run in a process of its own, with this
    session's Ray instance up beside the one it starts, as on a shared machine): what it built, logged and showed;
    then the same command again reuses every stage."""
    import mlflow
    from transformers import AutoModelForCausalLM

    exp, path, first, data_logs = reduced_quickstart
    for stage in exp.stages:
        assert f"[{stage}] running" in first.stdout
    check_terminal_output(first, exp, data_logs)

    manifests = {}
    for stage in exp.stages:
        out = stage_dir(exp, stage)
        manifest = json.loads(out.manifest_path.read_text())
        assert manifest["status"] == "complete" and manifest["key"] == out.key
        assert out.errors_path.is_file()
        manifests[stage] = manifest

    # synth: every sentence spoken, as 16 kHz FLAC
    index = pd.read_parquet(stage_dir(exp, "synth").path / "index.parquet")
    assert len(index) == 240 and manifests["synth"]["counts"]["utterances"] == 240
    import soundfile as sf
    assert sf.info(index.path.iloc[0]).samplerate == 16_000 and sf.info(index.path.iloc[0]).format == "FLAC"
    # extract: units in range, durations sum to the frame count
    units = pd.read_parquet(stage_dir(exp, "extract").path / "units" / "part-00000.parquet")
    assert len(units) == 240
    row = units.iloc[0]
    assert int(np.sum(row.durations)) == row.n_frames and max(row.units) < 48
    # pack: windows of context_len, almost no padding
    assert manifests["pack"]["counts"]["train_pad_fraction"] < 0.01
    assert PackedWindows(stage_dir(exp, "pack").path, "train").shape[1] == 128
    # train: HF checkpoints that plain transformers loads
    train_dir = stage_dir(exp, "train").path
    final = AutoModelForCausalLM.from_pretrained(train_dir / "checkpoint")
    init = AutoModelForCausalLM.from_pretrained(train_dir / "checkpoint_init")
    assert final.config.vocab_size == 50
    assert manifests["train"]["counts"]["steps"] == 30
    assert not np.allclose(final.model.embed_tokens.weight.detach(), init.model.embed_tokens.weight.detach())
    # eval: results.json in the contract's shape
    results = json.loads((stage_dir(exp, "eval").path / "results.json").read_text())
    for task in exp.eval.tasks:
        for key in (task, f"{task}@init"):
            assert results[key]["n"] == 12 and 0.0 <= results[key]["accuracy"] <= 1.0
            assert results[key]["convention"] == "mean"
        assert results[task]["checkpoint"].endswith("checkpoint")
        assert results[f"{task}@init"]["checkpoint"].endswith("checkpoint_init")

    # MLflow: one parent run, one child per stage, training curves
    mlflow.set_tracking_uri(tracking_uri(exp))
    runs = mlflow.search_runs(experiment_names=["tiny"])
    parents = runs[runs["tags.slam_ray.kind"] == "experiment"]
    assert len(parents) == 1
    children = runs[runs["tags.mlflow.parentRunId"] == parents.run_id.iloc[0]]
    assert sorted(children["tags.slam_ray.stage"]) == sorted(exp.stages)
    assert (children.status == "FINISHED").all()
    train_run = children[children["tags.slam_ray.stage"] == "train"].run_id.iloc[0]
    losses = mlflow.MlflowClient().get_metric_history(train_run, "train/loss")
    assert [m.step for m in losses] == [5, 10, 15, 20, 25, 30]
    assert losses[-1].value < losses[0].value  # it learns
    assert "eval/lexical/init_accuracy" in parents.columns.str.removeprefix("metrics.").tolist()

    # Rerun: every stage is reused, nothing is rewritten, and no stage run is logged again
    second = slam_ray("run", str(path), cwd=tmp_path)
    for stage in exp.stages:
        assert f"[{stage}] reusing complete output" in second.stdout
        assert json.loads(stage_dir(exp, stage).manifest_path.read_text()) == manifests[stage]
    runs = mlflow.search_runs(experiment_names=["tiny"])
    assert (runs["tags.slam_ray.kind"] == "experiment").sum() == 2
    assert runs["tags.slam_ray.stage"].notna().sum() == len(exp.stages)

    # compare reads the same store
    table = slam_ray("compare", "--tracking-uri", tracking_uri(exp), "--experiment", "tiny", "--out", str(tmp_path / "cmp"),
                     cwd=tmp_path)
    assert "eval/word_order/accuracy" in table.stdout
    assert len(pd.read_csv(tmp_path / "cmp" / "compare.csv")) == 2

    # compute accounting: 6 N D of the run in its manifest and in MLflow (per report and at the end), and the
    # scaling view drawn from the same store (log-mel units: flagged, not compared with the law)
    counts = manifests["train"]["counts"]
    assert counts["flops_6nd"] == 6 * counts["params"] * counts["tokens"] and counts["flops"] > counts["flops_6nd"]
    assert (runs.loc[runs["tags.slam_ray.kind"] == "experiment", "metrics.train/flops_6nd"] == counts["flops_6nd"]).all()
    reported = mlflow.MlflowClient().get_metric_history(train_run, "train/flops_6nd")
    assert reported[-1].value == counts["flops_6nd"] and len(reported) > 1
    assert all(m.value == 6 * counts["params"] * m.step * exp.train.batch_size * exp.pack.context_len for m in reported)
    slam_ray("scaling", "plot", "--tracking-uri", tracking_uri(exp), "--experiment", "tiny", "--out",
             str(tmp_path / "scaling"), cwd=tmp_path)
    view = pd.read_csv(tmp_path / "scaling" / "scaling.csv")
    assert len(view) == 2 and (view["flops"] == counts["flops_6nd"]).all() and not view["comparable"].any()
    assert (tmp_path / "scaling" / "scaling.png").is_file()


def check_terminal_output(run: subprocess.CompletedProcess, exp, data_logs: str) -> None:
    """What a user sees: stage progress and results, each worker line once, none of Ray's own INFO lines."""
    shown = run.stdout + run.stderr
    for stage in exp.stages:  # results and progress still reach the user
        assert f"[{stage}] done in" in run.stdout
    assert "[synth] speak" in run.stderr and "[extract] encode" in run.stderr  # the stages' own bars
    assert f"[train] step {exp.train.max_steps}/{exp.train.max_steps}" in run.stdout

    assert "RayDeprecationWarning" not in shown
    # Ray's C++ line per actor pool (driver and Train controller): dropped by the CLI's stderr filter
    assert "has constructor arguments in the object store" not in shown
    # transformers' bar per weight load and checkpoint save in every actor and Train worker: dropped by it too
    assert not re.search(r"pid=\d+[^\n]*?\)(\x1b\[0m)? \r?(Loading weights|Writing model shards):", shown)
    assert "logging_progress" not in shown and "Running Dataset" not in shown
    assert "streaming_executor" not in shown  # Ray Data's INFO lines: in ray-data.log only
    # Ray Train's own INFO lines: the controller's (RunConfig logging_config) and each worker's per-report line
    assert "Requesting resources" not in shown and "Reporting training result" not in shown
    # Train V2's placement-group cleaner finds this run's Ray among several (init_ray names the dashboard)
    assert "Found multiple active Ray instances" not in shown
    # every line a Train worker printed reaches the terminal once (Train V2 also logged each print)
    worker_lines = Counter(re.sub(r"^.*?\) ", "", line) for line in shown.splitlines() if "[train]" in line)
    assert worker_lines and max(worker_lines.values()) == 1, worker_lines

    # Ray Data's own log still has the plan: on CPUs the encoding actors decode their own files (no pool of
    # decoding tasks: each of its processes cost a torch import and a TTS engine start)
    assert "ActorPoolMapOperator[MapBatches(EncodeActor)]" in data_logs
    assert "MapBatches(decode_rows)" not in data_logs
