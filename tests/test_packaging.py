"""The wheel carries everything a user outside a checkout needs: every module, recipe, eval task and search space
(search_spaces/ lives at the top of the repository, one copy, and is installed as slam_ray/search_spaces)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # a wheel build: ~10 s on 2 cores


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy of what the wheel is made of, so the build leaves nothing (build/, egg-info) in the checkout.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("slam_ray", "search_spaces"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (built,) = out.glob("slam_ray-*.whl")
    return built


def test_the_wheel_holds_every_module_recipe_eval_task_and_space(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "slam_ray").rglob("*.py")}
    expected |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "slam_ray").glob("recipes/*.yaml")}
    expected |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "slam_ray").glob("evals/tasks/*.yaml")}
    spaces = {f"slam_ray/search_spaces/{p.name}" for p in (ROOT / "search_spaces").glob("*.yaml")}
    assert spaces and "slam_ray/search_spaces/optimizer.yaml" in spaces
    missing = sorted((expected | spaces) - names)
    assert not missing, f"not in the wheel: {missing}"


def test_an_installed_wheel_finds_the_shipped_spaces_outside_a_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"  # no ./search_spaces here, and the checkout is not on the path
    elsewhere.mkdir()
    code = ("import slam_ray, slam_ray.sweeps.search_space as s; "
            "print(slam_ray.__file__); print(s.resolve_space_path('optimizer')); "
            "print(sorted(s.load_space('optimizer').params))")
    # the wheel first, then the venv's site-packages for the dependencies (the checkout's editable install
    # is a .pth file there, which -S keeps from loading)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])}
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=elsewhere, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    module, space, params = proc.stdout.splitlines()[:3]
    assert module.startswith(str(target)) and space.startswith(str(target / "slam_ray" / "search_spaces"))
    assert "train.optimizer.name" in params
    # the scaling planner from the installed package (issue: `slam-ray scaling plan --flops 3e18 --json`)
    proc = subprocess.run([sys.executable, "-S", "-m", "slam_ray.cli", "scaling", "plan", "--flops", "3e18", "--json"],
                          capture_output=True, text=True, cwd=elsewhere, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plan["flops"] == 3e18 and 59e6 < plan["n_opt"] < 60e6
