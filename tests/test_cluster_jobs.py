"""`ray job submit` on a real two-node Ray cluster on loopback: `ray start --head` plus a second node joined to
it, each with its own ports and temp folder, stopped afterwards by the PIDs of this cluster's processes only
(never `ray stop`, which would stop every Ray on the machine)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import free_port, small_experiment

from slam_ray.config import to_yaml
from slam_ray.stage_io import stage_dir

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def clean_env() -> dict[str, str]:
    """The environment the cluster's processes start with: this process's, less the OpenMP/MKL switches some
    libraries export on import (scikit-learn sets KMP_DUPLICATE_LIB_OK / KMP_INIT_AT_FORK, and a cluster
    started with those breaks torch in its job drivers), with token auth as the shipped configs use it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KMP_", "MKL_", "OMP_", "RAY_ADDRESS"))}
    return {**env, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}


def ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def cluster_pids(temp_dir: str) -> list[int]:
    """PIDs of the processes of the cluster whose temp folder is `temp_dir` (their command lines name it) and of
    their children (agents and workers rename themselves `ray::...`)."""
    import psutil

    pids = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                pids |= {proc.pid, *(child.pid for child in proc.children(recursive=True))}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sorted(pids)


@pytest.fixture
def two_node_cluster():
    """(job server address, env): a head (1 CPU) and a second node (1 CPU) on 127.0.0.1."""
    # One temp folder per node, as on real machines (short: Ray's socket paths have a length limit). Two nodes
    # sharing one unpack the job's working_dir into the same folder: the second node's unpacking deletes the
    # driver's current directory under it (then MKL "Cannot load libtorch_cpu.so", or getcwd() failing).
    temp_dirs = [tempfile.mkdtemp(prefix="sr", dir="/tmp") for _ in range(2)]
    gcs, dashboard = free_port(), free_port()
    env = clean_env()
    common = ["--num-cpus=1", "--object-store-memory=300000000", "--disable-usage-stats"]
    head = [ray_cli(), "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dirs[0]}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}", *common]
    worker = [ray_cli(), "start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dirs[1]}",
              f"--dashboard-agent-listen-port={free_port()}", *common]
    try:
        for command in (head, worker):
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 60
        while True:  # both nodes registered
            status = subprocess.run([ray_cli(), "status", f"--address=127.0.0.1:{gcs}"], env=env,
                                    capture_output=True, text=True, timeout=60)
            if status.stdout.count("node_") >= 2 or time.time() > deadline:
                break
            time.sleep(1)
        assert status.stdout.count("node_") >= 2, status.stdout + status.stderr
        yield address, env
    finally:
        pids = sorted({pid for folder in temp_dirs for pid in cluster_pids(folder)})  # children via living parents
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(3)
        for folder in temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)


def submit_and_wait(address: str, env: dict[str, str], entrypoint: list[str], timeout_s: float = 600) -> tuple[str, str]:
    """(final status, driver logs) of `ray job submit --working-dir REPO -- entrypoint`."""
    deadline = time.time() + 120
    while True:  # the job agent comes up a little after the node reports in
        submit = subprocess.run([ray_cli(), "job", "submit", f"--address={address}", f"--working-dir={REPO}",
                                 "--no-wait", "--", *entrypoint], env=env, capture_output=True, text=True, timeout=300)
        if submit.returncode == 0 or "No available agent" not in submit.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert submit.returncode == 0, submit.stdout[-2000:] + submit.stderr[-3000:]
    job_id = next(word.strip("'\"") for word in submit.stdout.split() if word.strip("'\"").startswith("raysubmit_"))
    deadline = time.time() + timeout_s
    status = "PENDING"
    while time.time() < deadline:
        done = subprocess.run([ray_cli(), "job", "status", f"--address={address}", job_id], env=env,
                              capture_output=True, text=True, timeout=60)
        out = (done.stdout + done.stderr).lower()  # stderr: "Job '...' succeeded" / "failed" / "Status ...: RUNNING"
        status = next((s.upper() for s in ("succeeded", "failed", "stopped") if s in out), "RUNNING")
        if status != "RUNNING":
            break
        time.sleep(3)
    logs = subprocess.run([ray_cli(), "job", "logs", f"--address={address}", job_id], env=env,
                          capture_output=True, text=True, timeout=60).stdout
    return status, logs


def test_ray_job_submit_on_two_nodes_runs_the_experiment_and_its_runs_are_in_mlflow(tmp_path, two_node_cluster,
                                                                                     mlflow_server, espeak):
    import mlflow

    address, env = two_node_cluster
    exp = small_experiment(tmp_path / "work", stages=["synth", "extract", "pack", "train", "eval"],
                           tracking={"uri": mlflow_server},
                           ray={"actor_cpus": 0.25, "worker_cpus": 0.5},
                           synth={"corpus": {"n_sentences": 120}, "num_actors": 2},
                           train={"max_steps": 10, "num_workers": 2},
                           eval={"tasks": ["word_order"], "n_pairs": 8})
    experiment_file = tmp_path / "job.yaml"
    experiment_file.write_text(to_yaml(exp))
    status, logs = submit_and_wait(address, env, [sys.executable, "-m", "slam_ray.cli", "run", str(experiment_file)],
                                   timeout_s=float(os.environ.get("JOB_TIMEOUT", 600)))
    assert status == "SUCCEEDED", logs[-6000:]

    mlflow.set_tracking_uri(mlflow_server)
    runs = mlflow.search_runs(experiment_names=[exp.name])
    stages = set(runs["tags.slam_ray.stage"])
    assert {"synth", "extract", "pack", "train", "eval"} <= stages, stages
    train_run = runs[runs["tags.slam_ray.stage"] == "train"].iloc[0]
    assert train_run["status"] == "FINISHED" and train_run["metrics.val/loss_final"] > 0
    eval_run = runs[runs["tags.slam_ray.stage"] == "eval"].iloc[0]
    assert 0.0 <= eval_run["metrics.eval/word_order/accuracy"] <= 1.0
    # the train stage's two workers: the manifest counts both workers' batches
    manifest = json.loads(stage_dir(exp, "train").manifest_path.read_text())
    assert manifest["counts"]["tokens"] == 10 * exp.train.batch_size * 2 * exp.pack.context_len
