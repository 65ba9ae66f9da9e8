"""The quickstart end to end: seconds per stage and the accuracies it reaches, in a fresh workdir.

What `make demo` runs after installing (`slam-ray run quickstart`), in-process so each stage's wall time is
measured where the CLI measures it (Ray and MLflow start-up included in the first stages that need them).
The 6-minute target of the quickstart on a 2-core machine is the baseline: `ratio` = total seconds / 360.
The last line is one JSON object:

    {"total_s": ..., "stages_s": {"synth": ..., ...}, "accuracy": {"lexical": ..., ...},
     "before_dpo": {...}, "untrained": {...}, "train_steps": ..., "train_tokens": ..., "ratio": ...}

    .venv/bin/python bench/quickstart.py [--workdir DIR] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_SECONDS = 360


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="a folder that does not exist yet (default: a fresh temporary one)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a quickstart field")
    args = parser.parse_args()

    from slam_ray.config import load_experiment
    from slam_ray.core.stage_io import stage_dir
    from slam_ray.pipeline import run_experiment

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_quickstart_")) / "quickstart"
    if workdir.exists() and any(workdir.iterdir()):
        sys.exit(f"{workdir} is not empty: a reused stage would not be timed; pass a fresh --workdir")
    exp = load_experiment("quickstart", [f"workdir={workdir}", *args.set])
    start = time.perf_counter()
    stages, _partial = run_experiment(exp)
    total = time.perf_counter() - start

    results = json.loads(stage_dir(exp, "eval").local("results.json").read_text())
    tasks = exp.eval.grammar_tasks

    def accuracies(suffix: str) -> dict[str, float]:
        return {t: results[f"{t}{suffix}"]["accuracy"] for t in tasks if f"{t}{suffix}" in results}

    train = stage_dir(exp, "train").read_manifest()
    figures = {"total_s": round(total, 1), "stages_s": stages, "accuracy": accuracies(""),
               "ci95": {t: [results[t]["ci95_low"], results[t]["ci95_high"]] for t in tasks if t in results},
               "before_dpo": accuracies("@before_dpo"), "untrained": accuracies("@init"),
               "train_steps": train["counts"]["steps"], "train_tokens": train["counts"]["tokens"],
               "target_s": TARGET_SECONDS, "ratio": round(total / TARGET_SECONDS, 3)}
    print(f"\nquickstart: {total:.0f} s in all (target {TARGET_SECONDS} s); "
          + ", ".join(f"{s} {v:.0f} s" for s, v in stages.items()))
    for name, accs in (("after DPO", figures["accuracy"]), ("before DPO", figures["before_dpo"]),
                       ("untrained", figures["untrained"])):
        print(f"  {name:<11}" + "  ".join(f"{t} {a:.3f}" for t, a in accs.items()))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
