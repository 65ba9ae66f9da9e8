"""`slam-ray compare`: a table of experiments from MLflow (one row per `slam-ray run`), sorted by a metric.

Thin first version: parent runs with their logged `eval/*` and `time/*` metrics and the params that differ
between them, as Markdown in the terminal and CSV in `--out`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from slam_ray.errors import SlamError


def _markdown(df: pd.DataFrame) -> str:
    cells = [[str(c) for c in df.columns]] + [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row]
                                             for row in df.itertuples(index=False)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(df.columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def experiment_table(tracking_uri: str, experiment: str | None, metric: str) -> pd.DataFrame:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    names = [experiment] if experiment else None
    runs = mlflow.search_runs(experiment_names=names, search_all_experiments=names is None,
                              filter_string="tags.`slam_ray.kind` = 'experiment'")
    if runs.empty:
        raise SlamError(f"no slam-ray experiment runs in {tracking_uri}" + (f" under {experiment!r}" if experiment else "")
                        + "; run `slam-ray run EXPERIMENT` first or pass --tracking-uri")
    metric_cols = sorted(c for c in runs.columns if c.startswith("metrics."))
    # Swept params: those with more than one value among the runs that logged them (a field added to the schema
    # later is missing from older runs, which alone does not make it an ablation axis).
    param_cols = [c for c in runs.columns if c.startswith("params.")
                  and runs[c].replace("None", None).dropna().nunique() > 1]
    table = runs[["run_id", "tags.mlflow.runName", "start_time", *param_cols, *metric_cols]].copy()
    table.columns = [c.removeprefix("metrics.").removeprefix("params.").replace("tags.mlflow.runName", "run")
                     for c in table.columns]
    if metric in table.columns:
        table = table.sort_values(metric, ascending=False, na_position="last")
    return table.reset_index(drop=True)


def compare(experiment: str | None, tracking_uri: str | None, metric: str, out_dir: str | None) -> pd.DataFrame:
    if tracking_uri is None:
        if experiment is None:
            raise SlamError("give --tracking-uri, or --experiment NAME to read ./slam_runs/NAME/mlflow.db")
        db = Path("slam_runs") / experiment / "mlflow.db"
        if not db.is_file():
            raise SlamError(f"no MLflow store at {db}; pass --tracking-uri (e.g. sqlite:///path/mlflow.db)")
        tracking_uri = f"sqlite:///{db.absolute()}"
    table = experiment_table(tracking_uri, experiment, metric)
    shown = table.drop(columns=["start_time"]).assign(run_id=table["run_id"].str[:8])
    print(_markdown(shown))
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        table.to_csv(Path(out_dir) / "compare.csv", index=False)
        print(f"\nwrote {Path(out_dir) / 'compare.csv'}")
    return table
