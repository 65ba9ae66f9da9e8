"""The one MLflow writer. Every stage logs through a `Tracker` (a run id plus a tracking URI), which is plain
data, so a Ray Train worker can rebuild it and write metrics to the run the driver opened.

Runs: `slam-ray run` opens a parent run named after the experiment; each stage is a child run tagged
`mlflow.parentRunId` (MLflow has no native nesting across processes). A stage run on its own is a top-level run.
`slam-ray sweep` opens a parent run per sweep, a child per trial, and the trial's stage runs beneath it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slam_ray.config import Experiment
from slam_ray.core.storage import cache_root, workdir_path

# The parent run that new runs nest under (set by `experiment_run` / a sweep trial), the tags every new run
# gets (a sweep trial tags its stage runs with its trial id), and the writer actor in use (the driver's, during a
# sweep and in its trials).
_parent_run_id: str | None = None
_extra_tags: dict[str, str] = {}
_writer: str | None = None
_MAX_PARAM_CHARS = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH in MLflow 3.17; longer values fail the call
_TRUNCATED = "...[truncated]"
WRITER_NAMESPACE = "slam_ray"


def mlflow_client(uri: str):
    """An MlflowClient for `uri`; a new SQLite store starts as a copy of an empty one (`seed_sqlite_store`)."""
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        try:
            seed_sqlite_store(Path(uri.removeprefix("sqlite:///")))
        except (OSError, sqlite3.Error):  # a read-only cache, say: MLflow then makes the store itself, only slower
            pass
    return MlflowClient(tracking_uri=uri)


def seed_sqlite_store(path: Path) -> None:
    """Create the SQLite store `path`, if it does not exist, as a copy of an empty store that MLflow itself made
    once per MLflow version (under the cache root). MLflow builds a new store by running its ~80 schema migrations,
    3.7 s on a 2-core machine for every new workdir (every test, sweep trial and experiment); the copy opens at the
    schema's head revision, so MLflow only checks it. The copy's Default experiment (id 0, which slam_ray does not
    use) gets the artifact location MLflow would have given it here."""
    if path.exists():
        return
    import mlflow

    template = cache_root() / "mlflow" / f"empty-{mlflow.__version__}.db"
    if not template.is_file():
        template.parent.mkdir(parents=True, exist_ok=True)
        building = template.with_name(f"{template.name}.{os.getpid()}.tmp")
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=f"sqlite:///{building}").search_experiments()  # MLflow creates the schema
        os.replace(building, template)
    path.parent.mkdir(parents=True, exist_ok=True)
    copy = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with contextlib.closing(sqlite3.connect(template)) as source, contextlib.closing(sqlite3.connect(copy)) as target:
            source.backup(target)  # a consistent copy, even of a template another process is reading
            target.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                           (str(Path.cwd() / "mlruns" / "0"),))
            target.commit()
        os.link(copy, path)  # only if absent: another process may have created the store meanwhile
    except FileExistsError:
        pass
    finally:
        copy.unlink(missing_ok=True)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def param_value(value: Any) -> str:
    """A param as MLflow stores it: lists as JSON, cut to MLflow's length limit with a marker (a long
    `extract.inputs` or task list would otherwise fail the whole call)."""
    text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    if len(text) > _MAX_PARAM_CHARS:
        text = text[: _MAX_PARAM_CHARS - len(_TRUNCATED)] + _TRUNCATED
    return text


def _tag_filter(tags: dict[str, str]) -> str:
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())


class MlflowStore:
    """Every MLflow call slam_ray makes, in one place. It runs in the driver, or inside the driver's writer actor
    (`driver_writer`) that its Ray Train workers and sweep trials send their calls to (many processes writing one
    sqlite file directly would fail with "database is locked")."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.client = mlflow_client(uri)

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(name, artifact_location=artifact_location)

    def create_run(self, experiment: str, artifact_location: str | None, run_name: str, tags: dict[str, str]) -> str:
        return self.client.create_run(self._experiment_id(experiment, artifact_location), run_name=run_name,
                                      tags=tags).info.run_id

    def find_runs(self, experiment: str, tags: dict[str, str], status: str | None = None) -> list[str]:
        return [run_id for run_id, _ in self.find_runs_tag(experiment, tags, None, status)]

    def find_runs_tag(self, experiment: str, tags: dict[str, str], tag: str | None,
                      status: str | None = None) -> list[tuple[str, str | None]]:
        """(run id, the value of `tag`) of the runs with these tags (and this status)."""
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return []
        query = _tag_filter(tags) + (f" and attributes.status = '{status}'" if status else "")
        return [(r.info.run_id, r.data.tags.get(tag) if tag else None)
                for r in self.client.search_runs([found.experiment_id], query, max_results=1000)]

    def log(self, run_id: str, metrics: list[tuple[str, float, int]] | None = None,
            params: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> None:
        import time

        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        metric_items = [Metric(k, float(v), now, step) for k, v, step in metrics or []]
        param_items = [Param(k, v) for k, v in (params or {}).items()]
        tag_items = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for i in range(0, max(len(metric_items), len(param_items), len(tag_items)), 100):
            self.client.log_batch(run_id, metrics=metric_items[i : i + 100], params=param_items[i : i + 100],
                                  tags=tag_items[i : i + 100])

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, path, artifact_path)

    def set_status(self, run_id: str, status: str, only_if_running: bool = False) -> None:
        if status == "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        elif not only_if_running or self.client.get_run(run_id).info.status == "RUNNING":
            self.client.set_terminated(run_id, status)


class MlflowWriter:
    """The actor behind a driver's writer: one `MlflowStore` per tracking URI it is asked to write to."""

    def __init__(self) -> None:
        self.stores: dict[str, MlflowStore] = {}

    def call(self, uri: str, method: str, *args: Any, **kwargs: Any) -> Any:
        if uri not in self.stores:
            self.stores[uri] = MlflowStore(uri)
        return getattr(self.stores[uri], method)(*args, **kwargs)

    def uris(self) -> list[str]:
        return list(self.stores)


class _RemoteStore:
    """Calls the `MlflowStore` for `uri` inside the named writer actor, synchronously (errors surface here)."""

    def __init__(self, name: str, uri: str) -> None:
        import ray

        self.actor = ray.get_actor(name, namespace=WRITER_NAMESPACE)
        self.uri = uri

    def __getattr__(self, method: str):
        import ray

        return lambda *args, **kwargs: ray.get(self.actor.call.remote(self.uri, method, *args, **kwargs))


_stores: dict[tuple[str, str | None, str | None], Any] = {}
_writer_handles: dict[tuple[str, str], Any] = {}


def _instance() -> str:
    """This process's node in the Ray instance it joined: a cached actor handle is valid only there (a process
    that shuts Ray down and starts it again can see the same job ids, and so writer names, in the new instance)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def store(uri: str, writer: str | None = None) -> MlflowStore | _RemoteStore:
    key = (uri, writer, _instance() if writer else None)
    if key not in _stores:
        _stores[key] = _RemoteStore(writer, uri) if writer else MlflowStore(uri)
    return _stores[key]


def driver_writer() -> str:
    """The name of this driver's MLflow writer, an actor started on first use on the driver's node and kept for
    the driver's life (it is stopped with it). Ray Train workers and sweep trials write through it: they need no
    MLflow of their own (~3 s of CPU each to import and open a SQL store), and a store that is a file on the
    driver's machine — the default sqlite store, also when the workdir is in a bucket — is written there even when
    the worker runs on another node (it would write a store of its own on that node's disk)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name, node = writer_name(), _instance()
    if (name, node) not in _writer_handles:
        # Keep the handle: an actor whose creator drops every handle is stopped, named or not.
        _writer_handles[name, node] = ray.remote(MlflowWriter).options(
            name=name, namespace=WRITER_NAMESPACE, get_if_exists=True, num_cpus=0, max_restarts=-1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
    return name


def writer_name() -> str:
    """The name of the writer of the driver this process works for (the driver itself, or one of its actors: a
    sweep trial, a Train worker)."""
    import ray

    return f"mlflow-writer-{ray.get_runtime_context().get_job_id()}"


def use_writer(name: str | None) -> None:
    """Send this process's MLflow calls through the named writer (None: write directly)."""
    global _writer
    _writer = name


@dataclass
class Tracker:
    """A run to write to: plain data, so a Ray Train worker can rebuild it (`Tracker(**asdict(t))`)."""

    uri: str
    run_id: str
    writer: str | None = None
    reused: bool = False  # an existing run found again (a resumed sweep), not a new one

    @property
    def store(self) -> MlflowStore | _RemoteStore:
        return store(self.uri, self.writer)

    def log_params(self, params: dict[str, Any]) -> None:
        flat = flatten(params)
        self.store.log(self.run_id, params={k: param_value(v) for k, v in flat.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        items = [(k, float(v), step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self.store.log(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.store.log(self.run_id, tags={k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.store.log_artifact(self.run_id, str(path), artifact_path)

    def set_status(self, status: str, only_if_running: bool = False) -> None:
        self.store.set_status(self.run_id, status, only_if_running)


def tracking_uri(exp: Experiment) -> str:
    """The experiment's MLflow tracking URI: `tracking.uri`, else a SQLite store in its workdir."""
    # Not $MLFLOW_TRACKING_URI: mlflow.set_tracking_uri() exports it, so one experiment's store would leak
    # into the next one run in the same process. Clusters pass --set tracking.uri=... instead.
    return exp.tracking.uri or f"sqlite:///{workdir_path(exp) / 'mlflow.db'}"


def _artifact_location(exp: Experiment) -> str | None:
    workdir_path(exp).mkdir(parents=True, exist_ok=True)
    if tracking_uri(exp).startswith("sqlite:"):
        return (workdir_path(exp) / "mlartifacts").as_uri()  # beside the store, not in the current directory
    return None


def open_run(exp: Experiment, run_name: str, tags: dict[str, str] | None = None,
             find_by: dict[str, str] | None = None) -> Tracker:
    """A new run (a child of the current parent run, if any) — or, with `find_by`, the existing run with those
    tags (a resumed sweep reuses its runs), set back to RUNNING."""
    backend = store(tracking_uri(exp), _writer)
    all_tags = {"slam_ray.experiment": exp.name, **_extra_tags, **(tags or {}), **(find_by or {})}
    if _parent_run_id:
        all_tags["mlflow.parentRunId"] = _parent_run_id
    if find_by and (found := backend.find_runs(exp.tracking_experiment, find_by)):
        tracker = Tracker(tracking_uri(exp), found[0], _writer, reused=True)
        tracker.set_status("RUNNING")
        return tracker
    run_id = backend.create_run(exp.tracking_experiment, _artifact_location(exp), run_name, all_tags)
    return Tracker(tracking_uri(exp), run_id, _writer)


def close_stale_runs(exp: Experiment, tags: dict[str, str], reason: str) -> int:
    """Mark KILLED the runs with these tags still RUNNING (their process died without closing them: a SIGKILLed
    driver, a lost node), saying why; returns how many. Only for runs whose owner holds a lock the caller now
    holds (a stage's build lock), so a RUNNING one cannot belong to a live process."""
    backend = store(tracking_uri(exp), _writer)
    stale = backend.find_runs(exp.tracking_experiment, tags, status="RUNNING")
    for run_id in stale:
        backend.log(run_id, tags={"slam_ray.stop_reason": reason})
        backend.set_status(run_id, "KILLED", only_if_running=True)
    return len(stale)


@contextlib.contextmanager
def start_run(exp: Experiment, run_name: str, tags: dict[str, str] | None = None,
              find_by: dict[str, str] | None = None) -> Iterator[Tracker]:
    """Open a run (see `open_run`); close it FINISHED, FAILED or KILLED."""
    tracker = open_run(exp, run_name, tags, find_by)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        # A sweep's driver may already have closed it (KILLED when the scheduler stopped the trial).
        tracker.set_status(status, only_if_running=True)


@contextlib.contextmanager
def parent_run(tracker: Tracker, extra_tags: dict[str, str] | None = None) -> Iterator[Tracker]:
    """Runs opened inside nest under `tracker` (and carry `extra_tags`)."""
    global _parent_run_id, _extra_tags
    saved = _parent_run_id, _extra_tags
    _parent_run_id, _extra_tags = tracker.run_id, {**_extra_tags, **(extra_tags or {})}
    try:
        yield tracker
    finally:
        _parent_run_id, _extra_tags = saved


def _start_ticks(pid: int | str) -> str:
    """A process's start time in clock ticks since boot (`/proc/<pid>/stat` field 22): unlike a wall-clock start
    time, a clock step (NTP after a VM pause) does not move it. Raises OSError when there is no such process."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[19]  # the fields after the command name, which may hold spaces or ")"


def _here() -> list[str]:
    """What must match for a pid to mean the same process table: host, boot, pid namespace, user."""
    import socket

    return [socket.gethostname(), Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
            str(os.stat("/proc/self/ns/pid").st_ino), str(os.getuid())]


def driver_identity() -> str:
    """This process as `host:boot id:pid namespace:uid:pid:start ticks` (Linux), for a later process to tell it is
    gone; "" where there is no /proc (never judged gone)."""
    try:
        return ":".join([*_here(), str(os.getpid()), _start_ticks("self")])
    except (OSError, AttributeError):  # no procfs (macOS), no getuid
        return ""


def driver_gone(identity: str) -> bool:
    """Whether the process `driver_identity()` named has exited. Only decidable from the same host, boot, pid
    namespace and user (another user's processes may be hidden: `hidepid`); anything else, or an identity this
    cannot read, is False — a live driver's run must never be closed. A pid reused by a later process reads as
    gone (its start ticks differ)."""
    parts = identity.rsplit(":", 5)
    try:
        if len(parts) != 6 or parts[:4] != _here():
            return False
        pid = int(parts[4])
    except (OSError, ValueError, AttributeError):
        return False
    try:
        return _start_ticks(pid) != parts[5]
    except FileNotFoundError:  # no /proc/<pid>: the process has exited
        return True
    except (OSError, IndexError):
        return False


def close_runs_of_gone_drivers(exp: Experiment, tags: dict[str, str]) -> int:
    """Mark KILLED the RUNNING runs with these tags whose driver process (tag `slam_ray.driver`) has exited on
    this host without closing them (a SIGKILLed `slam-ray run`); returns how many. Runs of live drivers (two
    drivers may run one experiment) and of other hosts stay as they are."""
    backend = store(tracking_uri(exp), _writer)
    closed = 0
    for run_id, driver in backend.find_runs_tag(exp.tracking_experiment, tags, "slam_ray.driver", status="RUNNING"):
        if driver and driver_gone(driver):
            backend.log(run_id, tags={"slam_ray.stop_reason": f"its driver ({driver}) exited without closing "
                                                               "the run (killed, or its node lost)"})
            backend.set_status(run_id, "KILLED", only_if_running=True)
            closed += 1
    return closed


@contextlib.contextmanager
def experiment_run(exp: Experiment) -> Iterator[Tracker]:
    """The parent run of `slam-ray run`: the whole config as params, stages as children. A parent run a killed
    driver of this experiment left RUNNING on this host is closed first (its stage runs close with their
    stages' next runs: `close_stale_runs`)."""
    kind = {"slam_ray.kind": "experiment", "slam_ray.experiment": exp.name}
    if closed := close_runs_of_gone_drivers(exp, kind):
        print(f"[tracking] closed {closed} run(s) of {exp.name} left RUNNING by a driver that is gone (KILLED)")
    with start_run(exp, exp.name, {**kind, "slam_ray.driver": driver_identity()}) as tracker, parent_run(tracker):
        tracker.log_params(exp.model_dump(mode="json"))
        yield tracker


def ui_hint(exp: Experiment) -> str:
    uri = tracking_uri(exp)
    if uri.startswith(("http://", "https://")):
        return f"MLflow: open {uri}"
    return f"MLflow: mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)"
