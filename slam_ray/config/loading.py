"""Loading experiment files: a YAML file or a shipped recipe (`slam_ray/recipes/`), `key=value` overrides
(`--set`), copies with values set (`with_values`, what a sweep trial gets), validation errors that name the field,
and the YAML back (`to_yaml`)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from slam_ray.config.schema import Experiment
from slam_ray.errors import ConfigError


def recipe_names() -> list[str]:
    folder = resources.files("slam_ray") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_experiment_path(experiment: str) -> Path:
    """EXPERIMENT is a path to a YAML file or the name of a shipped recipe."""
    path = Path(experiment)
    if path.is_file():
        return path
    recipe = resources.files("slam_ray") / "recipes" / f"{experiment}.yaml"
    if recipe.is_file():
        return Path(str(recipe))
    raise ConfigError(
        f"experiment {experiment!r} is neither a YAML file nor a shipped recipe. "
        f"Give a path to an experiment file, or one of: {', '.join(recipe_names())}."
    )


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value typed by YAML: 3, 1.5, true, [a, b], null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not KEY=VALUE; write it like --set train.max_steps=100")
    key, raw = item.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override key {key!r} is malformed; write dotted section keys like train.optimizer.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return keys, value


def set_path(data: dict[str, Any], keys: list[str], value: Any) -> None:
    """data[k1][k2]...[kn] = value, creating sections on the way."""
    node = data
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys)}: {'.'.join(keys[: depth + 1])} is a value, not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        keys, value = parse_override(item)
        try:
            set_path(data, keys, value)
        except ConfigError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
    return data


def with_values(exp: Experiment, values: dict[str, Any], source: str) -> Experiment:
    """A copy of `exp` with dotted keys set to (already typed) values, validated like a file."""
    data = exp.model_dump(mode="json")
    for key, value in values.items():
        set_path(data, key.split("."), value)
    try:
        return Experiment.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from e


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid experiment config ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {field}: unknown key. Remove it or fix its spelling (see `slam-ray config show`).")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  - {field}: {e['msg']}{shown}. Fix it in the file or with --set {field}=...")
    return "\n".join(lines)


def read_yaml_mapping(path: Path, holds: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (`holds` says of what, for the error); `name` defaults to its stem."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of {holds}, not {type(data).__name__}")
    data.setdefault("name", path.stem)
    return data


def load_experiment(experiment: str | Path, overrides: list[str] | None = None) -> Experiment:
    path = resolve_experiment_path(str(experiment))
    data = read_yaml_mapping(path, "sections (name, workdir, train, ...)")
    data = apply_overrides(data, overrides or [])
    try:
        return Experiment.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from e


def to_yaml(exp: Experiment) -> str:
    return yaml.safe_dump(exp.model_dump(mode="json"), sort_keys=False)
