"""slam_ray/sweeps/compare.py: which row of a sweep's table is its best."""

from __future__ import annotations

import pandas as pd

from slam_ray.sweeps.compare import best_completed


def test_the_best_trial_is_one_that_ran_to_its_end():
    """A trial ASHA stopped holds its last intermediate val/loss (a sample of the validation windows, before the
    schedule's decay); ranked first by that figure it was tagged the sweep's best over finished trials."""
    table = pd.DataFrame({  # sorted best first, as runs_table returns it for mode min
        "run": ["lr=3e-3", "lr=1e-2", "lr=1e-3", "lr=3e-5"],
        "stop_reason": ["stopped early by asha at 40% of its budget", "completed", "completed", None],
        "val/loss": [1.9, 2.1, 2.4, None],
    })
    assert best_completed(table, "val/loss")["run"] == "lr=1e-2"
    assert best_completed(table.iloc[[0, 3]], "val/loss") is None  # nothing finished: no best
    assert best_completed(table, "eval/word_order/accuracy") is None  # a metric the table lacks
