"""Sweep throughput and what ASHA saves: the same learning-rate grid run twice, in full (FIFO) and with ASHA.

Both sweeps train the same reduced-quickstart experiment (real espeak-ng speech, log-mel units, a small Qwen2)
with a step budget per trial, on the same local Ray. Printed: trials completed per hour of sweep wall time, the
training tokens each sweep spent (a stopped trial counts the tokens it trained before its stop), the compute
ASHA saved against the full grid, and whether both picked the same best learning rate (lowest final val loss).
Shared stages (synth, extract, pack) run once per sweep before its trials and are not counted.
The last line is one JSON object.

    .venv/bin/python bench/sweep.py [--lrs 1e-2,3e-3,1e-3,3e-4,1e-4,3e-5] [--steps 120] [--concurrency 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def experiment(workdir: Path, steps: int, concurrency: int, scheduler: str):
    from slam_ray.config import Experiment

    return Experiment.model_validate({
        "name": "bench_sweep", "workdir": str(workdir),
        "ray": {"actor_cpus": 0.5, "worker_cpus": 1},
        "synth": {"corpus": {"n_sentences": 800}},
        "extract": {"tokenizer": {"n_units": 100, "fit_frames": 20000}},
        "pack": {"context_len": 128},
        "train": {"batch_size": 8, "max_steps": steps, "max_minutes": None, "log_every": 10, "val_reports": 10,
                  "model": {"hidden_size": 96, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4,
                            "intermediate_size": 256}},
        "eval": {"n_pairs": 50},
        "sweep": {"scheduler": scheduler, "metric": "val/loss", "mode": "min", "max_concurrent_trials": concurrency,
                  "grace_percent": 20, "reduction_factor": 2},
    })


def run(root: Path, lrs: list[float], steps: int, concurrency: int, scheduler: str) -> dict:
    from slam_ray.pipeline import stage_function
    from slam_ray.sweeps.search_space import SearchSpace
    from slam_ray.sweeps.sweep import shared_stages, sweep

    exp = experiment(root / scheduler, steps, concurrency, scheduler)
    space = SearchSpace.model_validate({"name": "lr", "params": {"train.optimizer.lr": {"grid": lrs}}})
    for stage in shared_stages(exp, space):  # data preparation is not what this benchmark measures
        stage_function(stage)(exp)
    start = time.perf_counter()
    table = sweep(exp, space)
    hours = (time.perf_counter() - start) / 3600
    completed = table[table["status"] == "FINISHED"]
    best = completed.sort_values("val/loss").iloc[0]
    return {"trials": len(table), "completed": len(completed), "hours": hours,
            "tokens": float(table["train/tokens"].fillna(0).sum()),
            "best_lr": float(best["train.optimizer.lr"]), "best_val_loss": float(best["val/loss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", default="1e-2,3e-3,1e-3,3e-4,1e-4,3e-5")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--workdir", help="keep outputs here (default: a temporary folder)")
    args = parser.parse_args()
    lrs = [float(x) for x in args.lrs.split(",")]

    import ray

    ray.init(num_cpus=2, include_dashboard=True, logging_level="WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        grid = run(root, lrs, args.steps, args.concurrency, "fifo")
        asha = run(root, lrs, args.steps, args.concurrency, "asha")
    ray.shutdown()

    figures = {
        "trials": len(lrs), "steps_per_trial": args.steps, "concurrency": args.concurrency,
        "grid_trials_per_hour": round(grid["completed"] / grid["hours"], 1),
        "asha_trials_per_hour": round((asha["trials"]) / asha["hours"], 1),
        "asha_completed": asha["completed"], "asha_stopped_early": asha["trials"] - asha["completed"],
        "grid_train_tokens": int(grid["tokens"]), "asha_train_tokens": int(asha["tokens"]),
        "compute_saved": round(1 - asha["tokens"] / grid["tokens"], 3),
        "grid_wall_s": round(grid["hours"] * 3600, 1), "asha_wall_s": round(asha["hours"] * 3600, 1),
        "wall_saved": round(1 - asha["hours"] / grid["hours"], 3),
        "grid_best_lr": grid["best_lr"], "asha_best_lr": asha["best_lr"],
        "same_best": grid["best_lr"] == asha["best_lr"],
    }
    print(f"\nfull grid: {grid['completed']} trials, {grid['tokens']:,.0f} training tokens, "
          f"{grid['hours'] * 3600:.0f} s; best lr {grid['best_lr']:g} (val loss {grid['best_val_loss']:.4f})")
    print(f"ASHA:      {asha['completed']} of {asha['trials']} trials completed, {asha['tokens']:,.0f} training "
          f"tokens, {asha['hours'] * 3600:.0f} s; best lr {asha['best_lr']:g} (val loss {asha['best_val_loss']:.4f})")
    print(f"ASHA saved {figures['compute_saved']:.0%} of the training compute and {figures['wall_saved']:.0%} of the "
          f"wall time; same best configuration: {figures['same_best']}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
