"""The MLflow writer against a real sqlite store."""

from __future__ import annotations

import json

import pytest
from helpers import actors_of

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


def test_a_new_sqlite_store_is_a_copy_of_the_empty_store_mlflow_makes(tmp_path, monkeypatch):
    """A new workdir's SQLite store is seeded from an empty store MLflow made once per version (its schema
    migrations cost seconds per store): same tables, indexes and schema revision as one MLflow creates, the same
    Default experiment, runs log and read back, and an existing store is never replaced."""
    import sqlite3

    from mlflow.tracking import MlflowClient

    from slam_ray.core.tracking import mlflow_client, seed_sqlite_store

    monkeypatch.setenv("SLAM_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)

    def read(db, sql):
        with sqlite3.connect(db) as con:
            return con.execute(sql).fetchall()

    fresh = tmp_path / "fresh.db"
    MlflowClient(tracking_uri=f"sqlite:///{fresh}").search_experiments()  # what MLflow makes by itself
    seeded = tmp_path / "w" / "mlflow.db"
    client = mlflow_client(f"sqlite:///{seeded}")
    templates = list((tmp_path / "cache" / "mlflow").glob("empty-*.db"))
    assert len(templates) == 1
    # MLflow's own migrations write a table's constraints in varying order (two fresh stores differ so): compare
    # each statement's clauses as a set
    schema = "select type, name, tbl_name, sql from sqlite_master order by name"
    clauses = lambda db: [(t, n, tb, sorted(x.strip().rstrip(",") for x in (sql or "").splitlines()))  # noqa: E731
                          for t, n, tb, sql in read(db, schema)]
    assert clauses(seeded) == clauses(fresh)
    assert read(seeded, "select * from alembic_version") == read(fresh, "select * from alembic_version")
    default = "select experiment_id, name, artifact_location, lifecycle_stage from experiments"
    assert read(seeded, default) == read(fresh, default)

    run = client.create_run(client.create_experiment("tiny", artifact_location=(tmp_path / "art").as_uri()))
    client.log_metric(run.info.run_id, "loss", 1.5, step=3)
    stamp = templates[0].stat().st_mtime_ns
    seed_sqlite_store(seeded)  # exists: left alone
    again = mlflow_client(f"sqlite:///{seeded}")
    assert [m.value for m in again.get_metric_history(run.info.run_id, "loss")] == [1.5]
    mlflow_client(f"sqlite:///{tmp_path / 'w2' / 'mlflow.db'}")  # another store: the template is reused
    assert templates[0].stat().st_mtime_ns == stamp
    assert not list(tmp_path.rglob("*.tmp"))


def test_without_a_usable_cache_mlflow_makes_the_store_itself(tmp_path, monkeypatch):
    from slam_ray.core.tracking import mlflow_client

    (tmp_path / "not_a_folder").write_text("")
    monkeypatch.setenv("SLAM_RAY_CACHE", str(tmp_path / "not_a_folder"))  # the template cannot be made there
    client = mlflow_client(f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("tiny"))
    client.log_metric(run.info.run_id, "loss", 2.0)
    assert client.get_run(run.info.run_id).data.metrics == {"loss": 2.0}


def test_a_parent_run_left_running_by_a_killed_driver_is_closed_by_the_next_run_and_no_live_ones(tmp_path, capsys):
    """`slam-ray run`'s parent run carries its driver (host, boot, pid namespace, user, pid, start ticks); the
    experiment's next run closes KILLED a RUNNING parent whose driver is gone from this process table, and leaves
    those of live drivers and of other hosts, boots, containers and users."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from slam_ray.config import to_yaml
    from slam_ray.core.tracking import driver_gone, driver_identity, experiment_run, open_run

    exp = Experiment(name="killed", workdir=str(tmp_path / "work"))
    (tmp_path / "exp.yaml").write_text(to_yaml(exp))
    # a driver SIGKILLed inside its parent run (as `kill -9` on `slam-ray run` leaves it)
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal; from slam_ray.config import load_experiment; "
        "from slam_ray.core.tracking import experiment_run\n"
        f"with experiment_run(load_experiment({str(tmp_path / 'exp.yaml')!r})) as run:\n"
        "    print(run.run_id, flush=True); os.kill(os.getpid(), signal.SIGKILL)")],
        capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]
    dead_run = killed.stdout.split()[0]
    client = MlflowClient(tracking_uri(exp))
    assert client.get_run(dead_run).info.status == "RUNNING"
    dead_driver = client.get_run(dead_run).data.tags["slam_ray.driver"]
    assert driver_gone(dead_driver) and not driver_gone(driver_identity())

    # host:boot id:pid namespace:uid:pid:start ticks. Whether a pid is gone is only judged in the same process
    # table: another host, boot, pid namespace (a container) or user (hidepid hides others' processes) is left
    # alone, even with a dead driver's pid.
    host, boot, namespace, uid, pid, ticks = dead_driver.rsplit(":", 5)
    kind = {"slam_ray.kind": "experiment"}
    runs = {name: open_run(exp, name, {**kind, "slam_ray.driver": driver}).run_id for name, driver in {
        "live": driver_identity(),  # this process
        "pid reused": ":".join([*driver_identity().split(":")[:5], str(int(ticks) + 1)]),  # this pid, started later
        "other host": ":".join(["another-host", boot, namespace, uid, pid, ticks]),
        "other boot": ":".join([host, "0" * 8, namespace, uid, pid, ticks]),
        "other namespace": ":".join([host, boot, "1", uid, pid, ticks]),
        "other user": ":".join([host, boot, namespace, str(int(uid) + 1), pid, ticks]),
        "unreadable": "not an identity"}.items()}
    with experiment_run(exp) as new:
        assert client.get_run(new.run_id).data.tags["slam_ray.driver"] == driver_identity()
    assert "closed 2 run(s) of killed left RUNNING by a driver that is gone" in capsys.readouterr().out
    dead = client.get_run(dead_run)
    assert dead.info.status == "KILLED" and dead_driver in dead.data.tags["slam_ray.stop_reason"]
    status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"live": "RUNNING", "pid reused": "KILLED", "other host": "RUNNING", "other boot": "RUNNING",
                      "other namespace": "RUNNING", "other user": "RUNNING", "unreadable": "RUNNING"}
    assert client.get_run(new.run_id).info.status == "FINISHED"


@pytest.mark.ray
def test_the_drivers_writer_is_one_actor_on_its_node_that_writes_every_store_it_is_given(tmp_path, ray_local):
    """What Ray Train workers and sweep trials write through (`driver_writer`): one actor per driver, found again
    by name, placed on the driver's node (a sqlite store is a file on the driver's machine), writing each tracking
    URI's store; another process (a Ray task here, a Train worker in a run) writes the same runs through it by
    name, and a failed call raises in the caller."""
    from mlflow.tracking import MlflowClient

    from slam_ray.core.tracking import Tracker, driver_writer, open_run

    name = driver_writer()
    assert driver_writer() == name
    experiments = [Experiment(name=f"writer{i}", workdir=str(tmp_path / f"work{i}")) for i in range(2)]
    runs = [open_run(exp, "run") for exp in experiments]  # opened by the driver, which writes directly

    @ray_local.remote(num_cpus=0.1)
    def write_through(uri: str, run_id: str, step: int) -> None:
        tracker = Tracker(uri, run_id, name)
        tracker.log_metrics({"loss": 1.0 + step}, step=step)
        tracker.set_tags({"written_by": "writer"})
        tracker.set_status("FINISHED")

    ray_local.get([write_through.remote(run.uri, run.run_id, step) for step, run in enumerate(runs)])
    for step, run in enumerate(runs):
        logged = MlflowClient(run.uri).get_run(run.run_id)
        assert logged.data.metrics == {"loss": 1.0 + step} and logged.data.tags["written_by"] == "writer"
        assert logged.info.status == "FINISHED"
        assert MlflowClient(run.uri).get_metric_history(run.run_id, "loss")[0].step == step

    writer = ray_local.get_actor(name, namespace="slam_ray")
    assert {run.uri for run in runs} <= set(ray_local.get(writer.uris.remote()))
    [record] = [a for a in actors_of(ray_local) if a.name == name and a.state == "ALIVE"]
    assert record.node_id == ray_local.get_runtime_context().get_node_id()
    with pytest.raises(Exception, match="no-such-run"):
        Tracker(runs[0].uri, "no-such-run", name).log_metrics({"x": 1.0})
