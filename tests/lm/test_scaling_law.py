from __future__ import annotations

import json
import math

import numpy as np
import pytest

from slam_ray.errors import SlamError
from slam_ray.lm.scaling_law import (
    CUERVO_MARXER,
    DOWNSTREAM_GAMMA,
    REFERENCE_FLOPS,
    REFERENCE_POINTS,
    SLAM_FLOPS,
    ScalingLaw,
    downstream,
    fit_law,
    flops_for,
    iso_loss_grid,
    plan,
    reference_readings,
    training_flops,
)

TRUE = ScalingLaw(E=1.8, A=20.0, B=50.0, alpha=0.3, beta=0.25)


def isoflop_runs(levels: list[float], factors: list[float], extra: list[tuple[float, float]], noise: float,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs as an isoFLOP sweep makes them: at each budget, sizes around TRUE's optimum, plus a few off-frontier
    runs; losses from TRUE times exp(noise * N(0, 1))."""
    n = [TRUE.allocation(c)[0] * f for c in levels for f in factors] + [p[0] for p in extra]
    d = [c / 6 / (TRUE.allocation(c)[0] * f) for c in levels for f in factors] + [p[1] for p in extra]
    n, d = np.array(n), np.array(d)
    rng = np.random.default_rng(seed)
    return n, d, TRUE.loss(n, d) * np.exp(noise * rng.standard_normal(n.size))


# ---------------------------------------------------------------------------------------------- the published law

def test_allocation_is_the_closed_form_of_the_published_coefficients():
    alpha, beta, A, B = 0.25, 0.24, 13.9, 39.8
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    assert CUERVO_MARXER.G == pytest.approx(G, rel=1e-12)
    assert CUERVO_MARXER.a == pytest.approx(beta / (alpha + beta)) and CUERVO_MARXER.b == pytest.approx(0.25 / 0.49)
    for c in (1e17, 3e18, 1e21):
        n, d = CUERVO_MARXER.allocation(c)
        assert n == pytest.approx(G * (c / 6) ** (beta / (alpha + beta)), rel=1e-12)
        assert d == pytest.approx((c / 6) ** (alpha / (alpha + beta)) / G, rel=1e-12)
        assert training_flops(n, d) == pytest.approx(c, rel=1e-12)


@pytest.mark.parametrize("flops", [1e17, REFERENCE_FLOPS, 1e21])
def test_allocation_minimises_the_loss_along_the_isoflop_curve(flops):
    n_opt, _ = CUERVO_MARXER.allocation(flops)
    n = np.geomspace(n_opt / 100, n_opt * 100, 40001)  # steps of 0.023%
    loss = CUERVO_MARXER.loss(n, flops / 6 / n)
    assert n[np.argmin(loss)] == pytest.approx(n_opt, rel=1e-3)
    assert CUERVO_MARXER.optimal_loss(flops) <= loss.min() + 1e-12


def test_loss_broadcasts():
    n, d = np.array([[1e7], [1e8]]), np.array([1e9, 1e10, 1e11])
    assert CUERVO_MARXER.loss(n, d).shape == (2, 3)
    assert isinstance(CUERVO_MARXER.loss(1e8, 1e10), float)


def test_reference_flops_is_where_the_law_picks_78m():
    assert CUERVO_MARXER.allocation(REFERENCE_FLOPS)[0] == pytest.approx(78e6, rel=1e-3)
    assert 5.2e18 < REFERENCE_FLOPS < 5.4e18


def test_the_other_readings_of_the_reference_compute():
    readings = reference_readings()
    assert readings["flops_for_78M"] == pytest.approx(REFERENCE_FLOPS)
    assert readings["flops_for_66M"] == pytest.approx(3.7e18, rel=0.02)
    assert readings["slam_flops"] == pytest.approx(3.0e18, rel=0.01)
    assert readings["n_opt_at_slam_flops"] == pytest.approx(59e6, rel=0.02)


def test_downstream_reproduces_the_predicted_optimal_row_at_the_reference_compute():
    assert downstream(REFERENCE_FLOPS) == pytest.approx({"sblimp": 56.85, "ssc": 54.09, "tsc": 70.49}, rel=1e-12)
    row = REFERENCE_POINTS[0]
    assert row["params"] == 78e6 and row["flops"] == REFERENCE_FLOPS
    assert downstream(row["flops"]) == pytest.approx({k: row[k] for k in DOWNSTREAM_GAMMA}, rel=1e-12)


def test_downstream_grows_with_the_published_exponents():
    assert DOWNSTREAM_GAMMA == {"sblimp": 0.021, "tsc": 0.025, "ssc": 0.017}
    low, high = downstream(1e18), downstream(1e20)
    for metric, gamma in DOWNSTREAM_GAMMA.items():
        assert high[metric] > low[metric]
        assert math.log(high[metric] / low[metric]) / math.log(100) == pytest.approx(gamma, rel=1e-9)


def test_reference_points_are_table_2():
    by_name = {p["name"]: p for p in REFERENCE_POINTS}
    assert len(by_name) == 4
    assert SLAM_FLOPS == pytest.approx(6 * 358e6 * 1.4e9)
    assert by_name["Slam"] == {"name": "Slam", "params": 358e6, "flops": SLAM_FLOPS, "sblimp": 58.86, "ssc": 58.04,
                               "tsc": 82.04}
    assert by_name["Slam (no DPO)"]["tsc"] == 78.01
    twist = next(p for p in REFERENCE_POINTS if p["name"].startswith("TWIST-350M"))
    assert (twist["flops"], twist["sblimp"], twist["ssc"], twist["tsc"]) == (SLAM_FLOPS, 51.52, 53.65, 68.80)
    for p in REFERENCE_POINTS:
        assert set(p) == {"name", "params", "flops", "sblimp", "ssc", "tsc"}


def test_plan_is_one_json_able_dict():
    p = plan(1e19)
    assert set(p) >= {"flops", "n_opt", "d_opt", "loss", "sblimp", "tsc", "ssc"}
    assert json.loads(json.dumps(p)) == p
    assert 6 * p["n_opt"] * p["d_opt"] == pytest.approx(1e19)
    assert p["loss"] == pytest.approx(CUERVO_MARXER.optimal_loss(1e19))
    assert plan(1e19, TRUE)["n_opt"] == pytest.approx(TRUE.allocation(1e19)[0])
    with pytest.raises(SlamError, match="flops"):
        plan(0)


def test_flops_for():
    assert flops_for(100.0, 24.0, 0.5) == pytest.approx(100e12 * 0.5 * 86400)
    for bad in ({"mfu": 1.5}, {"mfu": 0.0}, {"hours": -1.0}, {"gpu_tflops": 0.0}):
        kwargs = {"gpu_tflops": 100.0, "hours": 24.0, "mfu": 0.5, **bad}
        with pytest.raises(SlamError, match=next(iter(bad))):
            flops_for(**kwargs)


def test_iso_loss_grid():
    n, d, loss = iso_loss_grid(CUERVO_MARXER, (1e7, 1e9), (1e9, 1e11), num=7)
    assert n.shape == d.shape == loss.shape == (7, 7)
    assert loss[3, 2] == pytest.approx(CUERVO_MARXER.loss(n[3, 2], d[3, 2]))
    with pytest.raises(SlamError, match="n_range"):
        iso_loss_grid(CUERVO_MARXER, (1e9, 1e7), (1e9, 1e11))


# ---------------------------------------------------------------------------------------------- fitting

def test_fit_without_noise_recovers_the_law_tightly_from_12_runs():
    n, d, loss = isoflop_runs([1e17, 1e18, 1e19], [1 / 4, 1 / 2, 2, 4], [], noise=0.0)
    fit = fit_law(n, d, loss, bootstrap=10)
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit.law, name) == pytest.approx(getattr(TRUE, name), rel=1e-4), name
    assert (fit.a, fit.b) == pytest.approx((TRUE.a, TRUE.b), rel=1e-4)
    assert fit.n_points == 12 and fit.objective < 1e-12


def test_fit_recovers_the_law_from_noisy_isoflop_runs():
    # 4 budgets x 4 sizes + 3 off-frontier runs, 0.5% multiplicative noise. Tolerances: alpha, beta and the
    # allocation exponents within 0.05, E within 5%. Over seeds 0-5 the 95% bootstrap intervals held the true
    # alpha in 6 of 6 and beta in 5 of 6 (the miss: 0.249 < 0.25); seed 0 is fixed, so this test is deterministic.
    n, d, loss = isoflop_runs([1e15, 1e17, 1e19, 1e21], [1 / 10, 1 / 3, 3, 10],
                              [(1e7, 1e11), (3e9, 3e8), (3e6, 1e8)], noise=0.005, seed=0)
    fit = fit_law(n, d, loss, bootstrap=200, seed=0)
    assert fit.law.alpha == pytest.approx(TRUE.alpha, abs=0.05)
    assert fit.law.beta == pytest.approx(TRUE.beta, abs=0.05)
    assert fit.law.E == pytest.approx(TRUE.E, rel=0.05)
    assert fit.a == pytest.approx(TRUE.a, abs=0.05) and fit.b == pytest.approx(TRUE.b, abs=0.05)
    np.testing.assert_allclose(fit.law.loss(n, d), TRUE.loss(n, d), rtol=0.01)  # E, A, B together
    for name in ("alpha", "beta", "a", "b"):
        lo, hi = fit.intervals[name]
        assert lo <= getattr(TRUE, name) <= hi, (name, lo, hi)
    assert set(fit.intervals) == {"E", "A", "B", "alpha", "beta", "a", "b"}
    assert all(0 < lo < hi for lo, hi in fit.intervals.values())
    assert json.loads(json.dumps(fit.to_dict()))["n_points"] == 19


def test_fit_bootstrap_is_seeded():
    n, d, loss = isoflop_runs([1e16, 1e18, 1e20], [1 / 4, 1 / 2, 2, 4], [], noise=0.005, seed=1)
    one, two = fit_law(n, d, loss, bootstrap=20, seed=3), fit_law(n, d, loss, bootstrap=20, seed=3)
    assert one.intervals == two.intervals


def test_fit_rejects_bad_input():
    n, d, loss = isoflop_runs([1e17, 1e18], [1 / 2, 2, 4], [], noise=0.0)
    with pytest.raises(SlamError, match="at least 5 runs"):
        fit_law(n[:4], d[:4], loss[:4])
    for field in ("n", "d", "loss"):
        args = {"n": n.copy(), "d": d.copy(), "loss": loss.copy()}
        args[field][2] = 0.0
        with pytest.raises(SlamError, match=f"every {field} must be positive"):
            fit_law(**args)
    with pytest.raises(SlamError, match="same length"):
        fit_law(n, d[:-1], loss)
