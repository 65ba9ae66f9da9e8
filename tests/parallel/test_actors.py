"""The Ray Data helper the stages share: with a `prepare` step (the GPU path's CPU decoding), the tasks run in
their own processes, never fused into the actors (Ray Data fuses a task step into the next actor step whenever
their remote args are equal, e.g. decode_cpus == actor_cpus)."""

from __future__ import annotations

import os

import pytest
from helpers import small_experiment


@pytest.mark.ray
def test_prepare_tasks_are_not_fused_into_the_actors(tmp_path, ray_local):
    from slam_ray.parallel.actors import map_rows

    def tag_pid(batch, column: str):  # defined here: Ray's workers cannot import a test module
        return batch.assign(**{column: os.getpid()})

    class TagActor:
        def __call__(self, batch):
            return batch.assign(actor_pid=os.getpid())

    exp = small_experiment(tmp_path / "work", ray={"actor_cpus": 0.5, "worker_cpus": 1})
    rows = [{"id": i} for i in range(64)]
    out = [df for df in map_rows(exp, rows, TagActor, {}, 2, 8, prepare=(tag_pid, {"column": "task_pid"}, 0.5))]
    rows_back = sum(len(df) for df in out)
    pairs = {(t, a) for df in out for t, a in zip(df["task_pid"], df["actor_pid"], strict=True)}
    assert rows_back == 64
    assert all(t != a for t, a in pairs)  # fused, each row's task would have run inside its actor's process
