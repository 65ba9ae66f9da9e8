"""What stage keys leave out is read from the schema (slam_ray/config/schema.py field metadata), not from a list of
names: every field marked operational leaves every key unchanged, a user's dataset that happens to share an
operational field's name is keyed, a field added later with `since` keeps existing keys while it holds its
default, and a bumped format version changes the stage's key and every key after it."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo

from slam_ray.config import STAGES, Experiment, ModelConfig, TrainConfig, load_experiment
from slam_ray.core import stage_io
from slam_ray.core.fingerprint import snapshot
from slam_ray.core.stage_io import operational_fields, stage_key, stage_payload


def _keys(exp: Experiment) -> dict[str, str]:
    with snapshot():
        return {s: stage_key(exp, s) for s in STAGES}


def _other_value(info: FieldInfo, current: Any) -> Any:
    """A value of the field's type other than `current` (the model is copied without validation)."""
    if isinstance(current, bool):
        return not current
    if isinstance(current, int):
        return current + 3
    if isinstance(current, float):
        return current + 0.5
    text = str(info.annotation)
    if "dict" in text:
        return {"CPU": 3.0}
    if "str" in text:
        return "/elsewhere"
    if "float" in text:
        return 0.75
    return 7


def _with(model: BaseModel, path: list[str], value: Any) -> BaseModel:
    """`model` with the field at `path` (dotted, nested sections) set to `value`, other fields unchanged."""
    name, rest = path[0], path[1:]
    new = _with(getattr(model, name), rest, value) if rest else value
    return model.model_copy(update={name: new})


@pytest.fixture
def quickstart(tmp_path, monkeypatch) -> Experiment:
    monkeypatch.chdir(tmp_path)  # relative data paths are absent: keys do not depend on the checkout
    return load_experiment("quickstart")


def test_every_operational_field_leaves_every_stage_key_unchanged(quickstart):
    paths = operational_fields()
    assert "train.log_every" in paths and "extract.num_actors" in paths and "dpo.checkpoint_every" in paths
    before = _keys(quickstart)
    for path in paths:
        *parents, name = path.split(".")
        owner = quickstart
        for p in parents:
            owner = getattr(owner, p)
        changed = _with(quickstart, path.split("."), _other_value(type(owner).model_fields[name], getattr(owner, name)))
        assert _keys(changed) == before, f"{path} is marked operational but changes a stage key"
    # the same edit of a field that is not operational does change keys (the edits above are real edits)
    assert _keys(_with(quickstart, ["train", "seed"], 5))["train"] != before["train"]


def test_a_dataset_named_like_an_operational_field_is_keyed(tmp_path):
    """Keys used to drop every dict key named like an operational field, so the weight of a dataset named
    `log_every` in pack.mix changed no key and its old pack output was reused."""
    exp = Experiment.model_validate({"name": "mix", "workdir": str(tmp_path),
                                     "pack": {"inputs": [{"name": "log_every", "path": str(tmp_path / "a.jsonl")},
                                                         {"name": "books", "path": str(tmp_path / "b.jsonl")}],
                                              "mix": {"log_every": 0.5, "books": 0.5}}})
    heavier = _with(exp, ["pack", "mix"], {"log_every": 0.9, "books": 0.5})  # only its weight
    assert stage_key(heavier, "pack") != stage_key(exp, "pack")
    assert stage_payload(exp, "pack")["pack"]["mix"] == {"log_every": 0.5, "books": 0.5}


def test_a_field_added_with_since_keeps_keys_at_its_default(quickstart):
    class NewModel(ModelConfig):
        new_knob: int = Field(0, json_schema_extra={"since": "test"})

    class NewTrain(TrainConfig):  # as if both fields were added to config/schema.py (nested and top level)
        model: NewModel = NewModel()
        other_knob: bool = Field(False, json_schema_extra={"since": "test"})

    class UnmarkedTrain(TrainConfig):
        other_knob: bool = False

    def upgraded(train_class: type[TrainConfig], **model: Any) -> Experiment:
        train = quickstart.train.model_dump()
        train["model"] = NewModel(**{**train["model"], **model})
        return quickstart.model_copy(update={"train": train_class(**train)})

    before = _keys(quickstart)
    assert _keys(upgraded(NewTrain)) == before  # both new fields at their defaults: existing outputs stay valid
    knob = _keys(upgraded(NewTrain, new_knob=2))
    assert knob["train"] != before["train"] and knob["eval"] != before["eval"] and knob["pack"] == before["pack"]
    assert _keys(quickstart.model_copy(update={"train": NewTrain(**quickstart.train.model_dump(),
                                                                 other_knob=True)}))["train"] != before["train"]
    # why the mark is needed: without it, a new field enters the payload at its default and changes the key
    assert _keys(quickstart.model_copy(update={"train": UnmarkedTrain(**quickstart.train.model_dump())}))["train"] \
        != before["train"]


def test_a_bumped_format_version_changes_the_stage_and_everything_after(quickstart, monkeypatch):
    before = _keys(quickstart)
    assert stage_payload(quickstart, "synth").get("format_version") is None  # version 1: the keys from before versions
    assert stage_payload(quickstart, "pack")["format_version"] == stage_io.STAGE_FORMAT["pack"] == 3  # a recording on one side
    assert stage_payload(quickstart, "extract")["format_version"] == stage_io.STAGE_FORMAT["extract"] == 2  # words
    monkeypatch.setitem(stage_io.STAGE_FORMAT, "extract", 3)
    after = _keys(quickstart)
    assert after["synth"] == before["synth"]
    assert all(after[s] != before[s] for s in ("extract", "pack", "train", "dpo", "eval"))
