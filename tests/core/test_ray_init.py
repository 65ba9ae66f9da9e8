"""init_ray with `ray.address: null` outside a Ray job starts its own instance, whatever Ray's temp folder says;
joining a cluster, it releases the placement groups finished jobs left reserved (the rule here; on a real cluster:
the interrupted sweep in tests/sweeps/test_sweep.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

SCRIPT = """
import os
import sys
import ray
from slam_ray.config import Experiment
from slam_ray.core.runner import init_ray

exp = Experiment.model_validate({"name": "t", "workdir": sys.argv[1],
                                 "ray": {"num_cpus": 1, "include_dashboard": False}})
init_ray(exp)
print("CPUS", ray.cluster_resources().get("CPU"))
print("PREEMPTION_WATCHER", os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"))
ray.shutdown()
"""


@pytest.mark.ray
@pytest.mark.own_ray  # a Ray of its own in a private temp folder: make test's second lane
def test_a_stale_cluster_file_does_not_capture_a_local_run():
    # A private Ray temp folder (RAY_TMPDIR), short enough for Ray's socket paths, so the machine's own
    # /tmp/ray/ray_current_cluster, which other Ray users rely on, is never touched.
    tmp = Path(tempfile.mkdtemp(prefix="rini", dir="/tmp"))
    try:
        (tmp / "ray").mkdir()
        # what `ray start` leaves behind once its cluster is killed: the address of a GCS nobody serves
        (tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")}
        env["RAY_TMPDIR"] = str(tmp)
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp / "work")], capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert "CPUS 1.0" in proc.stdout  # a new local instance, sized by the config
        # one machine has no node to drain: Train's preemption watcher is off in the runs it starts
        assert "PREEMPTION_WATCHER 0" in proc.stdout
        assert any(tmp.glob("ray/session_*")), "the instance did not use the private temp folder"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_only_groups_a_finished_job_left_without_a_live_actor_are_orphaned():
    from ray.dashboard.modules.job.pydantic_models import JobDetails, JobType
    from ray.job_submission import JobStatus
    from ray.util.state.common import ActorState, PlacementGroupState

    from slam_ray.core.runner import orphaned_placement_groups

    def group(name: str, job: str, state: str = "CREATED", detached: bool = False) -> PlacementGroupState:
        return PlacementGroupState(placement_group_id=name, name="", creator_job_id=job, state=state,
                                   bundles=[{"unit_resources": {"CPU": 1.0}}], is_detached=detached)

    def job(job_id: str, status: JobStatus, kind: JobType = JobType.DRIVER) -> JobDetails:
        return JobDetails(type=kind, job_id=job_id, status=status, entrypoint="slam-ray sweep")

    jobs = [job("01000000", JobStatus.RUNNING), job("08000000", JobStatus.SUCCEEDED),
            job("09000000", JobStatus.FAILED), job("0a000000", JobStatus.STOPPED, JobType.SUBMISSION),
            job("0b000000", JobStatus.SUCCEEDED), job("0d000000", JobStatus.SUCCEEDED)]
    # a finished job's detached actor still owns the groups it created; Ray Train's detached placement-group
    # cleaner, left alive by a killed run (seen in the interrupted sweep's test), owns nothing
    actors = [ActorState(actor_id="a", class_name="Keeper", state="ALIVE", job_id="0b000000", name="keeper",
                         node_id="n", pid=1, ray_namespace="ns"),
              ActorState(actor_id="b", class_name="PlacementGroupCleaner", state="ALIVE", job_id="0d000000",
                         name="", node_id="n", pid=2, ray_namespace="ns")]
    groups = [group("left-by-a-killed-sweep", "08000000"), group("left-by-a-failed-run", "09000000"),
              group("pending-of-a-stopped-job", "0a000000", state="PENDING"),
              group("of-a-running-job", "01000000"), group("detached", "08000000", detached=True),
              group("already-removed", "09000000", state="REMOVED"), group("of-a-live-detached-actor", "0b000000"),
              group("of-an-unlisted-job", "0c000000"), group("beside-a-stuck-train-cleaner", "0d000000")]
    orphans = orphaned_placement_groups(groups, jobs, actors)
    assert [g.placement_group_id for g in orphans] == ["left-by-a-killed-sweep", "left-by-a-failed-run",
                                                       "pending-of-a-stopped-job", "beside-a-stuck-train-cleaner"]


LEAKING_DRIVER = """
import sys, time, ray
from ray.util.placement_group import placement_group

@ray.remote(num_cpus=0)
class Controller:  # created by a trial actor, as Ray Train's controller is inside a Tune trial
    def run(self):
        groups = []
        while True:  # restarting its worker group, so a reservation is always in flight
            groups.append(placement_group([{"CPU": 0.001}]))
            time.sleep(0.01)

@ray.remote(num_cpus=0)
class Trial:
    def start(self):
        self.controller = Controller.remote()
        self.controller.run.remote()

ray.init(address=sys.argv[1])
trial = Trial.remote()
ray.get(trial.start.remote())
print("job", ray.get_runtime_context().get_job_id(), flush=True)
time.sleep(600)
"""


@pytest.mark.ray
def test_joining_a_cluster_releases_what_a_killed_driver_left_reserved(ray_local, ray_address):
    """Ray's own race, reproduced on the session's instance: a driver SIGKILLed while an actor two levels down
    (a Train controller inside a Tune trial) keeps reserving leaves reservations registered after its job ended,
    never removed. The next driver to join releases exactly those, and the CPUs are free again."""
    from ray.util.state import list_actors, list_jobs, list_placement_groups

    from slam_ray.core.runner import release_orphaned_placement_groups

    free_before = ray_local.available_resources().get("CPU", 0.0)

    def left(job: str) -> set[str]:
        return {g.placement_group_id for g in list_placement_groups(
            address=ray_address, filters=[("creator_job_id", "=", job), ("state", "!=", "REMOVED")], limit=10_000)}

    leaked: set[str] = set()
    for _ in range(3):  # a race: it has left groups behind every time here, but a loaded machine may differ
        proc = subprocess.Popen([sys.executable, "-c", LEAKING_DRIVER, ray_address], stdout=subprocess.PIPE,
                                text=True)
        try:
            job = proc.stdout.readline().split()[-1]
            time.sleep(1)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        deadline = time.time() + 60
        while any(j.job_id == job and j.status == "RUNNING" for j in list_jobs(address=ray_address)) or list_actors(
                address=ray_address, filters=[("job_id", "=", job), ("state", "!=", "DEAD")]):
            assert time.time() < deadline, "the killed driver's job and actors did not end"
            time.sleep(0.2)
        time.sleep(1)
        leaked |= left(job)
        if leaked:
            break
    assert leaked, "Ray removed every group of the killed jobs: the race is fixed upstream (or not reproduced)"
    assert ray_local.available_resources().get("CPU", 0.0) < free_before
    assert leaked <= set(release_orphaned_placement_groups())
    assert not left(job)
    deadline = time.time() + 30
    while ray_local.available_resources().get("CPU", 0.0) < free_before:
        assert time.time() < deadline, "the released CPUs did not come back"
        time.sleep(0.2)
