"""Golden stage keys: the key of every stage of every shipped recipe, checked in (tests/data/golden_stage_keys.json).

A stage key names the folder its output lives in (`WORKDIR/<stage>/<key>/`), so a key that changes makes every
user's existing outputs of that stage (and of every stage after it) invisible: they are computed again. Keys may
only change on purpose: bump the stage's format version (`STAGE_FORMAT` in slam_ray/core/stage_io.py, policy in
docs/stages.md) and regenerate the file with

    PYTHONPATH=. python tests/core/test_stage_keys_golden.py --regenerate

Keys are computed in an empty folder, so the recipes' relative data paths (`data/...`) and HF ids are keyed as
absent whatever the checkout holds; they do not depend on the workdir.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from slam_ray.config import STAGES, load_experiment, recipe_names
from slam_ray.core.stage_io import stage_key

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden_stage_keys.json"
REGENERATE = "PYTHONPATH=. python tests/core/test_stage_keys_golden.py --regenerate"


@contextlib.contextmanager
def _in_empty_folder() -> Iterator[None]:
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as empty:
        os.chdir(empty)
        try:
            yield
        finally:
            os.chdir(cwd)


def current_keys() -> dict[str, dict[str, str]]:
    """{recipe: {stage: key}} for every stage, not only those a recipe lists: a user adds `dpo` to `slam` as
    its comment says, and runs a single stage with `slam-ray STAGE`."""
    with _in_empty_folder():
        return {name: {stage: stage_key(exp, stage) for stage in STAGES}
                for name in recipe_names() for exp in [load_experiment(name)]}


def test_shipped_recipes_keep_their_stage_keys():
    golden = json.loads(GOLDEN.read_text())
    current = current_keys()
    changed = [f"{recipe}.{stage}: {golden.get(recipe, {}).get(stage)} -> {key}"
               for recipe, keys in current.items() for stage, key in keys.items()
               if golden.get(recipe, {}).get(stage) != key]
    assert set(current) == set(golden) and not changed, (
        "stage keys of the shipped recipes changed:\n  " + "\n  ".join(changed or ["(recipes added or removed)"])
        + "\nA changed key makes every user's existing output of that stage (and after it) invisible: it is "
        "computed again. If the change is on purpose (a new output format, the key covering more), bump the "
        f"stage's STAGE_FORMAT in slam_ray/core/stage_io.py (docs/stages.md) and regenerate: {REGENERATE}. If not, "
        "a field that changes no output is missing `json_schema_extra={'operational': True}`, or a new field "
        "with a default lacks `json_schema_extra={'since': ...}` (slam_ray/config/schema.py).")


def test_keys_of_absent_inputs_are_deterministic():
    """The golden file is only meaningful if computing keys twice (absent data, HF ids) gives the same keys."""
    assert current_keys() == current_keys()


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit(f"usage: {REGENERATE}")
    GOLDEN.write_text(json.dumps(current_keys(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
