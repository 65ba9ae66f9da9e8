"""tests/lanes.py, the runner behind `make test`: both lanes (the second one's three pytest runs too) run, and a
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
    assert "the `local_ray` lane collected no tests: failing on purpose" in proc.stdout
    assert "the `own_ray` lane collected no tests: failing on purpose" in proc.stdout
    assert "exit codes: ray 5, others 5, local_ray 5, own_ray 5" in proc.stdout
    # the other lane's three runs ran too, and their output is shown (each deselected this file's tests)
    assert len(re.findall(r"\b\d+ deselected", proc.stdout)) == 4
    # it yields contended cores to the `ray` lane: 10 steps nicer than its parent (less where that passes 19, Linux's
    # limit: this test itself runs in the second lane of a `make test`)
    niceness = int(re.search(r"niceness \+(\d+)\)", proc.stdout).group(1))
    assert niceness == min(10, 19 - os.nice(0))
    # the summary says what the cores did and how fast this machine was, so runs on different days compare
    probe = float(re.search(r"speed probe: `import torch` takes ([0-9.]+) s", proc.stdout).group(1))
    busy, core_seconds, probe_again = re.search(
        r"CPU busy (\d+) s of (\d+) core-seconds \(\d+%\); speed probe ([0-9.]+) s", proc.stdout).groups()
    assert 0 < int(busy) <= int(core_seconds) * 1.05 + 1  # the pytest start-ups cost CPU; /proc/stat ticks round
    assert 0 < probe == float(probe_again)


def test_a_test_marked_for_the_second_lane_that_would_share_the_ray_lanes_work_fails_collection():
    """`own_ray` tests may use no session Ray fixture and `local_ray` ones nothing of the shared pipeline (the second
    lane would build it again): collection (tests/conftest.py's hook) stops with an error that names the test and
    what it breaks; a test that keeps to its lane's rule is collected."""
    from types import SimpleNamespace

    import pytest
    from conftest import pytest_collection_modifyitems

    def item(markers: set[str], fixture: str) -> SimpleNamespace:
        return SimpleNamespace(nodeid=f"test_x.py::test_{fixture}", keywords={"ray", *markers},
                               fixturenames=["tmp_path", fixture])

    for marker, fixture, says in (("own_ray", "ray_local", "are not marked `ray` or use a session Ray fixture"),
                                  ("local_ray", "reduced_pipeline", "use reduced_pipeline or reduced_quickstart"),
                                  ("local_ray", "reduced_quickstart", "use reduced_pipeline or reduced_quickstart")):
        with pytest.raises(pytest.UsageError, match=f"marked `{marker}`") as error:
            pytest_collection_modifyitems(None, [item({marker}, "espeak"), item({marker}, fixture)])
        assert says in str(error.value) and f"test_{fixture}" in str(error.value)
        assert "test_espeak" not in str(error.value)
    pytest_collection_modifyitems(None, [item({"local_ray"}, "ray_local"), item({"own_ray"}, "espeak")])  # kept
