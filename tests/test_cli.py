"""Every CLI error path: one paragraph on stderr, exit code 2, no traceback unless --debug."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from slam_ray.cli import EXIT_PARTIAL, main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "no_such_recipe"], "neither a YAML file nor a shipped recipe"),
        (["config", "validate", "quickstart", "--set", "train.batch_size"], "is not KEY=VALUE"),
        (["config", "validate", "quickstart", "--set", "train.optimizr.lr=1"], "train.optimizr: unknown key"),
        (["config", "show", "quickstart", "--set", "train.batch_size=abc"], "train.batch_size: Input should be a valid integer"),
        (["train", "quickstart", "--set", "train.max_minutes=null", "--set", "train.max_steps=null"], "max_steps, max_tokens, max_flops or max_minutes"),
        (["dpo", "quickstart", "--set", "dpo.schedule=cosine", "--set", "dpo.max_steps=null", "--set", "dpo.max_minutes=1"], "cosine schedule needs a step count"),
        (["sweep", "quickstart", "--space", "x.yaml"], "neither a YAML file nor one of the shipped spaces"),
        (["sweep", "quickstart", "--space", "optimizer", "--set", "sweep.search=optuna"], "cannot sample grid axes"),
        (["compare", "--tracking-uri", "sqlite:///{tmp}/none.db", "--sweep", "x"], "no sweeps in"),
        (["compare"], "give --tracking-uri"),
        (["compare", "--experiment", "nothing_here"], "no MLflow store"),
    ],
)
def test_error_paths_exit_2_without_traceback(capsys, tmp_path, argv, message):
    code, _, err = run_cli(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_invalid_yaml_and_non_mapping(capsys, tmp_path):
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    code, _, err = run_cli(capsys, "config", "validate", str(tmp_path / "broken.yaml"))
    assert code == 2 and "not valid YAML" in err
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    code, _, err = run_cli(capsys, "config", "validate", str(tmp_path / "list.yaml"))
    assert code == 2 and "must hold a mapping" in err


def test_stage_without_its_upstream_says_what_to_run(capsys, tmp_path):
    exp = tmp_path / "e.yaml"
    exp.write_text(yaml.safe_dump({"name": "e", "workdir": str(tmp_path / "w")}))
    code, _, err = run_cli(capsys, "pack", str(exp))
    assert code == 2
    assert "needs the output of `extract`" in err and "slam-ray extract" in err


def test_debug_shows_the_traceback(capsys):
    code, _, err = run_cli(capsys, "--debug", "run", "no_such_recipe")
    assert code == 2 and "Traceback" in err


def test_config_show_round_trips(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "config", "show", "quickstart", "--set", "train.max_steps=7")
    assert code == 0
    (tmp_path / "shown.yaml").write_text(out)
    code, out, _ = run_cli(capsys, "config", "show", str(tmp_path / "shown.yaml"))
    assert code == 0 and yaml.safe_load(out)["train"]["max_steps"] == 7


def test_a_crash_exits_3_with_its_traceback_not_1_which_means_partial(capsys, tmp_path):
    """An exception that is not a config or input error (here the workdir's parent is a file) used to escape with
    Python's exit code 1, which `slam-ray` documents as "a stage ended partial: rerun to retry only its parts"."""
    (tmp_path / "a_file").write_text("not a folder")
    code, _, err = run_cli(capsys, "run", "quickstart", "--set", f"workdir={tmp_path / 'a_file' / 'work'}")
    assert code == 3 and code != EXIT_PARTIAL
    assert "Traceback" in err and "crashed (NotADirectoryError" in err and "not a partial result" in err


def test_usage_errors_exit_2():
    proc = subprocess.run([sys.executable, "-m", "slam_ray.cli", "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_entry_point_reports_config_errors_plainly():
    proc = subprocess.run([sys.executable, "-m", "slam_ray.cli", "config", "validate", "quickstart",
                           "--set", "pack.context_len=4"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "pack.context_len" in proc.stderr and "Traceback" not in proc.stderr


def test_sweep_with_a_nonexistent_field_fails_before_any_trial(capsys, tmp_path):
    space = tmp_path / "typo.yaml"
    space.write_text("params:\n  train.optimizer.lrr: {grid: [0.001, 0.003]}\n")
    workdir = tmp_path / "work"
    code, _, err = run_cli(capsys, "sweep", "quickstart", "--space", str(space), "--set", f"workdir={workdir}")
    assert code == 2
    assert "train.optimizer has no field 'lrr'" in err and "Traceback" not in err
    assert not workdir.exists()  # nothing ran: no stage output, no sweep folder, no MLflow store
