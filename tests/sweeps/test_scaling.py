"""`slam-ray scaling`: the planner from the command line, runs read back from a real MLflow store, the fit and the
view drawn from them. The law's math is tested in tests/lm/test_scaling_law.py."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from slam_ray.errors import SlamError
from slam_ray.lm.scaling_law import CUERVO_MARXER, ScalingLaw
from slam_ray.sweeps import scaling


def test_plan_json_from_the_command_line_is_the_closed_form():
    proc = subprocess.run([sys.executable, "-m", "slam_ray.cli", "scaling", "plan", "--flops", "3e18", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    law = CUERVO_MARXER
    g = (law.alpha * law.A / (law.beta * law.B)) ** (1 / (law.alpha + law.beta))
    assert plan["flops"] == 3e18
    assert plan["n_opt"] == pytest.approx(g * (3e18 / 6) ** (law.beta / (law.alpha + law.beta)), rel=1e-9)
    assert 6 * plan["n_opt"] * plan["d_opt"] == pytest.approx(3e18, rel=1e-9)
    assert plan["loss"] == pytest.approx(law.loss(plan["n_opt"], plan["d_opt"]), rel=1e-9)
    assert {"sblimp", "tsc", "ssc"} <= set(plan)


def test_plan_from_gpu_hours_and_its_errors():
    p = scaling.plan_budget(gpu="NVIDIA RTX A5000", hours=24, mfu=0.4)
    assert p["flops"] == pytest.approx(111e12 * 0.4 * 24 * 3600)
    assert 60e6 < p["n_opt"] < 70e6  # one A5000-day at 40% MFU: the law's ~66M, Slamming's text figure
    with pytest.raises(SlamError, match="unknown GPU 'TPU'"):
        scaling.plan_budget(gpu="TPU", hours=1)
    with pytest.raises(SlamError, match="give --flops C, or --gpu NAME and --hours H"):
        scaling.plan_budget(gpu="H100")


TRUE = ScalingLaw(E=1.6, A=9.0, B=60.0, alpha=0.3, beta=0.28)


def log_runs(uri: str, tokenizer: str = "logmel", n_units: int = 200) -> pd.DataFrame:
    """Experiment runs as slam_ray's pipeline logs them (tags, flattened config params, summary metrics), with
    final losses drawn from a known law (0.3% noise): an isoFLOP grid of 3 budgets x 4 sizes."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("isoflop")
    rng = np.random.default_rng(0)
    rows = []
    for flops in (1e15, 1e17, 1e19):
        n_opt = TRUE.allocation(flops)[0]
        for factor in (0.2, 0.6, 1.6, 5.0):
            n = n_opt * factor
            d = flops / (6 * n)
            loss = TRUE.loss(n, d) * np.exp(rng.normal(0, 0.003))
            with mlflow.start_run(run_name=f"n{n:.3g}") as run:
                mlflow.set_tags({"slam_ray.kind": "experiment"})
                mlflow.log_params({"extract.tokenizer.kind": tokenizer, "extract.tokenizer.n_units": n_units,
                                   "extract.tokenizer.frame_rate": 25})
                mlflow.log_metrics({"train/params": n, "train/tokens": d, "train/flops_6nd": 6 * n * d,
                                    "train/flops": 6.3 * n * d, "val/loss": loss, "eval/sblimp/accuracy": 0.55})
            rows.append({"run_id": run.info.run_id, "params": n, "tokens": d, "loss": loss})
    return pd.DataFrame(rows)


def test_runs_view_and_fit_from_a_real_mlflow_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logged = log_runs(uri)
    table = scaling.scaling_runs(uri, ["isoflop"])
    assert len(table) == 12 and table["flops"].is_monotonic_increasing
    assert np.allclose(table["flops"], 6 * table["params"] * table["tokens"])
    assert not table["comparable"].any()  # log-mel units: drawn, flagged, never compared
    assert "kind logmel" in table["not_comparable_because"].iloc[0]
    assert np.allclose(table["sblimp"], 55.0)  # eval accuracies in percent, as the paper reports them

    out = scaling.view(["isoflop"], uri, str(tmp_path / "view"))
    assert len(out) == 12
    csv = pd.read_csv(tmp_path / "view" / "scaling.csv")
    assert set(csv["run_id"]) == set(logged["run_id"])
    assert (tmp_path / "view" / "scaling.png").stat().st_size > 20_000

    fit = scaling.fit_runs(["isoflop"], uri, out_dir=str(tmp_path / "fit"), bootstrap=50)
    assert fit["alpha"] == pytest.approx(TRUE.alpha, abs=0.05) and fit["beta"] == pytest.approx(TRUE.beta, abs=0.05)
    assert fit["E"] == pytest.approx(TRUE.E, rel=0.05)
    assert fit["rmse_log_loss"] < 0.01 and not fit["comparable_with_cuervo_marxer"]
    assert fit["unbracketed_budgets"] == []  # sizes 0.2-5x the optimum: every budget's best size is inside
    assert json.loads((tmp_path / "fit" / "fit.json").read_text())["runs"] == 12
    assert (tmp_path / "fit" / "fit.png").stat().st_size > 20_000


def test_hubert_500_runs_are_comparable(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_runs(uri, tokenizer="hubert", n_units=500)
    table = scaling.scaling_runs(uri, ["isoflop"])
    assert table["comparable"].all()
    assert np.allclose(table["law_loss"], CUERVO_MARXER.loss(table["params"], table["tokens"]))


def test_a_store_without_compute_accounting_says_so(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("old")
    with mlflow.start_run():
        mlflow.set_tags({"slam_ray.kind": "experiment"})
        mlflow.log_metrics({"val/loss": 2.0, "train/tokens": 1000})
    with pytest.raises(SlamError, match="train/params"):
        scaling.scaling_runs(uri, ["old"])


def test_a_grid_whose_smallest_model_always_wins_is_flagged():
    """Sizes 2-20x the law's optimum: each budget's lowest loss is its smallest model, so the grid cannot pin the
    exponents; the fit says so, per budget, and which way to extend the grid."""
    rows = []
    for flops in (1e15, 1e17):
        n_opt = TRUE.allocation(flops)[0]
        for factor in (2, 5, 20):
            n = n_opt * factor
            rows.append({"params": n, "tokens": flops / (6 * n), "flops": flops, "val_loss": TRUE.loss(n, flops / (6 * n))})
    flagged = scaling.unbracketed_budgets(pd.DataFrame(rows))
    assert [u["edge"] for u in flagged] == ["smallest", "smallest"]
    assert [u["flops"] for u in flagged] == [1e15, 1e17]
    bracketed = pd.DataFrame([{**r, "params": r["params"] / 5, "tokens": r["tokens"] * 5,
                               "val_loss": TRUE.loss(r["params"] / 5, r["tokens"] * 5)} for r in rows])
    assert scaling.unbracketed_budgets(bracketed) == []
