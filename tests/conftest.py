"""Fixtures (session Ray, espeak-ng, an MLflow server, an S3 server, the reduced pipeline built once); the helpers
tests import are in helpers.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import FIXTURES, REDUCED_TRAIN, S3_SECRET, CliRun, free_port, small_experiment

from slam_ray.config import to_yaml
from slam_ray.core.runner import LOCAL_INSTANCE_ENV, start_local_ray

os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# what init_ray sets for a local instance (the session's Ray and the test clusters are one machine: no node to drain)
for name, value in LOCAL_INSTANCE_ENV.items():
    os.environ.setdefault(name, value)


# Fixtures that start or join a Ray instance: a test using one must be marked `ray` (the fast tier and the
# non-`ray` lane of `make test`, tests/lanes.py, run without Ray).
RAY_FIXTURES = {"ray_local", "ray_address", "reduced_quickstart", "reduced_pipeline"}
SHARED_PIPELINE = {"reduced_quickstart", "reduced_pipeline"}  # built once per pytest process


def pytest_collection_modifyitems(config, items):
    unmarked = [item.nodeid for item in items if RAY_FIXTURES & set(item.fixturenames) and "ray" not in item.keywords]
    if unmarked:
        raise pytest.UsageError(f"these tests use a Ray fixture ({', '.join(sorted(RAY_FIXTURES))}) but are not "
                                f"marked `ray`; add @pytest.mark.ray: {unmarked}")
    # `own_ray` tests run in make test's second lane (tests/lanes.py), beside the session's Ray but not on it
    misplaced = [item.nodeid for item in items if "own_ray" in item.keywords
                 and ("ray" not in item.keywords or RAY_FIXTURES & set(item.fixturenames))]
    if misplaced:
        raise pytest.UsageError(f"these tests are marked `own_ray` (they start Ray clusters of their own) but are not "
                                f"marked `ray` or use a session Ray fixture ({', '.join(sorted(RAY_FIXTURES))}): "
                                f"{misplaced}")
    # `local_ray` tests run in make test's second lane too, on a session Ray of that pytest process: one of them
    # using the shared pipeline would build it a second time there
    misplaced = [item.nodeid for item in items if "local_ray" in item.keywords
                 and ("ray" not in item.keywords or "own_ray" in item.keywords
                      or SHARED_PIPELINE & set(item.fixturenames))]
    if misplaced:
        raise pytest.UsageError(f"these tests are marked `local_ray` (a local Ray of their process and nothing of the "
                                f"shared pipeline) but are not marked `ray`, are marked `own_ray` too, or use "
                                f"{' or '.join(sorted(SHARED_PIPELINE))}: {misplaced}")
    gpu = [item for item in items if "gpu" in item.keywords]
    if not gpu:  # no torch import (~2 s of CPU) in a pytest run that selects no GPU test
        return
    import torch

    if not torch.cuda.is_available():
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session")
def fixtures() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"fixtures missing at {FIXTURES} (they are part of the repository)")
    return FIXTURES


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the in-process tests that need it; only this instance is shut down."""
    import ray

    # as init_ray starts one: with `make test`'s `own_ray` clusters running beside this instance, its workers must
    # still find its own state API (Train's placement-group cleaner asks with no address)
    start_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_local) -> str:
    """The session instance's address, for a `slam-ray` subprocess to join (`RAY_ADDRESS`, as `ray job submit`
    gives its driver) instead of starting a Ray of its own: ~12 s less per CLI run here. Tests whose subject is
    the CLI's own local Ray, or whose credentials live only in the CLI's environment (the S3 tests: a joined
    cluster's workers do not inherit the driver's environment), leave it out."""
    return ray_local.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def espeak() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        pytest.fail("espeak-ng is not installed; `make test` installs it (apt-get install espeak-ng)")
    return path


@pytest.fixture(scope="session")
def benchmark_layouts(tmp_path_factory, espeak) -> dict:
    """The miniature benchmark layouts (`helpers.make_benchmark_layouts`, ~50 espeak-ng calls), spoken once per test
    run for the tests that read them; none writes into them."""
    from helpers import make_benchmark_layouts

    return make_benchmark_layouts(tmp_path_factory.mktemp("layouts"))


@pytest.fixture(scope="session")
def reduced_quickstart(tmp_path_factory, ray_local, espeak) -> CliRun:
    """The reduced quickstart (`small_experiment`, a checkpoint every 10 steps) run once per test run through the
    real CLI, in a process that starts its own Ray beside this session's (`ray_local`), as on a shared machine.
    test_pipeline checks what it did and shows; other tests link its finished stages (`reduced_pipeline`)."""
    root = tmp_path_factory.mktemp("reduced")
    exp = small_experiment(root / "work", train=REDUCED_TRAIN)
    path = root / "tiny.yaml"
    path.write_text(to_yaml(exp))
    # A private Ray temp folder (short: Ray's socket paths are limited) whose logs test_pipeline reads; no log
    # de-duplication, so a line printed twice would show twice.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rcli", dir="/tmp"))
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DEDUP_LOGS")}
        proc = subprocess.run([sys.executable, "-m", "slam_ray.cli", "run", str(path)], capture_output=True, text=True,
                              cwd=root, env={**env, "RAY_TMPDIR": str(ray_tmp)}, timeout=900)
        data_logs = "".join(p.read_text(errors="replace") for p in ray_tmp.glob("ray/session_*/logs/ray-data/*.log"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode != 0:
        pytest.fail("the reduced quickstart failed:\n" + proc.stdout[-3000:] + proc.stderr[-5000:])
    return CliRun(exp, path, proc, data_logs)


@pytest.fixture(scope="session")
def reduced_pipeline(reduced_quickstart):
    """The reduced quickstart's experiment, every stage finished (synth, extract, pack, train, eval): tests link
    the stages they start after into their own workdirs with `helpers.link_upstream` and never write into them."""
    return reduced_quickstart.exp


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on its own port; only its process group is stopped afterwards."""
    port = free_port()
    log = open(tmp_path / "mlflow_server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server_artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        # MLflow 3's server job runner (huey consumers for its GenAI jobs) is not tracking: 91 s of CPU in a suite run
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("mlflow server did not start:\n" + (tmp_path / "mlflow_server.log").read_text()[-3000:])
            time.sleep(0.5)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


@pytest.fixture
def s3_server(tmp_path):
    """(endpoint URL, port, credentials env) of a real S3-compatible server (moto) on 127.0.0.1."""
    port = free_port()
    log = open(tmp_path / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    env = {"AWS_ACCESS_KEY_ID": "slamtestkey", "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    yield url, port, env
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    log.close()


