"""`slam-ray scaling plan|plot|fit`: place runs against Cuervo & Marxer's SLM scaling law, and fit your own.

- `plan`: a compute budget (FLOPs, or a GPU's hours at an MFU) -> the law's compute-optimal parameters and tokens,
  its predicted loss and downstream accuracies (slam_ray/lm/scaling_law.py holds the law and its sources).
- `plot`: every experiment run or sweep trial in MLflow as a point, FLOPs (6 N D) against final validation loss and
  against each eval metric the law predicts (sBLIMP, tSC, sSC), beside the law's compute-optimal frontier and the
  Slamming paper's Table 2 rows. Only runs on the law's kind of tokens (HuBERT 25 Hz, 500 units) are comparable;
  the others (the quickstart's log-mel units) are drawn hollow and flagged, never compared.
- `fit`: the law's five coefficients fitted to runs' (parameters, tokens, final validation loss), with bootstrap
  intervals, and the fitted surface's iso-loss contours drawn with the runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from slam_ray.errors import SlamError
from slam_ray.lm import scaling_law as law_
from slam_ray.parallel.train_utils import PEAK_BF16_TFLOPS, peak_tflops
from slam_ray.sweeps.compare import find_sweep, resolve_tracking_uri, search_runs

# The tokens Cuervo & Marxer's law was fitted on (their models read HuBERT 25 Hz units, 500 clusters).
LAW_TOKENS = {"extract.tokenizer.kind": "hubert", "extract.tokenizer.n_units": "500",
              "extract.tokenizer.frame_rate": "25"}
# Eval tasks whose accuracy the law predicts on its frontier (task name -> key in scaling_law.DOWNSTREAM_GAMMA).
DOWNSTREAM_TASKS = {"sblimp": "sblimp", "tsc": "tsc", "ssc": "ssc"}
DOWNSTREAM_LABELS = {"sblimp": "sBLIMP", "tsc": "Topic-StoryCloze", "ssc": "Spoken-StoryCloze"}


# --- plan ----------------------------------------------------------------------------------------------------------


def plan_budget(flops: float | None = None, gpu: str | None = None, hours: float | None = None,
                mfu: float = 0.4) -> dict[str, Any]:
    """The law's plan for a budget given as FLOPs or as `hours` on `gpu` (a name in the bf16 peak table) at `mfu`."""
    given: dict[str, Any] = {}
    if flops is None:
        if gpu is None or hours is None:
            raise SlamError("give --flops C, or --gpu NAME and --hours H (and optionally --mfu, default 0.4)")
        peak = peak_tflops(gpu)
        if peak is None:
            raise SlamError(f"unknown GPU {gpu!r}: give one of {', '.join(PEAK_BF16_TFLOPS)} or --flops directly")
        flops = law_.flops_for(peak, hours, mfu)
        given = {"gpu": gpu, "gpu_peak_tflops": peak, "hours": hours, "mfu": mfu}
    return {**law_.plan(flops), **given}


def describe_plan(p: dict[str, Any]) -> str:
    lines = []
    if "gpu" in p:
        lines.append(f"budget:           {p['hours']:g} h on {p['gpu']} ({p['gpu_peak_tflops']:g} TFLOPS bf16 peak) at "
                     f"{p['mfu']:.0%} MFU")
    lines += [f"compute:          {p['flops']:.3g} FLOPs (C = 6 N D)",
              f"N_opt:            {p['n_opt'] / 1e6:,.1f}M parameters",
              f"D_opt:            {p['d_opt'] / 1e9:,.2f}B tokens",
              f"loss:             {p['loss']:.3f} (predicted, at N_opt and D_opt)"]
    lines += [f"{DOWNSTREAM_LABELS[k] + ':':<17} {p[k]:.2f}% (predicted on the compute-optimal frontier)"
              for k in DOWNSTREAM_TASKS]
    lines.append("law: Cuervo & Marxer 2024 (HuBERT 25 Hz, 500 units); downstream constants derived from "
                 "Slamming's Table 2 (docs/scaling.md)")
    return "\n".join(lines)


# --- runs from MLflow -----------------------------------------------------------------------------------------------


def scaling_runs(uri: str, experiments: list[str] | None = None, sweep: str | None = None) -> pd.DataFrame:
    """One row per finished experiment run or sweep trial that trained: its parameters, tokens, FLOPs, final
    validation loss, the law's predictions for it, whether it is comparable with the law (and why not), and the
    eval metrics the law predicts (in percent)."""
    if sweep:
        parent = find_sweep(uri, experiments, sweep)
        runs = search_runs(uri, experiments, f"tags.`mlflow.parentRunId` = '{parent}' and tags.`slam_ray.kind` = 'trial'")
    else:
        frames = [search_runs(uri, experiments, f"tags.`slam_ray.kind` = '{kind}'") for kind in ("experiment", "trial")]
        frames = [f for f in frames if not f.empty]
        runs = pd.concat(frames) if frames else pd.DataFrame()
    needed = ("metrics.train/params", "metrics.train/tokens", "metrics.val/loss")
    if runs.empty or any(c not in runs.columns for c in needed):
        raise SlamError(f"no runs with a finished `train` stage and its compute in {uri}; run an experiment whose "
                        "stages include train (slam_ray 0.2 or later logs train/params and train/flops)")
    runs = runs.dropna(subset=list(needed)).reset_index(drop=True)
    if runs.empty:
        raise SlamError(f"no runs in {uri} logged train/params: they predate compute accounting; run them again")
    n = runs["metrics.train/params"].astype(float)
    d = runs["metrics.train/tokens"].astype(float)
    table = pd.DataFrame({
        "run": runs.get("tags.mlflow.runName"), "run_id": runs["run_id"], "kind": runs.get("tags.slam_ray.kind"),
        "params": n, "tokens": d, "flops": law_.training_flops(n, d),
        "flops_attention": runs.get("metrics.train/flops", pd.Series(np.nan, index=runs.index)).astype(float),
        "val_loss": runs["metrics.val/loss"].astype(float)})
    table["law_loss"] = law_.CUERVO_MARXER.loss(n.to_numpy(), d.to_numpy())
    table["optimal_loss"] = law_.CUERVO_MARXER.optimal_loss(table["flops"].to_numpy())
    table["n_opt"] = law_.CUERVO_MARXER.allocation(table["flops"].to_numpy())[0]
    why = []
    for _, row in runs.iterrows():
        off = [f"{key.split('.')[-1]} {row.get(f'params.{key}')}" for key, want in LAW_TOKENS.items()
               if str(row.get(f"params.{key}")) != want]
        why.append("" if not off else "tokens differ from the law's (" + ", ".join(off) + ")")
    table["comparable"] = [not w for w in why]
    table["not_comparable_because"] = why
    for task in DOWNSTREAM_TASKS:
        col = f"metrics.eval/{task}/accuracy"
        table[task] = runs[col].astype(float) * 100 if col in runs.columns else np.nan
    return table.sort_values("flops").reset_index(drop=True)


# --- the view ------------------------------------------------------------------------------------------------------


def plot_view(table: pd.DataFrame, path: Path) -> Path:
    """FLOPs -> validation loss, and -> each downstream accuracy, with the law's frontier and the paper's rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [table["flops"].min(), table["flops"].max(), law_.REFERENCE_FLOPS, law_.SLAM_FLOPS]
    grid = np.geomspace(min(points) / 3, max(points) * 3, 200)
    fig, axes = plt.subplots(1, 1 + len(DOWNSTREAM_TASKS), figsize=(4.6 * (1 + len(DOWNSTREAM_TASKS)), 4.2))
    ours, other = table[table["comparable"]], table[~table["comparable"]]

    ax = axes[0]
    ax.plot(grid, law_.CUERVO_MARXER.optimal_loss(grid), color="k", lw=1.2,
            label="Cuervo & Marxer: compute-optimal loss")
    ax.scatter(ours["flops"], ours["val_loss"], s=36, zorder=3, label="runs (HuBERT 25 Hz, 500 units)")
    if not other.empty:
        ax.scatter(other["flops"], other["val_loss"], s=36, facecolors="none", edgecolors="tab:grey", zorder=3,
                   label="runs on other tokens: not comparable")
    ax.axvline(law_.REFERENCE_FLOPS, color="tab:red", ls=":", lw=1, label="one A5000-day (our reading)")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs (6 N D)", ylabel="validation loss (nats/token)",
           title="loss against compute")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")

    for ax, task in zip(axes[1:], DOWNSTREAM_TASKS, strict=True):
        key = DOWNSTREAM_TASKS[task]
        ax.plot(grid, [law_.downstream(c)[key] for c in grid], color="k", lw=1.2, label="predicted frontier (Q = k C^γ)")
        for ref, marker in zip(law_.REFERENCE_POINTS, "o^sv", strict=True):
            ax.scatter([ref["flops"]], [ref[key]], marker=marker, s=44, zorder=3, edgecolors="k", label=ref["name"])
        if ours[task].notna().any():
            ax.scatter(ours["flops"], ours[task], s=36, color="tab:blue", zorder=4, label="runs")
        if other[task].notna().any():
            ax.scatter(other["flops"], other[task], s=36, facecolors="none", edgecolors="tab:grey", zorder=4,
                       label="runs on other tokens: not comparable")
        ax.set(xscale="log", xlabel="training FLOPs (6 N D)", ylabel=f"{DOWNSTREAM_LABELS[task]} accuracy (%)",
               title=DOWNSTREAM_LABELS[task])
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def view(experiments: list[str] | None, tracking_uri: str | None, out_dir: str, sweep: str | None = None) -> pd.DataFrame:
    """`slam-ray scaling plot`: the runs' table printed and written as CSV, and the view as PNG, in `out_dir`."""
    uri = resolve_tracking_uri(experiments, tracking_uri)
    table = scaling_runs(uri, experiments, sweep)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "scaling.csv", index=False)
    png = plot_view(table, out / "scaling.png")
    shown = table[["run", "params", "tokens", "flops", "val_loss", "optimal_loss", "comparable"]]
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    flagged = table[~table["comparable"]]
    if not flagged.empty:
        print(f"\n{len(flagged)} run(s) not comparable with the law: {flagged['not_comparable_because'].iloc[0]}")
    print(f"\nwrote {out / 'scaling.csv'} and {png}")
    return table


# --- fit -----------------------------------------------------------------------------------------------------------


def plot_fit(table: pd.DataFrame, fit: law_.LawFit, path: Path) -> Path:
    """The fitted law's iso-loss contours over (N, D) with the runs (coloured by their loss), iso-FLOP lines and the
    fitted compute-optimal allocation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_lo, n_hi = table["params"].min() / 2, table["params"].max() * 2
    d_lo, d_hi = table["tokens"].min() / 2, table["tokens"].max() * 2
    n, d, loss = law_.iso_loss_grid(fit.law, (n_lo, n_hi), (d_lo, d_hi))
    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    levels = np.quantile(loss, np.linspace(0.02, 0.98, 12))
    contours = ax.contour(n, d, loss, levels=np.unique(levels), cmap="viridis", linewidths=0.9)
    ax.clabel(contours, fontsize=7, fmt="%.3g")
    for c in np.geomspace(table["flops"].min(), table["flops"].max(), 4):
        ns = np.geomspace(n_lo, n_hi, 50)
        ax.plot(ns, c / (6 * ns), color="tab:grey", lw=0.6, ls="--")
    flops = np.geomspace(6 * n_lo * d_lo, 6 * n_hi * d_hi, 100)
    n_opt, d_opt = fit.law.allocation(flops)
    ax.plot(n_opt, d_opt, color="tab:red", lw=1.4, label=f"fitted compute-optimal: N ∝ C^{fit.a:.2f}, D ∝ C^{fit.b:.2f}")
    sc = ax.scatter(table["params"], table["tokens"], c=table["val_loss"], cmap="viridis", edgecolors="k", s=50, zorder=3)
    fig.colorbar(sc, ax=ax, label="final validation loss")
    ax.set(xscale="log", yscale="log", xlim=(n_lo, n_hi), ylim=(d_lo, d_hi), xlabel="parameters N",
           ylabel="training tokens D", title=f"fitted law: E={fit.law.E:.3g} A={fit.law.A:.3g} B={fit.law.B:.3g} "
                                             f"α={fit.law.alpha:.3g} β={fit.law.beta:.3g}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fit_runs(experiments: list[str] | None, tracking_uri: str | None, sweep: str | None = None,
             out_dir: str | None = None, bootstrap: int = 200, seed: int = 0) -> dict[str, Any]:
    """`slam-ray scaling fit`: the law fitted to the runs' final validation losses; returns its JSON-able summary."""
    uri = resolve_tracking_uri(experiments, tracking_uri)
    table = scaling_runs(uri, experiments, sweep)
    fit = law_.fit_law(table["params"], table["tokens"], table["val_loss"], bootstrap=bootstrap, seed=seed)
    table["fitted_loss"] = fit.law.loss(table["params"].to_numpy(), table["tokens"].to_numpy())
    summary = {**fit.to_dict(), "runs": len(table), "comparable_with_cuervo_marxer": bool(table["comparable"].all()),
               "unbracketed_budgets": unbracketed_budgets(table),
               "published": {k: getattr(law_.CUERVO_MARXER, k) for k in ("E", "A", "B", "alpha", "beta")},
               "rmse_log_loss": float(np.sqrt(np.mean(np.log(table["fitted_loss"] / table["val_loss"]) ** 2)))}
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "fit.csv", index=False)
        (out / "fit.json").write_text(json.dumps(summary, indent=1))
        plot_fit(table, fit, out / "fit.png")
        summary["files"] = [str(out / f) for f in ("fit.csv", "fit.json", "fit.png")]
    return summary


def unbracketed_budgets(table: pd.DataFrame, tolerance: float = 0.1) -> list[dict[str, Any]]:
    """isoFLOP groups (runs within `tolerance` of each other's compute, at least 3 sizes) whose lowest loss is at the
    smallest or largest model: the grid does not bracket that budget's optimum, and the law's exponents are then
    extrapolation (a fit to such a grid can give any alpha)."""
    out = []
    runs = table.sort_values("flops").reset_index(drop=True)
    start = 0
    for end in range(1, len(runs) + 1):
        if end < len(runs) and runs["flops"][end] <= runs["flops"][start] * (1 + tolerance):
            continue
        group = runs.iloc[start:end].sort_values("params")
        start = end
        if len(group) < 3:
            continue
        best = int(np.argmin(group["val_loss"].to_numpy()))
        if best in (0, len(group) - 1):
            out.append({"flops": float(group["flops"].median()), "best_params": float(group["params"].iloc[best]),
                        "edge": "smallest" if best == 0 else "largest"})
    return out


def describe_fit(s: dict[str, Any]) -> str:
    iv = s["intervals"]
    rows = [f"fitted on {s['runs']} runs (Huber on log-loss, L-BFGS from a grid of starts; 95% bootstrap intervals)"]
    for k in ("E", "A", "B", "alpha", "beta", "a", "b"):
        published = s["published"].get(k)
        if published is None and k in ("a", "b"):
            published = getattr(law_.CUERVO_MARXER, k)
        rows.append(f"  {k:<6} {s[k]:>10.4g}   [{iv[k][0]:.4g}, {iv[k][1]:.4g}]   Cuervo & Marxer: {published:.4g}")
    rows.append(f"  N_opt ∝ C^{s['a']:.3f}, D_opt ∝ C^{s['b']:.3f}; fit error {s['rmse_log_loss']:.2%} (RMS of log-loss)")
    for u in s["unbracketed_budgets"]:
        rows.append(f"  warning: at {u['flops']:.3g} FLOPs the {u['edge']} model ({u['best_params'] / 1e6:.3g}M) has the "
                    f"lowest loss: the grid does not bracket that budget's optimum; add "
                    f"{'smaller' if u['edge'] == 'smallest' else 'larger'} models")
    if not s["comparable_with_cuervo_marxer"]:
        rows.append("  (runs on other tokens than the law's: the coefficients describe this setup, not comparable)")
    return "\n".join(rows)
