"""Search spaces as YAML: which experiment fields a sweep varies, and how.

```yaml
description: AdamW vs AdEMAMix at three learning rates
params:                                   # dotted experiment fields (see `slam-ray config show`)
  train.optimizer.name: {grid: [adamw, ademamix]}
  train.optimizer.lr: {loguniform: [3.0e-4, 1.0e-2]}
sweep: {scheduler: asha}                  # optional: defaults for the experiment's `sweep` section
fixed: {stages: [synth, extract, pack, train]}   # optional: fields every trial shares
```

Distributions: `grid` (every value, crossed with the other grid axes), `choice` (one value per sample),
`uniform` / `loguniform` ([low, high]), `randint` ([low, high), like `range`). A key may address a field of a
mapping section, e.g. `pack.mix.stories`. Every key and every value (both ends of a range) is validated
against the experiment schema before any trial starts, so a typo fails in a second, not an hour in.

Repeats: with `sweep.search: grid`, `sweep.num_samples: N` runs the grid N times, and repeat r adds r to
`train.seed` and `dpo.seed` (model init, data order, dropout), so each repeat is its own trial with its own stage
outputs and runs; pack's split and eval's pairs keep their seeds, so every repeat is measured on the same data.
"""

from __future__ import annotations

import itertools
import math
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from slam_ray.config import Experiment, SweepConfig, read_yaml_mapping, with_values
from slam_ray.errors import ConfigError

MAX_COMBINATIONS_CHECKED = 2000
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
# The grid axis a repeated grid search gets. Tune crosses grid axes in sorted key order, the first varying
# fastest; "~" sorts after every field name, so the whole grid runs before the next repeat starts.
REPEAT = "~repeat"
REPEAT_SEEDS = ("train.seed", "dpo.seed")


class Distribution(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grid: list[Any] | None = Field(None, min_length=1)
    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)} (got {', '.join(given) or 'none'})")
        low_high = self.uniform or self.loguniform or self.randint
        if low_high and not low_high[0] < low_high[1]:
            raise ValueError("a range is [low, high] with low < high")
        if self.loguniform and self.loguniform[0] <= 0:
            raise ValueError("loguniform needs low > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    def edge_values(self) -> list[Any]:
        """The values to validate against the schema: every listed value, or both ends of a range and, for a
        continuous one, a value inside it (not a whole number: `uniform: [64, 256]` on an integer field passed with
        its whole ends, then every trial's sample such as 133.7 failed)."""
        if self.grid is not None or self.choice is not None:
            return list(self.grid if self.grid is not None else self.choice)
        low, high = self.uniform or self.loguniform or self.randint
        if self.randint:
            return [low, high - 1]
        inside = low + 0.37 * (high - low) if self.uniform else low * (high / low) ** 0.37
        return [low, high, inside + 0.01 if float(inside).is_integer() else inside]

    def to_tune(self):
        from ray import tune

        if self.grid is not None:
            return tune.grid_search(self.grid)
        if self.choice is not None:
            return tune.choice(self.choice)
        if self.uniform:
            return tune.uniform(*self.uniform)
        if self.loguniform:
            return tune.loguniform(*self.loguniform)
        return tune.randint(*self.randint)


class SearchSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    params: dict[str, Distribution] = Field(..., min_length=1)
    sweep: dict[str, Any] = Field(default_factory=dict, description="defaults for the experiment's sweep section")
    fixed: dict[str, Any] = Field(default_factory=dict, description="experiment fields every trial shares, as "
                                  "`--set KEY=VALUE` before the user's own (e.g. the stages a sweep needs)")

    @model_validator(mode="after")
    def _sweep_fields(self) -> SearchSpace:
        unknown = set(self.sweep) - set(SweepConfig.model_fields)
        if unknown:
            raise ValueError(f"unknown sweep field(s) {sorted(unknown)}; known: {', '.join(SweepConfig.model_fields)}")
        return self

    def overrides(self) -> list[str]:
        """The `sweep:` and `fixed:` blocks as `--set` overrides (YAML reads JSON), applied before the user's own."""
        import json

        return ([f"sweep.{k}={json.dumps(v)}" for k, v in self.sweep.items()]
                + [f"{k}={json.dumps(v)}" for k, v in self.fixed.items()])

    def to_tune(self) -> dict[str, Any]:
        return {key: dist.to_tune() for key, dist in self.params.items()}

    @property
    def swept_sections(self) -> set[str]:
        return {key.split(".")[0] for key in self.params}


def repeats(exp: Experiment) -> int:
    """How many times a grid search runs its grid (1 for random/optuna, whose samples differ anyway)."""
    return exp.sweep.num_samples if exp.sweep.search == "grid" else 1


def tune_param_space(space: SearchSpace, exp: Experiment) -> tuple[dict[str, Any], int]:
    """Tune's `param_space` and `num_samples` for a sweep: a repeated grid becomes one more grid axis (Tune's
    own num_samples would repeat identical configs, which share stage keys and so one run)."""
    from ray import tune

    params = space.to_tune()
    if repeats(exp) > 1:
        return {**params, REPEAT: tune.grid_search(list(range(repeats(exp))))}, 1
    return params, exp.sweep.num_samples


def trial_count(space: SearchSpace, exp: Experiment) -> int:
    """How many trials the sweep runs: every grid point (crossed), num_samples times (as repeats or samples)."""
    return math.prod(len(d.grid) for d in space.params.values() if d.grid is not None) * exp.sweep.num_samples


def trial_experiment(exp: Experiment, values: dict[str, Any]) -> Experiment:
    """The experiment one trial runs: the swept values applied, and for repeat r of a grid, r added to the seeds
    in REPEAT_SEEDS."""
    values = dict(values)
    repeat = int(values.pop(REPEAT, 0))
    trial = with_values(exp, values, f"trial {values}")
    if repeat:
        trial = with_values(trial, {"train.seed": trial.train.seed + repeat, "dpo.seed": trial.dpo.seed + repeat},
                            f"repeat {repeat}")
    return trial


def _is_mapping(annotation: Any) -> bool:
    """dict[...] or Optional[dict[...]]."""
    return any(typing.get_origin(a) is dict for a in _options(annotation))


def _options(annotation: Any) -> tuple[Any, ...]:
    return typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)


def _section(annotation: Any) -> type[BaseModel] | None:
    """The section class of a field typed `Section` or `Section | None` (pack.interleave, synth.preferences)."""
    models = [a for a in _options(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 else None


def check_field_path(key: str) -> None:
    """Raise a ConfigError naming the first part of `key` that is not an experiment field."""
    model: type[BaseModel] | None = Experiment
    optional = False  # a section that may be None is swept whole too: [null, {...}] (the interleaving space)
    parts = key.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the experiment"
        if model is None:
            raise ConfigError(f"search space key {key!r}: {where} is a value, not a section; it has no {part!r}")
        fields = model.model_fields
        if part not in fields:
            raise ConfigError(f"search space key {key!r}: {where} has no field {part!r}. "
                              f"Fields there: {', '.join(fields)}.")
        annotation = fields[part].annotation
        if section := _section(annotation):
            model, optional = section, type(None) in _options(annotation)
        elif _is_mapping(annotation):
            if len(parts) > depth + 2:
                raise ConfigError(f"search space key {key!r}: {'.'.join(parts[: depth + 1])} maps names to values; "
                                  "address one entry at most, e.g. pack.mix.stories")
            return
        else:
            model = None
    if model is not None and not optional:
        raise ConfigError(f"search space key {key!r} is a whole section; sweep one of its fields, "
                          f"e.g. {key}.{next(iter(model.model_fields))}")


def validate_space(space: SearchSpace, exp: Experiment) -> None:
    """Every key is a field; every value (range ends) gives a valid experiment; the search can use the space."""
    for key in space.params:
        check_field_path(key)
    # Fields can depend on each other (init 'twist' needs a base): validate every combination of the listed
    # values and range ends, or, for a huge grid, each value with the others at their first value.
    keys = list(space.params)
    edges = [space.params[k].edge_values() for k in keys]
    if math.prod(len(e) for e in edges) <= MAX_COMBINATIONS_CHECKED:
        combinations = itertools.product(*edges)
    else:
        firsts = [e[0] for e in edges]
        combinations = ([*firsts[:i], v, *firsts[i + 1 :]] for i, e in enumerate(edges) for v in e)
    for combination in combinations:
        values = dict(zip(keys, combination, strict=True))
        with_values(exp, values, f"search space {space.name!r} at {values}")
    if exp.sweep.search == "optuna":
        grid = [k for k, d in space.params.items() if d.grid is not None]
        if grid:
            raise ConfigError(f"search 'optuna' cannot sample grid axes ({', '.join(grid)}); use `choice` for them "
                              "in the space, or --set sweep.search=grid")
    if repeats(exp) > 1 and (seeds := sorted(set(space.params) & set(REPEAT_SEEDS))):
        raise ConfigError(f"sweep.num_samples {exp.sweep.num_samples} repeats the grid with {' and '.join(REPEAT_SEEDS)} "
                          f"+ 0..{exp.sweep.num_samples - 1}, and the space sweeps {', '.join(seeds)} too, so repeats "
                          "would collide; sweep the seed or set sweep.num_samples=1, not both")
    if exp.sweep.search == "grid" and any(d.grid is None for d in space.params.values()) and exp.sweep.num_samples == 1:
        print("[sweep] note: the space has distributions but sweep.num_samples is 1: one sample per grid point")
    if not space.swept_sections & set(exp.stages):
        raise ConfigError(f"search space {space.name!r} varies {sorted(space.swept_sections)}, none of which is a stage "
                          f"this experiment runs ({', '.join(exp.stages)}): every trial would be the same")
    check_sweep_metrics(exp)


# What a training run reports while it trains (Ray Train reports): what ASHA / median stopping can compare.
REPORTED_WHILE_TRAINING = ("val/loss", "train/tokens", "train/flops_6nd", "train/flops")


def check_sweep_metrics(exp: Experiment) -> None:
    """sweep.metric must be a figure a finished trial reports, stop_metric one reported while it trains: Tune's own
    check is off (a trial's metrics arrive at different times), and a name no trial reports made Optuna prune every
    trial (a random search in effect), a scheduler never stop one, and the report leave out the best trial."""
    metric = exp.sweep.metric
    tasks = [e.key for e in exp.eval.task_entries()] if "eval" in exp.stages else []
    head, _, rest = metric.partition("/")
    if head == "eval":
        task, _, figure = rest.partition("/")
        if task in tasks and figure == "accuracy" and "final" not in exp.eval.checkpoints:
            raise ConfigError(f"sweep.metric {metric!r}: no trial reports it, eval.checkpoints "
                              f"{exp.eval.checkpoints} has no 'final' (its results are eval/{task}/<checkpoint>_accuracy); "
                              "add final to eval.checkpoints")
        if task not in tasks:
            raise ConfigError(f"sweep.metric {metric!r}: no trial reports it, "
                              + (f"eval.tasks has no {task!r} (it has {', '.join(tasks)}); e.g. "
                                 f"--set sweep.metric=eval/{tasks[0]}/accuracy" if tasks
                                 else "this experiment runs no eval stage; e.g. --set sweep.metric=val/loss "
                                      "sweep.mode=min"))
    elif head in ("val", "train"):
        if "train" not in exp.stages:
            raise ConfigError(f"sweep.metric {metric!r}: no trial reports it, this experiment runs no train stage")
    else:
        raise ConfigError(f"sweep.metric {metric!r} is not a figure a trial reports: eval/<task>/accuracy (tasks: "
                          f"{', '.join(tasks) or 'none'}), val/loss or train/<figure>")
    # a loss is better lower: with the default mode max, the search chased the worst trials and the report called
    # the worst one best
    for metric_field, mode_field in (("metric", "mode"), ("stop_metric", "stop_mode")):
        name = getattr(exp.sweep, metric_field)
        if "loss" in name and getattr(exp.sweep, mode_field) == "max":
            raise ConfigError(f"sweep.{mode_field} is max but sweep.{metric_field} {name!r} is a loss (lower is "
                              f"better): set sweep.{mode_field}=min")
    if exp.sweep.scheduler != "fifo" and exp.sweep.stop_metric not in REPORTED_WHILE_TRAINING:
        raise ConfigError(f"sweep.stop_metric {exp.sweep.stop_metric!r} is not reported while a trial trains, so "
                          f"sweep.scheduler {exp.sweep.scheduler} would stop nothing; use one of "
                          f"{', '.join(REPORTED_WHILE_TRAINING)}")


def resolve_space_path(space: str) -> Path:
    """SPACE is a YAML path, or the name of a file in ./search_spaces/ or the shipped search_spaces/."""
    path = Path(space)
    if path.is_file():
        return path
    package = Path(__file__).resolve().parents[1]  # slam_ray/
    # shipped: inside the installed package (pyproject maps search_spaces/ to slam_ray/search_spaces in a
    # wheel), or the top-level folder of a checkout
    folders = [Path.cwd() / "search_spaces", package / "search_spaces", package.parent / "search_spaces"]
    for folder in folders:
        candidate = folder / f"{space.removesuffix('.yaml')}.yaml"
        if candidate.is_file():
            return candidate
    shipped = sorted({p.stem for f in folders if f.is_dir() for p in f.glob("*.yaml")})
    raise ConfigError(f"search space {space!r} is neither a YAML file nor one of the shipped spaces "
                      f"({', '.join(shipped) or 'none found'})")


def load_space(space: str) -> SearchSpace:
    path = resolve_space_path(space)
    data = read_yaml_mapping(path, "`params` (and optional description, sweep)")
    try:
        return SearchSpace.model_validate(data)
    except ValidationError as e:
        lines = [f"invalid search space ({path}):"]
        for err in e.errors():
            lines.append(f"  - {'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from e
