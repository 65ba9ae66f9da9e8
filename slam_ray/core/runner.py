"""Runs one stage with the shared contract: reuse a complete output, else run it inside an MLflow run and
write `manifest.json` (config, counts, timings, status) and `errors.jsonl`. A stage some of whose parts failed
(an eval task whose dataset is missing) ends `partial`: not complete, so the next run re-enters it and redoes
only those parts."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from slam_ray.config import Experiment
from slam_ray.core.lock import Held, exclusive_lock
from slam_ray.core.stage_io import (
    StageDir,
    Timer,
    config_hash,
    stage_dir,
    stage_payload,
    upstream_dir,
    upstream_stages,
)
from slam_ray.core.storage import join, parent, read_text, workdir_location
from slam_ray.core.tracking import Tracker, close_stale_runs, start_run

log = logging.getLogger("slam_ray")


@dataclass
class StageResult:
    """What a stage body returns; the runner turns it into the manifest."""

    counts: dict[str, int | float] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    # Parts that failed (name -> reason): the output is `partial`, and a rerun retries only these.
    failed: dict[str, str] = field(default_factory=dict)


StageBody = Callable[[Experiment, StageDir, Tracker, Timer], StageResult]


# What a local instance (one machine) is started with; a joined cluster keeps Ray's defaults.
LOCAL_INSTANCE_ENV = {
    # Ray Train's PreemptionWatcher (an actor per worker group, polling whether a node is being drained) has nothing
    # to watch on one machine and cost a process start (~2 s of CPU) per Train run; a cluster's nodes may be preempted.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray's log monitor lists the logs folder again on every 0.1-s pass while it holds < 1000 files (CPU that grows
    # with every worker's log); at 0 it lists every 0.5 s instead, and new files' lines still all reach the driver.
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
}


def init_ray(exp: Experiment) -> None:
    """Join `ray.address` (or the cluster a job runs in), else start a local instance sized by config."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Train V2 tees a worker's print() into its logger's console handler as well: every `[train]`/`[dpo]` line
    # reached the terminal twice. Plain prints reach the driver once; Ray Train propagates this to its workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # `ray job submit` gives its driver RAY_ADDRESS (the job's cluster). Without either, start a new instance:
    # address=None would join whatever Ray's ray_current_cluster file names, even a cluster long killed.
    address = exp.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        release_orphaned_placement_groups()
        return
    start_local_ray(exp.ray.num_cpus or os.cpu_count(), exp.ray.num_gpus, exp.ray.include_dashboard)


def start_local_ray(num_cpus: float, num_gpus: int | None = None, include_dashboard: bool = True) -> None:
    """A new local Ray instance (address="local": never a cluster whose address a `ray start` left behind) with
    LOCAL_INSTANCE_ENV, whose workers find its own state API even beside other instances on the machine."""
    import ray

    for name, value in LOCAL_INSTANCE_ENV.items():  # set before the start, so that Tune trials' processes inherit it
        os.environ.setdefault(name, value)
    dashboard: dict[str, Any] = {}
    previous = os.environ.get("RAY_API_SERVER_ADDRESS")
    if include_dashboard:
        # Train V2's PlacementGroupCleaner actor queries the state API with no address: with a second Ray
        # instance on the machine it failed ("Found multiple active Ray instances", a traceback on the terminal)
        # and stopped guarding the run's placement group. Name this instance's dashboard to its workers through
        # the environment the new raylet inherits (a job runtime_env would start every worker through Ray's
        # runtime-env setup process, slower), then restore it so later subprocesses do not inherit it.
        port = _free_port()
        dashboard = {"dashboard_port": port}
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard,
                 logging_level=logging.WARNING, **dashboard)
    finally:
        if previous is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = previous


_FINISHED_JOB = {"SUCCEEDED", "FAILED", "STOPPED"}
TRAIN_PLACEMENT_GROUP_CLEANER = "PlacementGroupCleaner"


def orphaned_placement_groups(groups: list[Any], jobs: list[Any], actors: list[Any]) -> list[Any]:
    """The placement groups (Ray state API records) that nobody can use any more: not removed, not detached,
    created by a job the job table lists as finished, which has no live actor left (a detached actor keeps the
    groups it created after its job ends). A job the table does not list (Ray's internal namespaces) is not
    judged."""
    finished = {j.job_id for j in jobs if j.job_id and str(getattr(j.status, "value", j.status)) in _FINISHED_JOB}
    # Ray Train's detached PlacementGroupCleaner is the one live actor a killed Train run's job may keep, and it
    # owns nothing: seen alive for good beside its run's orphaned group, its controller dead (created, never told
    # of the group), so it does not count
    with_live_actors = {a.job_id for a in actors if a.class_name != TRAIN_PLACEMENT_GROUP_CLEANER}
    return [g for g in groups if g.state != "REMOVED" and not g.is_detached
            and g.creator_job_id in finished and g.creator_job_id not in with_live_actors]


def release_orphaned_placement_groups() -> list[str]:
    """Remove the placement groups finished jobs left reserved on the cluster this process joined; their ids.

    Ray removes a job's placement groups when the job ends, but a driver killed while Ray Train runs (seen: Ctrl+C
    and SIGKILL of `slam-ray sweep`; `ray job stop` ends a driver the same way) can leave one behind: its dying
    Train controller restarts the worker group, creating a new group just as it is killed itself (measured on
    Ray 2.60: registered 0.1 s after the job ended, never removed, its CPUs — or GPUs — reserved until the cluster
    restarts, so the resumed run waited for them for ever). A local instance dies with its driver; a cluster is
    cleaned here, when a driver joins it."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray.util.state import list_actors, list_jobs, list_placement_groups

    address = ray.get_runtime_context().gcs_address
    try:
        groups = list_placement_groups(address=address, filters=[("state", "!=", "REMOVED")], detail=True,
                                       limit=10_000, raise_on_missing_output=False)
        if not groups:
            return []
        orphans = orphaned_placement_groups(
            groups, list_jobs(address=address, limit=10_000, raise_on_missing_output=False),
            list_actors(address=address, filters=[("state", "!=", "DEAD")], limit=10_000,
                        raise_on_missing_output=False))
    except Exception as e:  # the state API needs the cluster's dashboard; without it nothing is judged
        log.warning("could not check the cluster for placement groups left by finished jobs: %s", e)
        return []
    for group in list(orphans):
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group.placement_group_id))))
        except Exception as e:  # e.g. removed meanwhile by Train's own cleaner: the others are still released
            log.warning("could not release placement group %s: %s", group.placement_group_id, e)
            orphans.remove(group)
    if orphans:
        reserved: Counter[str] = Counter()
        for group in orphans:
            for bundle in group.bundles or []:
                reserved.update(bundle.get("unit_resources", {}))
        held = ", ".join(f"{amount:g} {name}" for name, amount in sorted(reserved.items()))
        print(f"[ray] released {len(orphans)} placement group(s) that finished jobs left reserved ({held}): "
              "a driver killed while Ray Train ran can leave one behind")
    return [g.placement_group_id for g in orphans]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def exclusive(out: StageDir) -> Iterator[Held]:
    """One process builds a stage output at a time (concurrent sweep trials can share an upstream stage; two
    drivers on two nodes can share a workdir in a bucket): a lock `<key>.lock` beside the output, a file lock
    locally, a lease object in S3 (slam_ray/core/lock.py), which a stalled driver can lose: `held.check()`
    before anything is published."""
    with exclusive_lock(join(parent(out.root), f"{out.key}.lock"), out.stage) as held:
        yield held


def cached_json(exp: Experiment, kind: str, payload: dict[str, Any], name: str,
                build: Callable[[StageDir], dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """`build(folder)` once per payload, saved as WORKDIR/<kind>/<hash>/<name> (under the lock, written
    atomically, published with what `build` wrote beside it); every later call, from any process, reads it
    back. Returns (location, data)."""
    key = config_hash(payload)
    cache = StageDir(kind, key, join(workdir_location(exp), kind, key))
    with exclusive(cache) as held:
        text = read_text(cache.location(name))
        if text is not None:
            return cache.location(name), json.loads(text)
        cache.path.mkdir(parents=True, exist_ok=True)  # `build` may write files beside the result
        data = build(cache)
        if held.lost and (text := read_text(cache.location(name))) is not None:
            print(f"[{kind}] lost the lease while building; using the result of the driver that took over")
            return cache.location(name), json.loads(text)
        held.check()
        path = cache.path / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
        cache.publish()
        return cache.location(name), data


def run_stage(exp: Experiment, stage: str, body: StageBody) -> StageDir:
    out = stage_dir(exp, stage)
    with exclusive(out) as held:
        if out.is_complete():
            print(f"[{stage}] reusing complete output {out.root}")
            return out
        return _run(exp, stage, body, out, held)


def _run(exp: Experiment, stage: str, body: StageBody, out: StageDir, held: Held) -> StageDir:
    for upstream in upstream_stages(exp, stage):
        upstream_dir(exp, upstream)  # a clear error before any work if an input stage has not run
    print(f"[{stage}] running -> {out.root}")
    payload = stage_payload(exp, stage)
    manifest: dict[str, Any] = {"stage": stage, "key": out.key, "status": "running", "config": payload,
                                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out.write_manifest(manifest)
    timer = Timer()
    # A run of this output still RUNNING belongs to a driver that died building it (this one holds the lock now)
    close_stale_runs(exp, {"slam_ray.stage": stage, "slam_ray.key": out.key},
                     "its driver died mid-stage; a later run took the stage over")
    with start_run(exp, stage, {"slam_ray.stage": stage, "slam_ray.key": out.key}) as tracker:
        tracker.log_params(payload)
        tracker.set_tags({"slam_ray.output": out.root})
        start = time.perf_counter()
        try:
            result = body(exp, out, tracker, timer)
        except BaseException as e:
            if not held.lost:  # a lost lease: the manifest is the other driver's now
                out.write_manifest({**manifest, "status": "failed", "error": f"{type(e).__name__}: {e}"})
            raise
        timer.timings["total"] = round(time.perf_counter() - start, 3)
        held.check()  # a stalled driver whose lease was taken over publishes nothing
        out.write_errors(result.errors)
        out.publish()  # every file before the manifest that says the output is complete
        held.check()
        manifest.update(status="partial" if result.failed else "complete", counts=result.counts,
                        outputs=result.outputs, timings=timer.timings, metrics=result.metrics,
                        n_errors=len(result.errors), finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        if result.failed:
            manifest["failed"] = result.failed
            tracker.set_tags({"slam_ray.status": "partial", "slam_ray.failed": ",".join(result.failed)})
        out.write_manifest(manifest)
        tracker.log_metrics({**{f"count/{k}": v for k, v in result.counts.items()},
                             **{f"time/{k}_s": v for k, v in timer.timings.items()}, **result.metrics})
        tracker.log_artifact(out.manifest_path)
        if result.errors:
            tracker.log_artifact(out.errors_path)
    summary = ", ".join(f"{k}={v}" for k, v in result.counts.items())
    print(f"[{stage}] done in {timer.timings['total']:.1f}s ({summary}; {len(result.errors)} errors)")
    if result.failed:
        print(f"[{stage}] partial: {', '.join(result.failed)} failed; run the same command again to retry only "
              "those (the rest is kept)")
    return out
