"""The stage lock across nodes: with the workdir in a bucket (a real moto S3 server), two drivers — separate
processes, each with a cache of its own as on two machines — build one cache once, and a dead driver's lease
is taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DRIVER = """
import json, os, sys, time
from slam_ray.config import Experiment
from slam_ray.core.runner import cached_json

exp = Experiment.model_validate({"name": "lock", "workdir": sys.argv[1], "eval": {"tasks": ["word_order"]}})

def build(folder):
    with open(sys.argv[2], "a") as f:  # one line per build, shared by the drivers (same test machine)
        f.write(f"{os.getpid()}\\n")
    time.sleep(float(sys.argv[3]))
    while len(sys.argv) > 4 and not os.path.exists(sys.argv[4]):  # building until the test says so
        time.sleep(0.1)
    (folder.path / "beside.txt").write_text("published with the result")
    return {"built_by": os.getpid()}

_, data = cached_json(exp, "demo", {"what": "a cache two drivers want"}, "result.json", build)
print("RESULT", json.dumps(data), flush=True)
"""


@pytest.fixture
def bucket(tmp_path, s3_server):
    import boto3

    url, port, env = s3_server
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket="work")
    (tmp_path / "driver.py").write_text(DRIVER)
    return s3, f"s3://work/exp?endpoint_override=127.0.0.1:{port}&scheme=http", env


def _driver(tmp_path: Path, workdir: str, env: dict, node: str, build_seconds: float, lease_s: float,
            until: Path | None = None) -> subprocess.Popen:
    """A driver process on its own "node" (cache); its output goes to <node>.log."""
    args = [workdir, str(tmp_path / "builds.txt"), str(build_seconds), *([str(until)] if until else [])]
    return subprocess.Popen(
        [sys.executable, str(tmp_path / "driver.py"), *args],
        env={**os.environ, **env, "SLAM_RAY_CACHE": str(tmp_path / node), "SLAM_RAY_LEASE_SECONDS": str(lease_s)},
        stdout=open(tmp_path / f"{node}.log", "w"), stderr=subprocess.STDOUT, cwd=tmp_path)


def _wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def _lease_keys(s3) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket="work", Prefix="exp/demo/").get("Contents", [])
            if o["Key"].endswith(".lock")]


def _builders(tmp_path: Path) -> list[int]:
    path = tmp_path / "builds.txt"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def _log(tmp_path: Path, node: str) -> str:
    path = tmp_path / f"{node}.log"
    return path.read_text() if path.exists() else ""


def _result(proc: subprocess.Popen, tmp_path: Path, node: str) -> tuple[dict, str]:
    proc.wait(timeout=120)
    out = _log(tmp_path, node)
    assert proc.returncode == 0, out[-3000:]
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT ")), out


def test_two_drivers_on_two_nodes_build_one_cache_once(tmp_path, bucket):
    s3, workdir, env = bucket
    done = tmp_path / "done"
    first = _driver(tmp_path, workdir, env, "node_a", build_seconds=0, lease_s=2, until=done)
    _wait_for(lambda: _builders(tmp_path), "the first driver to start building")
    assert len(_lease_keys(s3)) == 1  # the lease is in the bucket, beside the cache folder
    second = _driver(tmp_path, workdir, env, "node_b", build_seconds=0, lease_s=2)
    _wait_for(lambda: "waiting for it" in _log(tmp_path, "node_b"), "the second driver to wait")
    # the lease expires after 2 s unrefreshed: only the holder's heartbeat keeps the second driver out
    time.sleep(4)
    done.touch()
    (a, _), (b, waited) = _result(first, tmp_path, "node_a"), _result(second, tmp_path, "node_b")
    assert _builders(tmp_path) == [first.pid]  # built once
    assert a == b == {"built_by": first.pid}  # the second driver read the first one's result from the bucket
    assert "is building this output; waiting for it" in waited and "took over" not in waited
    assert _lease_keys(s3) == []  # released
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="work", Prefix="exp/demo/")["Contents"]]
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == ["beside.txt", "result.json"]


def test_a_dead_drivers_lease_is_taken_over(tmp_path, bucket):
    s3, workdir, env = bucket
    dead = _driver(tmp_path, workdir, env, "node_a", build_seconds=600, lease_s=2)
    _wait_for(lambda: _builders(tmp_path), "the first driver to start building")
    os.kill(dead.pid, signal.SIGKILL)  # its node is gone: nobody releases or refreshes its lease
    dead.wait()
    assert len(_lease_keys(s3)) == 1
    start = time.time()
    taker = _driver(tmp_path, workdir, env, "node_b", build_seconds=0, lease_s=2)
    result, out = _result(taker, tmp_path, "node_b")
    assert result == {"built_by": taker.pid} and _builders(tmp_path) == [dead.pid, taker.pid]
    assert "took over the lease" in out and time.time() - start < 60
    assert _lease_keys(s3) == []


def test_a_stalled_driver_that_lost_its_lease_publishes_nothing_and_takes_the_other_result(tmp_path, bucket):
    """Driver A stalls past the expiry (SIGSTOP: a paused VM, a partition), B takes over and builds; when A wakes
    its heartbeat finds the lease gone and A, done building, publishes nothing over B's result (it overwrote it
    before) and returns B's."""
    s3, workdir, env = bucket
    done = tmp_path / "done"
    stalled = _driver(tmp_path, workdir, env, "node_a", build_seconds=0, lease_s=2, until=done)
    _wait_for(lambda: _builders(tmp_path), "the first driver to start building")
    os.kill(stalled.pid, signal.SIGSTOP)
    try:
        taker = _driver(tmp_path, workdir, env, "node_b", build_seconds=0, lease_s=2)
        b, out_b = _result(taker, tmp_path, "node_b")
        assert b == {"built_by": taker.pid} and "took over the lease" in out_b
    finally:
        os.kill(stalled.pid, signal.SIGCONT)
    _wait_for(lambda: "lost the lease" in _log(tmp_path, "node_a"), "the stalled driver to see its lease lost")
    done.touch()
    a, out_a = _result(stalled, tmp_path, "node_a")
    assert _builders(tmp_path) == [stalled.pid, taker.pid]  # A did build (it was stalled mid-build) ...
    assert a == b and "using the result of the driver that took over" in out_a  # ... but kept B's result
    body = s3.get_object(Bucket="work", Key=next(o["Key"] for o in s3.list_objects_v2(Bucket="work", Prefix="exp/demo/")[
        "Contents"] if o["Key"].endswith("result.json")))["Body"].read()
    assert json.loads(body) == {"built_by": taker.pid}
    assert _lease_keys(s3) == []
