"""init_ray with `ray.address: null` outside a Ray job starts its own instance, whatever Ray's temp folder says."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

SCRIPT = """
import sys
import ray
from slam_ray.config import Experiment
from slam_ray.core.runner import init_ray

exp = Experiment.model_validate({"name": "t", "workdir": sys.argv[1],
                                 "ray": {"num_cpus": 1, "include_dashboard": False}})
init_ray(exp)
print("CPUS", ray.cluster_resources().get("CPU"))
ray.shutdown()
"""


def test_a_stale_cluster_file_does_not_capture_a_local_run():
    # A private Ray temp folder (RAY_TMPDIR), short enough for Ray's socket paths, so the machine's own
    # /tmp/ray/ray_current_cluster, which other Ray users rely on, is never touched.
    tmp = Path(tempfile.mkdtemp(prefix="rini", dir="/tmp"))
    try:
        (tmp / "ray").mkdir()
        # what `ray start` leaves behind once its cluster is killed: the address of a GCS nobody serves
        (tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = str(tmp)
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp / "work")], capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert "CPUS 1.0" in proc.stdout  # a new local instance, sized by the config
        assert any(tmp.glob("ray/session_*")), "the instance did not use the private temp folder"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
