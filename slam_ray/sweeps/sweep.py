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
resumes (`Tuner.restore`) when the same command is run again: finished trials are not re-run. On Ctrl+C Tune
saves its state, stops the running trials and returns from `fit()`; the sweep then marks those trials' runs
KILLED, says how to resume and raises KeyboardInterrupt (exit code 130).
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd

from slam_ray.config import Experiment
from slam_ray.core.fingerprint import snapshot
from slam_ray.core.runner import init_ray
from slam_ray.core.stage_io import config_hash
from slam_ray.core.storage import workdir_location, workdir_path
from slam_ray.core.tracking import (
    Tracker,
    driver_writer,
    open_run,
    parent_run,
    start_run,
    store,
    tracking_uri,
    use_writer,
    writer_name,
)
from slam_ray.errors import SlamError
from slam_ray.pipeline import stage_function, summary_metrics
from slam_ray.sweeps.search_space import (
    REPEAT,
    SearchSpace,
    trial_count,
    trial_experiment,
    tune_param_space,
    validate_space,
)

TRIAL_TAG = "slam_ray.trial"  # "<sweep>/<trial id>" on a trial's run
IN_TRIAL_TAG = "slam_ray.in_trial"  # the same on the stage runs inside a trial
INTERRUPTED = "interrupted: the sweep was stopped (Ctrl+C) during this trial; run the same command to resume it"
# sweep name -> (trials stopped mid-run, trials created but never started) when Tune stopped early, set by the
# driver's TrialsToMlflow. A module global, not the callback's attribute: a restored Tuner runs an unpickled copy
# of the callback.
_interrupted: dict[str, tuple[list[str], list[str]]] = {}


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


def run_trial(values: dict[str, Any], *, base: dict[str, Any], sweep: str, parent_run_id: str, cwd: str) -> None:
    from ray import tune

    # Tune starts a trial in a folder of its own; relative paths in the experiment (inputs, corpus, models)
    # mean the driver's working directory.
    os.chdir(cwd)
    exp = trial_experiment(Experiment.model_validate(base), values)
    trial = f"{sweep}/{tune.get_context().get_trial_id()}"
    # The writer of the driver running the sweep now (a resumed sweep has a new driver: not a name saved with it).
    writer = writer_name()
    use_writer(writer)
    values = {("repeat" if k == REPEAT else k): v for k, v in values.items()}  # for labels and params
    label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in values.items())
    with parent_run(Tracker(tracking_uri(exp), parent_run_id, writer)):
        run = open_run(exp, label, {"slam_ray.kind": "trial", "slam_ray.sweep": sweep}, find_by={TRIAL_TAG: trial})
    # The driver closes this run when the trial stops early or fails (this process may be gone by then).
    with parent_run(run, {IN_TRIAL_TAG: trial}), snapshot():  # inputs given by path: fingerprinted once
        if not run.reused:  # a resumed trial logged them already (MLflow refuses to change a param)
            run.log_params({**exp.model_dump(mode="json"), "swept": dict(values)})
        for stage in exp.stages:
            out = stage_function(stage)(exp)
            run.set_tags({f"slam_ray.output.{stage}": out.root})
            if failed := out.failed_parts():  # e.g. an eval task whose dataset is missing: say so on the trial
                run.set_tags({"slam_ray.status": "partial", f"slam_ray.failed.{stage}": ",".join(failed)})
        final = summary_metrics(exp)
        run.log_metrics(final, step=int(final.get("train/steps", 0)))
        # The last result Tune sees: `final` marks a trial that ran to the end (vs stopped early).
        run.set_status("FINISHED")
        tune.report({**final, "progress": 100.0, "final": 1})


# ---------------------------------------------------------------------------------------------------------------
# the driver


class TrialsToMlflow:
    """Tune callback on the driver: the metric history Tune saw, then status and stop reason, on each trial's
    run (through the driver's writer)."""

    def __init__(self, uri: str, experiment: str, sweep: str, scheduler: str, stop_metric: str) -> None:
        self.uri, self.experiment, self.sweep = uri, experiment, sweep
        self.scheduler, self.stop_metric = scheduler, stop_metric
        self.run_ids: dict[str, str] = {}  # trial id -> its MLflow run, looked up once
        self.closed: set[str] = set()  # trials that ended (completed, stopped early, failed) in this session
        self.started: set[str] = set()  # trials started (or restarted) in this session

    @property
    def writer(self) -> str:
        return writer_name()  # this driver's: a restored Tuner unpickles this callback from an earlier driver

    def setup(self, **info) -> None:  # noqa: ANN003
        # A restored Tuner unpickles this callback: each session starts with none.
        self.closed, self.started = set(), set()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:  # noqa: ANN001
        self.started.add(trial.trial_id)

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

    def on_experiment_end(self, trials, **info) -> None:  # noqa: ANN001
        # Every trial ends through one of the hooks above, except when Tune stops early (SIGINT): it then saves
        # its state and stops the running trials without them (and marks them TERMINATED, like completed ones),
        # so the trials started but never closed here are the interrupted ones, and the pending ones never ran.
        # Their runs would otherwise stay RUNNING. (Trials that ended in an earlier session are neither.)
        mid_run = [t for t in trials if t.trial_id in self.started and t.trial_id not in self.closed]
        pending = [t for t in trials if t.trial_id not in self.started and t.status not in ("TERMINATED", "ERROR")]
        _interrupted[self.sweep] = ([t.trial_id for t in mid_run], [t.trial_id for t in pending])
        for trial in mid_run:
            self._close(trial, "KILLED", INTERRUPTED)

    def _close(self, trial, status: str, reason: str) -> None:  # noqa: ANN001
        self.closed.add(trial.trial_id)
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
        from ray.tune.schedulers import MedianStoppingRule, TrialScheduler

        class MedianStoppingWithoutPauses(MedianStoppingRule):
            """Tune's median rule, less its pauses: with too few trials past a point to compare and trials waiting
            (more trials than `max_concurrent_trials` fit), it paused the trial to let another run. A slam_ray
            trial reports no Tune checkpoint, so a paused trial starts again from scratch (its training too,
            unless `train.checkpoint_every` saved some): work thrown away, on a round robin."""

            def _on_insufficient_samples(self, tune_controller, trial, time):  # noqa: ANN001, ANN202
                return TrialScheduler.CONTINUE

        return MedianStoppingWithoutPauses(time_attr="progress", metric=cfg.stop_metric, mode=cfg.stop_mode,
                                           grace_period=cfg.grace_percent, min_samples_required=2)
    return None


def trial_workers(exp: Experiment) -> int:
    """The most Ray Train workers a trial runs at once: train's, or DPO's after it (dpo.num_workers, else train's)."""
    workers = exp.train.num_workers if "train" in exp.stages else 0
    if "dpo" in exp.stages:
        workers = max(workers, exp.dpo.num_workers or exp.train.num_workers)
    return workers


def trial_resources(exp: Experiment) -> tuple[float, float]:
    """CPUs and GPUs one trial holds at its peak: its own driver's plus its trainer's (or DPO's) workers', each
    of train's resources per worker (DPO's workers take the same)."""
    per_worker = exp.train.resources_per_worker or {"CPU": exp.ray.worker_cpus, "GPU": 1 if exp.train.use_gpu else 0}
    workers = trial_workers(exp)
    return exp.sweep.trial_cpus + workers * per_worker.get("CPU", 0), workers * per_worker.get("GPU", 0)


def check_trial_fits(exp: Experiment, cluster: dict[str, float]) -> None:
    """A trial needs its own CPUs plus its trainer's; on a fixed-size cluster a trial that cannot fit would wait
    for a worker group that never starts. `cluster` is `ray.cluster_resources()`."""
    cpus, gpus = trial_resources(exp)
    have_cpus, have_gpus = cluster.get("CPU", 0), cluster.get("GPU", 0)
    if cpus > have_cpus + 1e-9 or gpus > have_gpus:
        # the largest worker request (one decimal, rounded down) that fits beside the trial's driver
        workers = max(1, trial_workers(exp))
        fit = math.floor((have_cpus - exp.sweep.trial_cpus) / workers * 10) / 10
        message = (f"one trial needs {cpus:g} CPUs and {gpus:g} GPUs (sweep.trial_cpus {exp.sweep.trial_cpus:g} + "
                   f"{workers} Ray Train workers (train.num_workers, dpo.num_workers) x ray.worker_cpus "
                   f"{exp.ray.worker_cpus:g}), but the "
                   f"Ray cluster has {have_cpus:g} CPUs and {have_gpus:g} GPUs. Lower them, e.g. "
                   f"--set ray.worker_cpus={max(0.1, fit):g}")
        if exp.ray.address or os.environ.get("RAY_ADDRESS"):
            print(f"[sweep] warning: {message} (fine if the cluster autoscales)")
            return
        raise SlamError(message)
    concurrent = min(exp.sweep.max_concurrent_trials, int(have_cpus // cpus + 1e-9))
    if concurrent < exp.sweep.max_concurrent_trials:
        print(f"[sweep] note: a trial needs {cpus:g} CPUs, so {concurrent} of sweep.max_concurrent_trials "
              f"{exp.sweep.max_concurrent_trials} fit in the cluster's {have_cpus:g} CPUs at once")


def sweep(exp: Experiment, space: SearchSpace) -> pd.DataFrame:
    validate_space(space, exp)
    name = sweep_name(exp, space)
    folder = workdir_path(exp) / "sweeps" / name
    folder.mkdir(parents=True, exist_ok=True)
    cfg = exp.sweep
    if exp.train.max_minutes and cfg.max_concurrent_trials > 1 and not exp.train.use_gpu:
        print("[sweep] note: concurrent trials share CPU cores, so a time budget is not equal compute; "
              "prefer --set train.max_tokens=N --set train.max_minutes=null")
    init_ray(exp)
    import ray

    check_trial_fits(exp, ray.cluster_resources())
    # The schedulers and Optuna read metrics that only some results carry (validation reports vs the last).
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # The driver's own MLflow calls go through its writer too while trials write the same store.
    use_writer(driver_writer())
    try:
        return _sweep(exp, space, name, folder)
    finally:
        use_writer(None)


def _sweep(exp: Experiment, space: SearchSpace, name: str, folder: Path) -> pd.DataFrame:
    from ray import tune

    from slam_ray.sweeps.compare import sweep_report

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
        base["workdir"] = workdir_location(exp)  # absolute: the default is relative to the current directory
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=base, sweep=name, parent_run_id=parent.run_id, cwd=os.getcwd()),
            {"cpu": cfg.trial_cpus})
        tune_dir = folder / "tune"
        if tune.Tuner.can_restore(str(tune_dir)):
            print(f"[sweep] resuming {name} from {tune_dir}: finished trials are kept")
            tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=True)
        else:
            param_space, num_samples = tune_param_space(space, exp)
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    num_samples=num_samples, search_alg=_search_alg(exp), scheduler=_scheduler(exp),
                    # the variant generator carries its own limit (and Tune warns if given both)
                    max_concurrent_trials=cfg.max_concurrent_trials if cfg.search == "optuna" else None),
                run_config=tune.RunConfig(
                    name="tune", storage_path=str(folder), verbose=1,
                    callbacks=[_tune_callback(tracking_uri(exp), exp.tracking_experiment, name, cfg.scheduler,
                                              cfg.stop_metric)]),
            )
        _interrupted.pop(name, None)
        results = tuner.fit()
        completed = sum(1 for r in results if r.metrics and r.metrics.get("final") == 1)
        errored = sum(1 for r in results if r.error is not None)
        mid_run, pending = _interrupted.pop(name, ([], []))
        # Stopped between two trials, Tune may not have created the next one yet: count them too.
        if mid_run or pending or len(results) < trial_count(space, exp):
            print(f"\n[sweep] {name} interrupted: {completed} completed, {len(mid_run)} stopped mid-run (their "
                  f"MLflow runs are marked KILLED), the rest not started; run the same command again to resume: "
                  f"finished trials are kept, interrupted ones continue from their last checkpoint")
            raise KeyboardInterrupt  # the parent run ends KILLED and the CLI exits 130, like the other verbs
        stopped = len(results) - completed - errored
        parent.log_metrics({"trials/total": len(results), "trials/completed": completed,
                            "trials/stopped_early": stopped, "trials/errored": errored})
        table = sweep_report(tracking_uri(exp), exp.tracking_experiment, parent, cfg.metric, cfg.mode, folder)
        print(f"\nsweep {name}: {completed} completed, {stopped} stopped early, {errored} errored; "
              f"table and plots in {folder}")
    return table
