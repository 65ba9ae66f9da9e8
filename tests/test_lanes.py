"""tests/lanes.py, the runner behind `make test`: both lanes (the second one's two pytest runs too) run, and a
pytest run that collects nothing fails."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

LANES = Path(__file__).resolve().parent / "lanes.py"


def test_a_selection_that_collects_no_test_fails_in_every_pytest_run():
    # only this file is collected (the rest ignored: collecting the whole suite twice imports torch, transformers
    # and Ray in both lanes, ~20 s here), then -k deselects its one test
    only_this_file = ["--ignore-glob=*/test_[!l]*.py", "--ignore-glob=*/test_l[!a]*.py"]
    proc = subprocess.run([sys.executable, str(LANES), "-k", "no_test_is_named_like_this", "-q", *only_this_file],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the `ray` lane collected no tests: failing on purpose" in proc.stdout
    assert "the non-`ray` lane collected no tests: failing on purpose" in proc.stdout
    assert "the `own_ray` lane collected no tests: failing on purpose" in proc.stdout
    assert "exit codes: ray 5, others 5, own_ray 5" in proc.stdout
    assert proc.stdout.count("1 deselected") == 3  # the other lane's two runs ran too, and their output is shown
    # it yields contended cores to the `ray` lane: 10 steps nicer than its parent (less where that passes 19, Linux's
    # limit: this test itself runs in the second lane of a `make test`)
    niceness = int(re.search(r"niceness \+(\d+)\)", proc.stdout).group(1))
    assert niceness == min(10, 19 - os.nice(0))
    # the summary says what the cores did and how fast this machine was, so runs on different days compare
    probe = float(re.search(r"speed probe: `import torch` takes ([0-9.]+) s", proc.stdout).group(1))
    busy, core_seconds, probe_again = re.search(
        r"CPU busy (\d+) s of (\d+) core-seconds \(\d+%\); speed probe ([0-9.]+) s", proc.stdout).groups()
    assert 0 < int(busy) <= int(core_seconds) * 1.05 + 1  # two pytest start-ups cost CPU; /proc/stat ticks round
    assert 0 < probe == float(probe_again)
