"""Sweeps end to end: real Ray Tune trials that each run real training and evaluation, a real MLflow tracking
server (and the sqlite store through the CLI), ASHA early stopping, resource cleanup, kill-and-resume."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import link_caches, link_upstream, small_experiment

from slam_ray.config import to_yaml, with_values
from slam_ray.core.stage_io import stage_dir
from slam_ray.core.storage import workdir_path
from slam_ray.core.tracking import tracking_uri
from slam_ray.sweeps.search_space import load_space

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Good learning rates first: ASHA then has their validation losses on record when the poor one reaches a rung. Three
# trials, two at a time: each is a Ray Train run (~25 s of CPU before it trains, on two cores), and a third is the
# fewest that shows a trial stopped against trials on record.
LEARNING_RATES = [1e-2, 3e-3, 1e-5]


def _space(tmp_path: Path, sweep: dict, rates: list[float] = LEARNING_RATES) -> Path:
    path = tmp_path / "lr_space.yaml"
    path.write_text(yaml.safe_dump({"description": "learning rate", "params": {"train.optimizer.lr": {"grid": rates}},
                                    "sweep": sweep}))
    return path


def _runs(uri: str, experiment: str, query: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], query, max_results=1000) if found else []


def test_asha_grid_stops_poor_trials_frees_resources_and_tracks_everything(tmp_path, ray_local, espeak, mlflow_server,
                                                                          reduced_pipeline):
    from mlflow.tracking import MlflowClient
    from ray.util.placement_group import placement_group_table

    from slam_ray.sweeps.sweep import sweep

    exp = small_experiment(
        tmp_path / "work", train={"max_steps": 60, "val_reports": 10},
        tracking={"uri": mlflow_server},
        sweep={"scheduler": "asha", "metric": "val/loss", "mode": "min", "max_concurrent_trials": 2,
               "grace_percent": 20, "reduction_factor": 2},
    )
    link_upstream(exp, reduced_pipeline)  # the trials share synth/extract/pack: the session's are the same stages
    link_caches(exp, reduced_pipeline)  # and its eval's spoken pairs: the trials' eval reads them, as its own trials would
    space = load_space(str(_space(tmp_path, {})))
    table = sweep(exp, space)

    # --- MLflow: one sweep run, one child per trial, the stage runs beneath each trial
    sweeps = _runs(mlflow_server, "tiny", "tags.`slam_ray.kind` = 'sweep'")
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"
    parent = sweeps[0]
    assert json.loads(parent.data.params["space.train.optimizer.lr.grid"]) == LEARNING_RATES
    assert re.fullmatch(r"[0-9a-f]{40}", parent.data.tags["slam_ray.git_commit"])  # tests run in a git checkout
    trials = _runs(mlflow_server, "tiny", "tags.`slam_ray.kind` = 'trial'")
    assert len(trials) == 3
    assert all(t.data.tags["mlflow.parentRunId"] == parent.info.run_id for t in trials)
    by_lr = {float(t.data.params["swept.train.optimizer.lr"]): t for t in trials}
    assert sorted(by_lr) == sorted(LEARNING_RATES)
    completed = [t for t in trials if t.info.status == "FINISHED"]
    stopped = [t for t in trials if t.info.status == "KILLED"]
    assert completed and stopped, {lr: (t.info.status, t.data.tags.get("slam_ray.stop_reason")) for lr, t in by_lr.items()}
    assert len(completed) + len(stopped) == 3
    for t in stopped:
        assert t.data.tags["slam_ray.stop_reason"].startswith("stopped early by asha at")
        assert "eval/word_order/accuracy" not in t.data.metrics  # never evaluated: its budget was cut
        # the history Tune saw, logged by the driver: fewer validation points than a full trial
        assert 1 <= len(MlflowClient(mlflow_server).get_metric_history(t.info.run_id, "val/loss")) < 10
    for t in completed:
        assert t.data.tags["slam_ray.stop_reason"] == "completed"
        assert {"eval/word_order/accuracy", "val/loss", "train/tokens"} <= set(t.data.metrics)
    # the best learning rate completed; the poorest starts once another trial has ended (two at a time), so both
    # others' results are on record at the rungs it reaches: it was stopped
    assert by_lr[1e-2].info.status == "FINISHED"
    assert by_lr[1e-5].info.status == "KILLED"
    # stage runs nest under their trial and none is left RUNNING by a stopped trial
    for t in trials:
        stage_runs = _runs(mlflow_server, "tiny", f"tags.`mlflow.parentRunId` = '{t.info.run_id}'")
        assert "train" in {r.data.tags["slam_ray.stage"] for r in stage_runs}
        assert all(r.info.status != "RUNNING" for r in stage_runs)

    # --- compare: the returned table matches what the trials produced, best first, plots logged
    assert list(table["run_id"]).count(by_lr[1e-2].info.run_id) == 1 and len(table) == 3
    assert table["val/loss"].dropna().is_monotonic_increasing
    for _, row in table[table["status"] == "FINISHED"].iterrows():
        trial_exp = with_values(exp, {"train.optimizer.lr": float(row["train.optimizer.lr"])}, "trial")
        manifest = stage_dir(trial_exp, "train").read_manifest()
        results = json.loads((stage_dir(trial_exp, "eval").path / "results.json").read_text())
        assert row["val/loss"] == pytest.approx(manifest["metrics"]["val/loss_final"])
        assert row["eval/word_order/accuracy"] == pytest.approx(results["word_order"]["accuracy"])
    artifacts = {a.path for a in MlflowClient(mlflow_server).list_artifacts(parent.info.run_id)}
    assert {"compare.csv", "compare.png"} <= artifacts
    assert parent.data.metrics["trials/stopped_early"] == len(stopped)

    # --- resources: every trial's trainer released its CPUs and placement group (ray #54305)
    deadline = time.time() + 60
    while True:
        leaked = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
        free = ray_local.available_resources().get("CPU", 0)
        if not leaked and free == ray_local.cluster_resources()["CPU"]:
            break
        assert time.time() < deadline, f"resources not freed: {free} CPUs free, placement groups {leaked}"
        time.sleep(1)


def _trial_statuses(db: Path) -> dict[str, str]:
    """Status of every trial run, read with plain SQL: an MLflow client here could race the sweep's writer while
    it creates the store's tables (alembic migrations)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            rows = con.execute("select r.run_uuid, r.status from runs r join tags t on t.run_uuid = r.run_uuid "
                               "where t.key = 'slam_ray.kind' and t.value = 'trial'")
            return dict(rows.fetchall())
    except sqlite3.OperationalError:  # not created yet, or tables not there yet
        return {}


def _training_trials(db: Path) -> set[str]:
    """Trial runs whose `train` stage run is RUNNING (the trial is mid-training, far from its end)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            rows = con.execute(
                "select p.value from runs r join tags s on s.run_uuid = r.run_uuid join tags p on p.run_uuid = r.run_uuid "
                "where s.key = 'slam_ray.stage' and s.value = 'train' and p.key = 'mlflow.parentRunId' "
                "and r.status = 'RUNNING'")
            return {row[0] for row in rows}
    except sqlite3.OperationalError:
        return set()


def _start_sweep(command: list[str], cwd: Path, log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log_path, "w") as log:  # the child keeps its own handle
        return subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env)


def _wait_for(proc: subprocess.Popen, log_path: Path, ready, what: str):  # noqa: ANN001
    deadline = time.time() + 600
    while not (found := ready()):
        assert proc.poll() is None, log_path.read_text()[-4000:]
        assert time.time() < deadline, f"{what}: not in time"
        time.sleep(0.25)  # a sqlite read: the sooner a trial's state is seen, the sooner the test acts on it
    return found


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of the sweep's process group: its driver (Ray ends the driver's trials with it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def test_interrupted_and_killed_sweeps_resume_without_rerunning_finished_trials(tmp_path, espeak, reduced_pipeline,
                                                                               ray_address):
    from mlflow.tracking import MlflowClient

    # no eval stage: what is tested is which trials run again, and each trial's eval would add an actor pool's start
    exp = small_experiment(tmp_path / "work", stages=["synth", "extract", "pack", "train"],
                           train={"max_steps": 40, "checkpoint_every": 10})
    link_upstream(exp, reduced_pipeline)
    exp_path = tmp_path / "tiny.yaml"
    exp_path.write_text(to_yaml(exp))
    # three trials: one finishes, one is interrupted (and finishes on resume), one runs after the SIGKILL
    rates = LEARNING_RATES
    space_path = _space(tmp_path, {"metric": "val/loss", "mode": "min", "max_concurrent_trials": 1}, rates)
    command = [sys.executable, "-m", "slam_ray.cli", "sweep", str(exp_path), "--space", str(space_path)]
    env = {**os.environ, "RAY_ADDRESS": ray_address}  # each sweep's driver joins the session's Ray, as on a cluster
    uri = tracking_uri(exp)
    db = Path(uri.removeprefix("sqlite:///"))

    # 1. Ctrl+C: SIGINT to the driver while a trial trains, after another has finished.
    first = tmp_path / "first.log"
    proc = _start_sweep(command, tmp_path, first, env)
    try:
        def one_done_one_training() -> set[str]:
            statuses = _trial_statuses(db)
            if "FINISHED" not in statuses.values():
                return set()
            return {r for r in _training_trials(db) if statuses.get(r) == "RUNNING"}

        training = _wait_for(proc, first, one_done_one_training, "a trial training after one finished")
        os.kill(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=300)
    finally:
        _kill_group(proc)
    output = first.read_text()
    assert code == 130, output[-4000:]
    assert "interrupted: 1 completed" in output and "run the same command again to resume" in output, output[-4000:]
    assert "stopped early" not in output  # not mistaken for the scheduler's doing
    statuses = _trial_statuses(db)
    assert "RUNNING" not in statuses.values()
    finished_before = {r for r, s in statuses.items() if s == "FINISHED"}
    assert len(finished_before) == 1
    for run_id in training:  # the interrupted trial: KILLED, saying so, and nothing under it left RUNNING
        run = MlflowClient(uri).get_run(run_id)
        assert run.info.status == "KILLED" and run.data.tags["slam_ray.stop_reason"].startswith("interrupted")
        assert all(r.info.status != "RUNNING" for r in _runs(uri, "tiny", f"tags.`mlflow.parentRunId` = '{run_id}'"))
    assert [r.info.status for r in _runs(uri, "tiny", "tags.`slam_ray.kind` = 'sweep'")] == ["KILLED"]

    # 2. Resume, then SIGKILL the whole process group (no chance to clean up) once one more trial has finished.
    second = tmp_path / "second.log"
    proc = _start_sweep(command, tmp_path, second, env)
    try:
        _wait_for(proc, second, lambda: {r for r, s in _trial_statuses(db).items() if s == "FINISHED"} - finished_before,
                  "another finished trial")
    finally:
        _kill_group(proc)
    assert "resuming" in second.read_text()
    finished_before = {r for r, s in _trial_statuses(db).items() if s == "FINISHED"}
    assert len(finished_before) < len(rates)  # the SIGKILL left work to do

    # 3. Resume to the end.
    third = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "resuming" in third.stdout

    trials = _runs(uri, "tiny", "tags.`slam_ray.kind` = 'trial'")
    assert sorted(float(t.data.params["swept.train.optimizer.lr"]) for t in trials) == sorted(rates)
    assert all(t.info.status == "FINISHED" for t in trials)  # the interrupted trial's run continued
    assert training <= {t.info.run_id for t in trials}
    sweeps = _runs(uri, "tiny", "tags.`slam_ray.kind` = 'sweep'")
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"  # the same parent, not a second sweep
    for run_id in finished_before:
        # a trial finished before the kill kept its run and was not trained again (the interrupted one: its
        # killed training, then the one that resumed from its checkpoint)
        train_runs = _runs(uri, "tiny", f"tags.`mlflow.parentRunId` = '{run_id}' and tags.`slam_ray.stage` = 'train'")
        assert sorted(r.info.status for r in train_runs) == (["FINISHED", "KILLED"] if run_id in training else ["FINISHED"])
    # one training output per learning rate: nothing duplicated
    assert len([p for p in (workdir_path(exp) / "train").iterdir() if p.is_dir()]) == len(rates)
