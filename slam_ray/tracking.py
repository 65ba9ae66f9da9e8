"""The one MLflow writer. Every stage logs through a `Tracker` (a run id plus a tracking URI), which is plain
data, so a Ray Train worker can rebuild it and write metrics to the run the driver opened.

Runs: `slam-ray run` opens a parent run named after the experiment; each stage is a child run tagged
`mlflow.parentRunId` (MLflow has no native nesting across processes). A stage run on its own is a top-level run.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slam_ray.config import Experiment

# The parent run of the experiment being run, if any (set by `experiment_run`).
_parent_run_id: str | None = None
_MAX_PARAM_CHARS = 6000


def _client(uri: str):
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@dataclass
class Tracker:
    uri: str
    run_id: str

    @property
    def client(self):
        if not hasattr(self, "_c"):
            self._c = _client(self.uri)
        return self._c

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, json.dumps(v) if isinstance(v, list | tuple) else str(v)[:_MAX_PARAM_CHARS]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)


def _experiment_id(exp: Experiment) -> str:
    client = _client(exp.tracking_uri)
    found = client.get_experiment_by_name(exp.tracking_experiment)
    if found is not None:
        return found.experiment_id
    artifact_location = None
    if exp.tracking_uri.startswith("sqlite:"):
        # Keep artifacts beside the store instead of in the current directory.
        artifact_location = (exp.workdir_path / "mlartifacts").as_uri()
    exp.workdir_path.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(exp.tracking_experiment, artifact_location=artifact_location)


@contextlib.contextmanager
def start_run(exp: Experiment, run_name: str, tags: dict[str, str] | None = None) -> Iterator[Tracker]:
    """Open a run (a child of the experiment's parent run when there is one); close it FINISHED or FAILED."""
    exp.workdir_path.mkdir(parents=True, exist_ok=True)
    client = _client(exp.tracking_uri)
    all_tags = {"slam_ray.experiment": exp.name, **(tags or {})}
    if _parent_run_id:
        all_tags["mlflow.parentRunId"] = _parent_run_id
    run = client.create_run(_experiment_id(exp), run_name=run_name, tags=all_tags)
    tracker = Tracker(exp.tracking_uri, run.info.run_id)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(run.info.run_id, status)


@contextlib.contextmanager
def experiment_run(exp: Experiment) -> Iterator[Tracker]:
    """The parent run of `slam-ray run`: the whole config as params, stages as children."""
    global _parent_run_id
    with start_run(exp, exp.name, {"slam_ray.kind": "experiment"}) as tracker:
        tracker.log_params(exp.model_dump(mode="json"))
        _parent_run_id = tracker.run_id
        try:
            yield tracker
        finally:
            _parent_run_id = None


def ui_hint(exp: Experiment) -> str:
    uri = exp.tracking_uri
    if uri.startswith(("http://", "https://")):
        return f"MLflow: open {uri}"
    return f"MLflow: mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)"
