"""`slam-ray compare`: an ablation table and its plots, from MLflow.

Rows are `slam-ray run` experiments and sweep trials (one MLflow run each), from one or more MLflow
experiments, or the trials of one sweep. Columns: what differs between them (the swept values of a sweep;
otherwise every param with more than one value), the final metrics, the best validation loss, tokens, wall time,
status and stop reason. Sorted by the chosen metric; printed as Markdown, written as CSV. Plots: the metric per
value of each swept parameter, and the training/validation curves overlaid (from each row's `train` stage run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from slam_ray.core.tracking import mlflow_client
from slam_ray.errors import SlamError

SUMMARY = ("val/loss", "val/loss_best", "train/tokens", "train/steps", "train/seconds", "wall_s")


def _markdown(df: pd.DataFrame) -> str:
    cells = [[str(c) for c in df.columns]] + [[_cell(v) for v in row] for row in df.itertuples(index=False)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(df.columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "" if pd.isna(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def search_runs(uri: str, experiments: list[str] | None, filter_string: str) -> pd.DataFrame:
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=experiments, search_all_experiments=experiments is None,
                              filter_string=filter_string)


def runs_table(uri: str, experiments: list[str] | None = None, sweep_run_id: str | None = None,
               metric: str = "eval/word_order/accuracy", mode: str = "max") -> pd.DataFrame:
    """One row per experiment run or trial (only the trials of `sweep_run_id` when given), sorted by `metric`."""
    if sweep_run_id:
        runs = search_runs(uri, experiments, f"tags.`mlflow.parentRunId` = '{sweep_run_id}' and tags.`slam_ray.kind` = 'trial'")
    else:
        frames = [search_runs(uri, experiments, f"tags.`slam_ray.kind` = '{kind}'") for kind in ("experiment", "trial")]
        frames = [f for f in frames if not f.empty]
        runs = pd.concat(frames) if frames else pd.DataFrame()
    if runs.empty:
        where = f" under {', '.join(experiments)}" if experiments else ""
        raise SlamError(f"no slam-ray runs in {uri}{where}; run `slam-ray run EXPERIMENT` or `slam-ray sweep` first, "
                        "or pass --tracking-uri / --experiment")
    runs = runs.reset_index(drop=True)
    swept = sorted(c for c in runs.columns if c.startswith("params.swept.") and runs[c].notna().any())
    if swept and runs["tags.slam_ray.kind"].eq("trial").all():
        param_cols = swept
    else:
        # Params with more than one value among the runs that logged them (a field added to the schema later is
        # missing from older runs, which alone does not make it an ablation axis).
        param_cols = [c for c in runs.columns if c.startswith("params.") and not c.startswith("params.swept.")
                      and runs[c].replace("None", None).dropna().nunique() > 1]
    client = mlflow_client(uri)
    runs["metrics.val/loss_best"] = [_best(client, run_id, "val/loss") for run_id in runs["run_id"]]
    runs["metrics.wall_s"] = (pd.to_datetime(runs["end_time"]) - pd.to_datetime(runs["start_time"])).dt.total_seconds()
    metric_cols = [f"metrics.{m}" for m in SUMMARY if f"metrics.{m}" in runs.columns]
    metric_cols += sorted(c for c in runs.columns if c.startswith("metrics.eval/") and c not in metric_cols)
    tags = {"tags.mlflow.runName": "run", "tags.slam_ray.kind": "kind", "status": "status",
            "tags.slam_ray.stop_reason": "stop_reason", "tags.mlflow.parentRunId": "parent_run_id"}
    for tag in tags:
        if tag not in runs.columns:
            runs[tag] = None
    table = runs[["run_id", *tags, *param_cols, *metric_cols, "start_time"]].rename(columns=tags)
    table.columns = [c.removeprefix("metrics.").removeprefix("params.swept.").removeprefix("params.") for c in table.columns]
    table["parent_run_id"] = table["parent_run_id"].where(table["kind"] == "trial")
    if metric in table.columns:
        table = table.sort_values(metric, ascending=mode == "min", na_position="last")
    return table.reset_index(drop=True)


def _best(client: Any, run_id: str, key: str) -> float | None:
    values = [m.value for m in client.get_metric_history(run_id, key)]
    return min(values) if values else None


def _curves(uri: str, run_ids: list[str]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per row: train/loss and val/loss by step, from its `train` stage run(s) (a resumed trial has two)."""
    client = mlflow_client(uri)
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for run_id in run_ids:
        found = client.search_runs(
            [client.get_run(run_id).info.experiment_id],
            f"tags.`mlflow.parentRunId` = '{run_id}' and tags.`slam_ray.stage` = 'train'")
        out[run_id] = {key: sorted((m.step, m.value) for r in found for m in client.get_metric_history(r.info.run_id, key))
                       for key in ("train/loss", "val/loss")}
    return out


def plot(table: pd.DataFrame, params: list[str], metric: str, curves: dict, path: Path) -> Path:
    """Left: `metric` per value of each swept param. Right: train and validation loss of every row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(params))
    fig, axes = plt.subplots(1, n + 2, figsize=(4.2 * (n + 2), 3.8), squeeze=False)
    axes = axes[0]
    done = table[table[metric].notna()] if metric in table.columns else table.iloc[:0]
    for ax, param in zip(axes[:n], params or [None], strict=False):
        if param is None or done.empty:
            ax.text(0.5, 0.5, f"no {metric} values" if done.empty else "no swept parameter", ha="center")
            ax.set_axis_off()
            continue
        values = pd.to_numeric(done[param], errors="coerce")
        numeric = values.notna().all()
        labels = sorted(done[param].astype(str).unique())
        x = values if numeric else pd.Series([labels.index(v) for v in done[param].astype(str)], index=done.index)
        # a trial stopped early shows its last reported value (hollow): it never reached the end of its budget
        stopped = done["stop_reason"].fillna("completed").ne("completed")
        ax.scatter(x[~stopped], done[metric][~stopped], s=40, label="completed")
        if stopped.any():
            ax.scatter(x[stopped], done[metric][stopped], s=40, facecolors="none", edgecolors="grey",
                       label="stopped early (last report)")
        if numeric and values.min() > 0 and values.max() / values.min() >= 10:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=20)
        ax.legend(fontsize=7)
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax, key in zip(axes[n:], ("train/loss", "val/loss"), strict=True):
        for row in table.itertuples(index=False):
            points = curves.get(row.run_id, {}).get(key, [])
            if points:
                steps, values = zip(*points, strict=True)
                label = row.run if row.stop_reason in (None, "completed") or pd.isna(row.stop_reason) else f"{row.run} (stopped)"
                ax.plot(steps, values, marker="o" if key == "val/loss" else None, ms=3, label=label, alpha=0.85)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _swept_params(table: pd.DataFrame) -> list[str]:
    fixed = {"run_id", "run", "kind", "status", "stop_reason", "parent_run_id", "start_time", *SUMMARY}
    return [c for c in table.columns if c not in fixed and not c.startswith("eval/")]


def _write(uri: str, table: pd.DataFrame, metric: str, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = out_dir / "compare.csv"
    table.to_csv(csv, index=False)
    png = plot(table, _swept_params(table), metric, _curves(uri, list(table["run_id"])), out_dir / "compare.png")
    return csv, png


def _show(table: pd.DataFrame) -> None:
    shown = table.drop(columns=["start_time", "parent_run_id"]).assign(run_id=table["run_id"].str[:8])
    print(_markdown(shown))


def sweep_report(uri: str, experiment: str, parent: Any, metric: str, mode: str, folder: Path) -> pd.DataFrame:
    """The table and plots of one sweep, printed, saved in its folder and logged to its parent run."""
    table = runs_table(uri, [experiment], sweep_run_id=parent.run_id, metric=metric, mode=mode)
    _show(table)
    csv, png = _write(uri, table, metric, folder)
    parent.log_artifact(csv)
    parent.log_artifact(png)
    best = best_completed(table, metric)
    if best is not None:
        parent.log_metrics({f"best/{metric}": float(best[metric])})
        parent.set_tags({"slam_ray.best_trial": best["run"], "slam_ray.best_run_id": best["run_id"]})
        print(f"\nbest by {metric} ({mode}): {best['run']}  {metric} = {best[metric]:.4f}")
    return table


def best_completed(table: pd.DataFrame, metric: str) -> pd.Series | None:
    """The best row (the table is sorted best first) among the trials that ran to their end: a trial a scheduler
    stopped, or one that failed, holds its last intermediate figure (val/loss on a sample of the validation windows,
    before its schedule's decay) and is no fair rival to a finished one's final figure."""
    if metric not in table.columns:
        return None
    finished = table[(table["stop_reason"] == "completed") & table[metric].notna()]
    return finished.iloc[0] if len(finished) else None


def find_sweep(uri: str, experiments: list[str] | None, sweep: str) -> str:
    """The parent run id of a sweep given by run id, sweep name, or space name (the latest such sweep)."""
    runs = search_runs(uri, experiments, "tags.`slam_ray.kind` = 'sweep'")
    if runs.empty:
        raise SlamError(f"no sweeps in {uri}; run `slam-ray sweep EXPERIMENT --space SPACE` first")
    names = runs["tags.slam_ray.sweep"].fillna("")
    match = runs[(runs["run_id"] == sweep) | (names == sweep) | names.str.startswith(f"{sweep}-")]
    if match.empty:
        raise SlamError(f"no sweep {sweep!r} in {uri}; known: {', '.join(sorted(set(names)))}")
    return match.sort_values("start_time").iloc[-1]["run_id"]


def resolve_tracking_uri(experiments: list[str] | None, tracking_uri: str | None) -> str:
    """The MLflow URI given, or the sqlite store of ./slam_runs/NAME (the default workdir) for one experiment."""
    if tracking_uri is not None:
        return tracking_uri
    if not experiments or len(experiments) != 1:
        raise SlamError("give --tracking-uri, or one --experiment NAME to read ./slam_runs/NAME/mlflow.db")
    db = Path("slam_runs") / experiments[0] / "mlflow.db"
    if not db.is_file():
        raise SlamError(f"no MLflow store at {db}; pass --tracking-uri (e.g. sqlite:///path/mlflow.db)")
    return f"sqlite:///{db.absolute()}"


def compare(experiments: list[str] | None, tracking_uri: str | None, metric: str, out_dir: str | None,
            sweep: str | None = None, mode: str = "max") -> pd.DataFrame:
    tracking_uri = resolve_tracking_uri(experiments, tracking_uri)
    sweep_run_id = find_sweep(tracking_uri, experiments, sweep) if sweep else None
    table = runs_table(tracking_uri, experiments, sweep_run_id, metric, mode)
    _show(table)
    if out_dir:
        csv, png = _write(tracking_uri, table, metric, Path(out_dir))
        print(f"\nwrote {csv} and {png}")
    return table
