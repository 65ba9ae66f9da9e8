"""The MLflow writer against a real sqlite store."""

from __future__ import annotations

import json

from slam_ray.config import Experiment
from slam_ray.core.tracking import start_run, tracking_uri


def test_a_list_param_longer_than_mlflows_limit_is_logged_truncated_and_the_run_succeeds(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    # MLflow cuts long values silently by default; with this off (a user's setting) it refuses the whole call.
    monkeypatch.setenv("MLFLOW_TRUNCATE_LONG_VALUES", "false")
    exp = Experiment(name="tracking", workdir=str(tmp_path / "work"))
    inputs = [f"/data/corpus/shard_{i:05d}.flac" for i in range(400)]  # ~10,000 characters as JSON
    assert len(json.dumps(inputs)) > 10_000
    with start_run(exp, "long params") as run:
        run.log_params({"extract": {"inputs": inputs, "frame_rate": 25}, "eval": {"tasks": ["lexical"]}})

    logged = MlflowClient(tracking_uri(exp)).get_run(run.run_id)
    assert logged.info.status == "FINISHED"
    value = logged.data.params["extract.inputs"]
    assert len(value) == MAX_PARAM_VAL_LENGTH
    assert value.endswith("...[truncated]")
    assert json.dumps(inputs).startswith(value.removesuffix("...[truncated]"))
    # short values are untouched
    assert logged.data.params["extract.frame_rate"] == "25"
    assert json.loads(logged.data.params["eval.tasks"]) == ["lexical"]
