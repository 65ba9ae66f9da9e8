"""`slam-ray sweep EXPERIMENT --space SPACE`: an ablation as one command, with Ray Tune.

Read top to bottom: the driver validates the space against the experiment (before anything runs), runs the
stages every trial shares once (synth, extract, ... up to the first stage the space changes), then hands Tune
one *function* trial per configuration (the supported way with Ray Train V2: the trial builds its own
`TorchTrainer`). A trial runs the remaining stages of its experiment — cached stage outputs are reused, so
a re-run or a trial that only changes `eval` never retrains — while its training reports the validation loss
at each tenth of its budget, which ASHA or the median rule compare to stop weak trials early. Every trial gets
the experiment's budget (prefer `train.max_tokens` for equal compute: a time budget shares cores).

MLflow: a parent run per sweep, a child per trial (the swept values, the metric history Tune saw, the eval
results, status and stop reason), the trial's stage runs beneath it. All of it is written by one writer actor,
so an sqlite store survives concurrent trials; a tracking server works the same way. An interrupted sweep
resumes (`Tuner.restore`) when the same command is run again: finished trials are not re-run.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd

from slam_ray.config import Experiment, with_values
from slam_ray.errors import SlamError
from slam_ray.runner import init_ray, stage_function, summary_metrics
from slam_ray.search_space import SearchSpace, validate_space
from slam_ray.stage_io import config_hash
from slam_ray.tracking import (
    Tracker,
    open_run,
    parent_run,
    start_run,
    start_writer,
    stop_writer,
    store,
    use_writer,
)

TRIAL_TAG = "slam_ray.trial"  # "<sweep>/<trial id>" on a trial's run
IN_TRIAL_TAG = "slam_ray.in_trial"  # the same on the stage runs inside a trial


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def sweep_name(exp: Experiment, space: SearchSpace) -> str:
    """Names the sweep's folder and runs; the same experiment and space give the same name (that is how a
    re-run finds the sweep to resume). Concurrency settings are left out: resuming with more trials in
    parallel is the same sweep."""
    config = exp.model_dump(mode="json")
    for operational in ("max_concurrent_trials", "trial_cpus"):
        config["sweep"].pop(operational)
    config.pop("ray")
    return f"{space.name}-{config_hash({'experiment': config, 'space': space.model_dump(mode='json')})}"


def shared_stages(exp: Experiment, space: SearchSpace) -> list[str]:
    """The stages before the first one the space changes: identical in every trial, so run once up front."""
    shared = []
    for stage in exp.stages:
        if stage in space.swept_sections:
            break
        shared.append(stage)
    return shared


# ---------------------------------------------------------------------------------------------------------------
# one trial (runs in a Tune trial actor)


def run_trial(values: dict[str, Any], *, base: dict[str, Any], sweep: str, parent_run_id: str, writer: str,
              cwd: str) -> None:
    from ray import tune

    # Tune starts a trial in a folder of its own; relative paths in the experiment (inputs, corpus, models)
    # mean the driver's working directory.
    os.chdir(cwd)
    exp = with_values(Experiment.model_validate(base), values, f"trial {values}")
    trial = f"{sweep}/{tune.get_context().get_trial_id()}"
    use_writer(writer)
    label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in values.items())
    with parent_run(Tracker(exp.tracking_uri, parent_run_id, writer)):
        run = open_run(exp, label, {"slam_ray.kind": "trial", "slam_ray.sweep": sweep}, find_by={TRIAL_TAG: trial})
    # The driver closes this run when the trial stops early or fails (this process may be gone by then).
    with parent_run(run, {IN_TRIAL_TAG: trial}):
        if not run.reused:  # a resumed trial logged them already (MLflow refuses to change a param)
            run.log_params({**exp.model_dump(mode="json"), "swept": dict(values)})
        for stage in exp.stages:
            out = stage_function(stage)(exp)
            run.set_tags({f"slam_ray.output.{stage}": out.root})
        final = summary_metrics(exp)
        run.log_metrics(final, step=int(final.get("train/steps", 0)))
        # The last result Tune sees: `final` marks a trial that ran to the end (vs stopped early).
        run.set_status("FINISHED")
        tune.report({**final, "progress": 100.0, "final": 1})


# ---------------------------------------------------------------------------------------------------------------
# the driver


class TrialsToMlflow:
    """Tune callback on the driver: the metric history Tune saw, then status and stop reason, on each trial's
    run (through the sweep's single writer)."""

    def __init__(self, uri: str, writer: str, experiment: str, sweep: str, scheduler: str, stop_metric: str) -> None:
        self.uri, self.writer, self.experiment, self.sweep = uri, writer, experiment, sweep
        self.scheduler, self.stop_metric = scheduler, stop_metric
        self.run_ids: dict[str, str] = {}  # trial id -> its MLflow run, looked up once

    def _run(self, trial) -> Tracker | None:  # noqa: ANN001
        if trial.trial_id not in self.run_ids:
            found = store(self.uri, self.writer).find_runs(self.experiment, {TRIAL_TAG: f"{self.sweep}/{trial.trial_id}"})
            if not found:
                return None
            self.run_ids[trial.trial_id] = found[0]
        return Tracker(self.uri, self.run_ids[trial.trial_id], self.writer)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:  # noqa: ANN001
        if result.get("final") or "step" not in result:
            return
        run = self._run(trial)
        if run:
            run.log_metrics({k: result[k] for k in (self.stop_metric, "progress", "train/tokens") if k in result},
                            step=int(result["step"]))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:  # noqa: ANN001
        last = trial.last_result or {}
        if last.get("final"):
            self._close(trial, "FINISHED", "completed")
        else:
            value = last.get(self.stop_metric)
            self._close(trial, "KILLED", f"stopped early by {self.scheduler} at {last.get('progress', 0):.0f}% of "
                                         f"its budget ({self.stop_metric} {value:.4f})" if value is not None else
                        f"stopped by {self.scheduler} before its first report")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:  # noqa: ANN001
        error = trial.get_error()
        self._close(trial, "FAILED", f"error: {str(error)[-500:]}" if error else f"error: see {trial.error_file}")

    def _close(self, trial, status: str, reason: str) -> None:  # noqa: ANN001
        backend = store(self.uri, self.writer)
        run = self._run(trial)
        if run is None:
            return
        run.set_tags({"slam_ray.stop_reason": reason, "slam_ray.trial_status": status.lower()})
        run.set_status(status)
        # Close the stage runs the trial left open; a trial stopped by the scheduler is killed mid-stage, and
        # may have marked its stage run FAILED on its way out.
        stale = ("RUNNING", "FAILED") if status == "KILLED" else ("RUNNING",)
        for stage_run in backend.find_runs(self.experiment, {IN_TRIAL_TAG: f"{self.sweep}/{trial.trial_id}"}):
            if backend.status(stage_run) in stale:
                backend.set_status(stage_run, status)


def _tune_callback(*args: Any):
    """TrialsToMlflow as a `ray.tune.Callback` (Tune imported only when a sweep runs)."""
    from ray import tune

    callback_type = type("TrialsToMlflowCallback", (TrialsToMlflow, tune.Callback), {})
    return callback_type(*args)


def _search_alg(exp: Experiment):
    cfg = exp.sweep
    if cfg.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        class FinalMetricOptuna(OptunaSearch):
            """Optuna sees the sweep metric, which arrives with a trial's last result only."""

            def on_trial_result(self, trial_id: str, result: dict) -> None:
                if self.metric in result:
                    super().on_trial_result(trial_id, result)

        return FinalMetricOptuna(metric=cfg.metric, mode=cfg.mode, seed=cfg.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Given explicitly, the generator must carry the concurrency limit (Tune ignores max_concurrent_trials then).
    return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.max_concurrent_trials)


def _scheduler(exp: Experiment):
    cfg = exp.sweep
    # Time is the share of a trial's budget (the `progress` of its validation reports, 0-100), so trials with
    # different step counts or batch sizes meet at the same rungs.
    if cfg.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr="progress", metric=cfg.stop_metric, mode=cfg.stop_mode, max_t=100,
                             grace_period=cfg.grace_percent, reduction_factor=cfg.reduction_factor,
                             stop_last_trials=False)  # a trial at 100% still has to be evaluated
    if cfg.scheduler == "median":
        from ray.tune.schedulers import MedianStoppingRule

        return MedianStoppingRule(time_attr="progress", metric=cfg.stop_metric, mode=cfg.stop_mode,
                                  grace_period=cfg.grace_percent, min_samples_required=2)
    return None


def _check_trial_fits(exp: Experiment) -> None:
    """A trial needs its own CPUs plus its trainer's; on a fixed-size cluster a trial that cannot fit would wait
    for a worker group that never starts."""
    import ray

    cluster = ray.cluster_resources()
    cpus = exp.sweep.trial_cpus + exp.train.num_workers * exp.ray.worker_cpus
    gpus = exp.train.num_workers if exp.train.use_gpu else 0
    if cpus <= cluster.get("CPU", 0) and gpus <= cluster.get("GPU", 0):
        return
    message = (f"one trial needs {cpus:g} CPUs and {gpus} GPUs (sweep.trial_cpus {exp.sweep.trial_cpus:g} + "
               f"train.num_workers {exp.train.num_workers} x ray.worker_cpus {exp.ray.worker_cpus:g}), but the Ray "
               f"cluster has {cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} GPUs. Lower them, e.g. "
               f"--set ray.worker_cpus={max(0.1, cluster.get('CPU', 0) / max(1, exp.train.num_workers) - exp.sweep.trial_cpus):g}")
    if exp.ray.address or os.environ.get("RAY_ADDRESS"):
        print(f"[sweep] warning: {message} (fine if the cluster autoscales)")
    else:
        raise SlamError(message)


def sweep(exp: Experiment, space: SearchSpace) -> pd.DataFrame:
    validate_space(space, exp)
    name = sweep_name(exp, space)
    folder = exp.workdir_path / "sweeps" / name
    folder.mkdir(parents=True, exist_ok=True)
    cfg = exp.sweep
    if exp.train.max_minutes and cfg.max_concurrent_trials > 1 and not exp.train.use_gpu:
        print("[sweep] note: concurrent trials share CPU cores, so a time budget is not equal compute; "
              "prefer --set train.max_tokens=N --set train.max_minutes=null")
    init_ray(exp)
    _check_trial_fits(exp)
    # The schedulers and Optuna read metrics that only some results carry (validation reports vs the last).
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    writer = f"mlflow-writer-{name}"
    start_writer(exp.tracking_uri, writer)
    try:
        return _sweep(exp, space, name, folder, writer)
    finally:
        stop_writer(writer)


def _sweep(exp: Experiment, space: SearchSpace, name: str, folder: Path, writer: str) -> pd.DataFrame:
    from ray import tune

    from slam_ray.compare import sweep_report

    cfg = exp.sweep
    with start_run(exp, f"sweep {space.name}", {"slam_ray.kind": "sweep", "slam_ray.git_commit": _git_commit(),
                                                "slam_ray.output": str(folder)},
                   find_by={"slam_ray.sweep": name, "slam_ray.kind": "sweep"}) as parent, parent_run(parent):
        if not parent.reused:  # resumed, perhaps with another max_concurrent_trials: keep the first params
            parent.log_params({"space": {k: v.model_dump(exclude_none=True) for k, v in space.params.items()},
                               "sweep": cfg.model_dump(mode="json"), "experiment": exp.name})
        for stage in shared_stages(exp, space):
            stage_function(stage)(exp)

        base = exp.model_dump(mode="json")
        base["workdir"] = exp.workdir_location  # absolute: the default is relative to the current directory
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=base, sweep=name, parent_run_id=parent.run_id, writer=writer,
                                 cwd=os.getcwd()),
            {"cpu": cfg.trial_cpus})
        tune_dir = folder / "tune"
        if tune.Tuner.can_restore(str(tune_dir)):
            print(f"[sweep] resuming {name} from {tune_dir}: finished trials are kept")
            tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=space.to_tune(),
                tune_config=tune.TuneConfig(
                    num_samples=cfg.num_samples, search_alg=_search_alg(exp), scheduler=_scheduler(exp),
                    # the variant generator carries its own limit (and Tune warns if given both)
                    max_concurrent_trials=cfg.max_concurrent_trials if cfg.search == "optuna" else None),
                run_config=tune.RunConfig(
                    name="tune", storage_path=str(folder), verbose=1,
                    callbacks=[_tune_callback(exp.tracking_uri, writer, exp.tracking_experiment, name, cfg.scheduler,
                                              cfg.stop_metric)]),
            )
        results = tuner.fit()
        completed = sum(1 for r in results if r.metrics and r.metrics.get("final") == 1)
        errored = sum(1 for r in results if r.error is not None)
        stopped = len(results) - completed - errored
        parent.log_metrics({"trials/total": len(results), "trials/completed": completed,
                            "trials/stopped_early": stopped, "trials/errored": errored})
        table = sweep_report(exp.tracking_uri, exp.tracking_experiment, parent, cfg.metric, cfg.mode, folder)
        print(f"\nsweep {name}: {completed} completed, {stopped} stopped early, {errored} errored; "
              f"table and plots in {folder}")
    return table
