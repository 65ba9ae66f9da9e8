"""`ray job submit` on a real two-node Ray cluster on loopback: `ray start --head` plus a second node joined to
it, each with its own ports and temp folder, stopped afterwards by the PIDs of this cluster's processes only
(never `ray stop`, which would stop every Ray on the machine)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from helpers import FIXTURES, S3_SECRET, free_port, small_experiment

from slam_ray.config import to_yaml
from slam_ray.core.stage_io import stage_dir
from slam_ray.speech.audio import decode_audio
from slam_ray.speech.tokenizer import UnitTokenizer
from slam_ray.speech.units import read_unit_shards

pytestmark = [pytest.mark.ray, pytest.mark.own_ray, pytest.mark.slow]  # own_ray: tests/lanes.py

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
def two_node_cluster(tmp_path, s3_server):
    """(job server address, env): a head (1 CPU) and a second node (1 CPU) on 127.0.0.1, with the S3 server's
    credentials in their environment and a staging cache of their own each (as two machines would have), so
    a file one node needs from a bucket workdir must really come from the bucket."""
    # One temp folder per node, as on real machines (short: Ray's socket paths have a length limit). Two nodes
    # sharing one unpack the job's working_dir into the same folder: the second node's unpacking deletes the
    # driver's current directory under it (then MKL "Cannot load libtorch_cpu.so", or getcwd() failing).
    temp_dirs = [tempfile.mkdtemp(prefix="sr", dir="/tmp") for _ in range(2)]
    gcs, dashboard = free_port(), free_port()
    env = {**clean_env(), **s3_server[2]}
    caches = [tmp_path / "cache_head", tmp_path / "cache_node2"]
    common = ["--num-cpus=1", "--object-store-memory=300000000", "--disable-usage-stats"]
    head = [ray_cli(), "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dirs[0]}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}", *common]
    worker = [ray_cli(), "start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dirs[1]}",
              f"--dashboard-agent-listen-port={free_port()}", *common]
    try:
        for command, cache in ((head, caches[0]), (worker, caches[1])):
            done = subprocess.run(command, env={**env, "SLAM_RAY_CACHE": str(cache)}, capture_output=True,
                                  text=True, timeout=180)
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
        yield address, env, temp_dirs
    finally:
        import psutil

        pids = sorted({pid for folder in temp_dirs for pid in cluster_pids(folder)})  # children via living parents
        for sig in (signal.SIGTERM, signal.SIGKILL):
            procs = []
            for pid in pids:
                try:
                    proc = psutil.Process(pid)
                    proc.send_signal(sig)
                    procs.append(proc)
                except psutil.NoSuchProcess:
                    pass
            _, alive = psutil.wait_procs(procs, timeout=3)  # returns as soon as every one has exited
            pids = [proc.pid for proc in alive]
        for folder in temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)


def kill_first(temp_dirs: list[str], title: str) -> int | None:
    """SIGKILL the first process of this cluster whose title (Ray renames actor processes `ray::<class>...`)
    starts with `title`; its PID, or None if there is none yet."""
    import psutil

    for pid in sorted({pid for folder in temp_dirs for pid in cluster_pids(folder)}):
        try:
            cmdline = psutil.Process(pid).cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if cmdline and cmdline[0].startswith(title):
            os.kill(pid, signal.SIGKILL)
            return pid
    return None


def submit_and_wait(address: str, env: dict[str, str], entrypoint: list[str], log: Path, timeout_s: float = 600,
                    while_running: Callable[[], None] = lambda: None) -> tuple[str, str]:
    """(final status, output) of `ray job submit --working-dir REPO -- entrypoint` as a user runs it: one CLI that
    submits, tails the driver's logs to `log` and reports how the job ended (polling with `ray job status` instead
    cost a CLI start, ~3 s of CPU, per poll: 40 of them a run here); `while_running` is called about every second
    until it ends."""
    deadline = time.time() + 120
    while True:  # the job agent comes up a little after the node reports in
        with open(log, "w") as out:
            submit = subprocess.Popen([ray_cli(), "job", "submit", f"--address={address}", f"--working-dir={REPO}",
                                       "--", *entrypoint], env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
            stop = time.time() + timeout_s
            while submit.poll() is None and time.time() < stop:
                while_running()
                time.sleep(1)
            if submit.poll() is None:
                submit.kill()
                submit.wait()
        output = log.read_text(errors="replace")
        if "No available agent" not in output or "raysubmit_" in output or time.time() > deadline:
            break
        time.sleep(3)
    ended = re.findall(r"Job 'raysubmit_\w+' (succeeded|failed|was stopped)", output)  # the CLI's last words
    return (ended[-1].removeprefix("was ").upper() if ended else "RUNNING"), output


def test_ray_job_submit_on_two_nodes_with_the_workdir_in_a_bucket(tmp_path, two_node_cluster, s3_server,
                                                                   mlflow_server, espeak, monkeypatch):
    """The reduced quickstart as a job on two nodes, every stage output in a bucket, one encoding actor and one
    training worker SIGKILLed while it runs: it succeeds with every utterance's units exactly once and training at
    its target step, its runs are in the MLflow server, its checkpoints (Ray Train's run under `train.storage_path`,
    another prefix) load from the bucket and eval scores each of them from there, the secret key is nowhere in what
    MLflow or a manifest records, and re-running the same command elsewhere (a fresh cache) reuses every stage from
    the bucket's manifests. Extraction also reads inputs from another bucket beside the synthesized speech: a folder
    (recursively) and a JSONL manifest with paths relative to it; every good object yields the units of the same
    file read from disk, a corrupt object and a manifest entry pointing at nothing are error lines."""
    import boto3
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM

    from slam_ray.core.storage import model_source

    address, env, temp_dirs = two_node_cluster
    url, port, credentials = s3_server
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket="slam")
    # a user's own speech in a bucket, beside what synth speaks: a folder and a manifest, one object of each corrupt
    # or missing, one that is not audio (skipped)
    s3.create_bucket(Bucket="speech")
    s3.upload_file(str(FIXTURES / "audio1.flac"), "speech", "corpus/a/audio1.flac")
    s3.upload_file(str(FIXTURES / "audio2.flac"), "speech", "corpus/b/audio2.flac")
    s3.put_object(Bucket="speech", Key="corpus/bad.flac", Body=b"not audio at all")
    s3.put_object(Bucket="speech", Key="corpus/notes.txt", Body=b"not an audio suffix: skipped")
    manifest_rows = [{"id": "again", "path": "../corpus/a/audio1.flac", "text": "the same file", "speaker": "s1"},
                     {"id": "gone", "path": "../corpus/missing.flac"}]
    s3.put_object(Bucket="speech", Key="lists/more.jsonl", Body="\n".join(map(json.dumps, manifest_rows)).encode())
    query = f"?endpoint_override=127.0.0.1:{port}&scheme=http"
    bucket_inputs = [f"s3://speech/corpus{query}", f"s3://speech/lists/more.jsonl{query}"]
    exp = small_experiment(f"s3://slam/runs/job{query}", stages=["synth", "extract", "pack", "train", "eval"],
                           tracking={"uri": mlflow_server},
                           ray={"actor_cpus": 0.25, "worker_cpus": 0.5},
                           synth={"corpus": {"n_sentences": 120}, "num_actors": 2},
                           # encoding actors, one of which is killed
                           extract={"local_encode_seconds": 0, "inputs": ["@synth", *bucket_inputs]},
                           train={"max_steps": 10, "checkpoint_every": 5, "num_workers": 2, "max_failures": 2,
                                  "storage_path": f"s3://slam/ckpt{query}"},
                           eval={"tasks": ["word_order"], "n_pairs": 8, "checkpoints": ["final", "all"]})
    experiment_file = tmp_path / "job.yaml"
    experiment_file.write_text(to_yaml(exp))
    killed: dict[str, int] = {}

    def kill_once_each() -> None:
        for title in ("ray::MapWorker(MapBatches(EncodeActor))", "ray::RayTrainWorker"):
            if title not in killed and (pid := kill_first(temp_dirs, title)):
                killed[title] = pid

    status, logs = submit_and_wait(address, env, [sys.executable, "-m", "slam_ray.cli", "run", str(experiment_file)],
                                   tmp_path / "job.log", timeout_s=float(os.environ.get("JOB_TIMEOUT", 600)),
                                   while_running=kill_once_each)
    assert status == "SUCCEEDED", logs[-6000:]
    assert len(killed) == 2, f"only {killed} could be killed while the job ran"

    mlflow.set_tracking_uri(mlflow_server)
    runs = mlflow.search_runs(experiment_names=[exp.name])
    stages = set(runs["tags.slam_ray.stage"])
    assert {"synth", "extract", "pack", "train", "eval"} <= stages, stages
    train_run = runs[runs["tags.slam_ray.stage"] == "train"].iloc[0]
    assert train_run["status"] == "FINISHED" and train_run["metrics.val/loss_final"] > 0
    eval_run = runs[runs["tags.slam_ray.stage"] == "eval"].iloc[0]
    assert 0.0 <= eval_run["metrics.eval/word_order/accuracy"] <= 1.0
    assert train_run["tags.slam_ray.output"].startswith("s3://slam/runs/job/train/")

    # elsewhere (this process, its own empty cache): manifests, the Ray Train run and checkpoints in the bucket
    for k, v in {**credentials, "SLAM_RAY_CACHE": str(tmp_path / "elsewhere")}.items():
        monkeypatch.setenv(k, v)
    train_out = stage_dir(exp, "train")
    manifest = train_out.read_manifest()
    assert manifest["status"] == "complete"
    # the train stage's two workers: the manifest counts both workers' batches
    assert manifest["counts"]["tokens"] == 10 * exp.train.batch_size * 2 * exp.pack.context_len
    listing = json.loads(train_out.local("checkpoints.json").read_text())
    assert [c["step"] for c in listing] == [0, 5, 10]
    assert all(c["path"].startswith(f"s3://slam/ckpt/tiny-train-{train_out.key}/checkpoint_") for c in listing)
    final = AutoModelForCausalLM.from_pretrained(model_source(train_out.location("checkpoint")))
    reported = [AutoModelForCausalLM.from_pretrained(model_source(c["path"])) for c in listing]  # each loads
    assert final.config.vocab_size == exp.vocab_size
    for a, b in zip(final.state_dict().values(), reported[-1].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(reported[0].state_dict().values(), final.state_dict().values(), strict=True))
    # eval's `all` read each checkpoint from the bucket: the step-10 one scores as the final one
    results = json.loads(stage_dir(exp, "eval").local("results.json").read_text())
    assert [k for k in results if k.startswith("word_order@step_")] == [f"word_order@step_{n}" for n in (0, 5, 10)]
    assert results["word_order@step_10"]["accuracy"] == results["word_order"]["accuracy"]
    assert results["word_order@step_5"]["checkpoint"].startswith("s3://slam/ckpt/")

    # the secret key is nowhere: params, tags, metrics' names, artifacts, manifests
    for run_id in runs["run_id"]:
        run = mlflow.get_run(run_id)
        blob = json.dumps([run.data.params, run.data.tags, list(run.data.metrics)])
        assert S3_SECRET not in blob and credentials["AWS_ACCESS_KEY_ID"] not in blob
        folder = mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(tmp_path / "art" / run_id))
        for path in Path(folder).rglob("*"):
            assert not path.is_file() or S3_SECRET.encode() not in path.read_bytes(), path
    for stage in exp.stages:
        assert S3_SECRET not in json.dumps(stage_dir(exp, stage).read_manifest())
    assert not (tmp_path / "work").exists()  # nothing went to a local workdir
    synthesized = pd.read_parquet(stage_dir(exp, "synth").local("index.parquet"))
    extracted = stage_dir(exp, "extract")
    extracted.local("units")
    units = read_unit_shards(extracted.path)
    is_spoken = units.id.isin(set(synthesized.id))
    spoken = units[is_spoken]
    assert len(spoken) == len(synthesized) > 0 and sorted(spoken.id) == sorted(synthesized.id)  # each exactly once
    assert all(p.startswith("s3://slam/runs/job/synth/") for p in spoken.path)  # read by the actors from the bucket
    # the user's bucket: each good object once, with the units of the same file read from disk
    assert sorted(units[~is_spoken].id) == ["a/audio1", "again", "b/audio2"]
    own = {r["id"]: r for r in units[~is_spoken].to_dict("records")}
    assert own["again"]["text"] == "the same file" and own["a/audio1"]["path"].startswith("s3://speech/corpus/a/")
    errors = [json.loads(line) for line in extracted.local("errors.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in errors) == ["bad", "gone"]
    tokenizer = UnitTokenizer.load(extracted.local("tokenizer"))
    for uid, local in (("a/audio1", "audio1"), ("again", "audio1"), ("b/audio2", "audio2")):
        assert list(own[uid]["units"]) == tokenizer.encode(decode_audio(FIXTURES / f"{local}.flac"))["units"].tolist()

    # a killed driver is recovered by re-running the same command: here every stage is complete, so all reuse
    rerun = subprocess.run([sys.executable, "-m", "slam_ray.cli", "run", str(experiment_file)], cwd=tmp_path,
                           env={**os.environ, "SLAM_RAY_CACHE": str(tmp_path / "again")}, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert rerun.stdout.count("reusing complete output s3://slam/runs/job/") == 5, rerun.stdout[-3000:]
