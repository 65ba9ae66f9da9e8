"""Experiment files: the schema (schema.py), loading them (loading.py: YAML, recipes, `--set`), the schema of eval
task files (tasks.py) and the generated reference page (reference.py, `python -m slam_ray.config.reference`).
The public names are re-exported here (`from slam_ray.config import Experiment, load_experiment`). config
imports nothing of slam_ray but errors: every other layer may import it."""

from slam_ray.config.loading import (
    apply_overrides,
    format_validation_error,
    load_experiment,
    parse_override,
    read_yaml_mapping,
    recipe_names,
    resolve_experiment_path,
    set_path,
    to_yaml,
    with_values,
)
from slam_ray.config.schema import (
    BUILTIN_TASKS,
    STAGES,
    TRAINER_FIELDS,
    CorpusConfig,
    DpoConfig,
    EvalConfig,
    EvalTask,
    Experiment,
    ExtractConfig,
    GenerationConfig,
    ModelConfig,
    NamedInput,
    OptimizerConfig,
    PackConfig,
    RayConfig,
    ScheduleConfig,
    Section,
    StageName,
    SwagConfig,
    SweepConfig,
    SynthConfig,
    TokenizerConfig,
    TrackingConfig,
    TrainConfig,
    models_in,
    name_entries,
)
from slam_ray.config.tasks import TaskSpec, load_task, task_names

__all__ = [
    "BUILTIN_TASKS", "STAGES", "TRAINER_FIELDS", "CorpusConfig", "DpoConfig", "EvalConfig", "EvalTask", "Experiment",
    "ExtractConfig", "GenerationConfig", "ModelConfig", "NamedInput", "OptimizerConfig", "PackConfig", "RayConfig",
    "ScheduleConfig", "Section", "StageName", "SwagConfig", "SweepConfig", "SynthConfig", "TaskSpec",
    "TokenizerConfig", "TrackingConfig", "TrainConfig", "apply_overrides", "format_validation_error",
    "load_experiment", "load_task", "models_in", "name_entries", "parse_override", "read_yaml_mapping",
    "recipe_names", "resolve_experiment_path", "set_path", "task_names", "to_yaml", "with_values",
]
