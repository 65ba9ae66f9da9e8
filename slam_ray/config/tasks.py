"""Eval task files: the schema of a task definition (`slam_ray/evals/tasks/<name>.yaml`, or a YAML of one's own)
and finding one by name. It lives with the experiment schema because validating an experiment checks its tasks
(`EvalConfig`); the readers that turn a task's dataset into comparisons are `slam_ray/evals/readers.py`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slam_ray.errors import SlamError

# The readers of datasets (slam_ray.evals.readers.READERS: tests/evals/test_readers.py checks they agree) and the
# task types the eval stage handles itself: spoken grammar pairs, generation.
DATASET_READERS = ("zerospeech", "storycloze", "salmon", "manifest")
SPECIAL_READERS = ("grammar", "cross_modal", "cross_modal_storycloze", "generate")
CROSS_MODAL_READERS = ("cross_modal", "cross_modal_storycloze")  # text and speech: interleaved models only


class TaskSpec(BaseModel):
    """One benchmark, as written in `slam_ray/evals/tasks/<name>.yaml`."""

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    reader: str = Field(..., description="zerospeech | storycloze | salmon | manifest | grammar | cross_modal | "
                                       "cross_modal_storycloze | generate")
    reader_args: dict[str, Any] = Field(default_factory=dict)
    needs_path: bool = True
    aggregate_by: str | None = Field(None, description="column averaged first (ZeroSpeech: an item over its voices)")
    breakdown: list[str] = Field(default_factory=list, description="columns reported as sub-accuracies")
    reference: str = ""


def _tasks_folder():
    # Package data of slam_ray.evals, found from slam_ray so that config imports no evals module.
    return resources.files("slam_ray") / "evals" / "tasks"


def task_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in _tasks_folder().iterdir() if p.name.endswith(".yaml"))


def load_task(name_or_path: str) -> TaskSpec:
    """A shipped task by name (`sblimp`) or a task YAML file of your own."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = Path(str(_tasks_folder() / f"{name_or_path}.yaml"))
    if not path.is_file():
        raise SlamError(f"unknown eval task {name_or_path!r}: give a task YAML file or one of {', '.join(task_names())}")
    data = yaml.safe_load(path.read_text()) or {}
    data.setdefault("name", path.stem)
    try:
        spec = TaskSpec.model_validate(data)
    except ValidationError as e:
        raise SlamError(f"eval task {path}: {e}") from None
    if spec.reader not in (*DATASET_READERS, *SPECIAL_READERS):
        raise SlamError(f"eval task {path}: reader {spec.reader!r} is unknown; use one of "
                        f"{', '.join((*DATASET_READERS, *SPECIAL_READERS))}")
    return spec
