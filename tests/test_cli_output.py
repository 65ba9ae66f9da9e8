"""What a user sees: stage progress, results and real warnings, not Ray's internals (they stay in Ray's log files)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from helpers import small_experiment

from slam_ray.config import to_yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_a_run_prints_stage_lines_once_and_no_ray_internals(tmp_path, espeak):
    # decode_cpus == actor_cpus: the remote args Ray Data would fuse decoding into the encoding actors on
    exp = small_experiment(tmp_path / "work", stages=["synth", "extract", "pack", "train"],
                           synth={"corpus": {"n_sentences": 48}}, extract={"decode_cpus": 0.5},
                           train={"max_steps": 6, "log_every": 3, "val_reports": 2})
    path = tmp_path / "tiny.yaml"
    path.write_text(to_yaml(exp))
    # A private Ray temp folder (short: Ray's socket paths are limited) whose logs this test reads.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rcli", dir="/tmp"))
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DEDUP_LOGS")}
        env["RAY_TMPDIR"] = str(ray_tmp)
        proc = subprocess.run([sys.executable, "-m", "slam_ray.cli", "run", str(path)], capture_output=True,
                              text=True, cwd=tmp_path, env=env, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        data_logs = "".join(p.read_text(errors="replace") for p in ray_tmp.glob("ray/session_*/logs/ray-data/*.log"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    shown = proc.stdout + proc.stderr

    for stage in exp.stages:  # results and progress still reach the user
        assert f"[{stage}] done in" in proc.stdout
    assert "[synth] speak" in proc.stderr and "[extract] encode" in proc.stderr  # the stages' own bars
    assert "[train] step 6/6" in proc.stdout

    assert "RayDeprecationWarning" not in shown
    assert "logging_progress" not in shown and "Running Dataset" not in shown
    assert "streaming_executor" not in shown  # Ray Data's INFO lines: in ray-data.log only
    # Ray Train's own INFO lines: the controller's (RunConfig logging_config) and each worker's per-report line
    assert "Requesting resources" not in shown and "Reporting training result" not in shown
    # every line a Train worker printed reaches the terminal once (Train V2 also logged each print)
    worker_lines = Counter(re.sub(r"^.*?\) ", "", line) for line in shown.splitlines() if "[train]" in line)
    assert worker_lines and max(worker_lines.values()) == 1, worker_lines

    # Ray Data's own log still has the plan: decoding tasks, then a separate pool of encoding actors (unfused)
    assert "TaskPoolMapOperator[MapBatches(decode_rows)] -> ActorPoolMapOperator[MapBatches(EncodeActor)]" in data_logs
