"""The interleaving ablation at quickstart scale: `quickstart_interleaved` against its speech-only arm at equal tokens.

Runs `quickstart_interleaved` into a fresh workdir, then the same recipe with `pack.interleave: null` and the
speech-only tasks in the same workdir (synth and extract reused: the same speech, units, model and 250 steps of
16 x 256 tokens), and prints both arms' accuracies with their 95% intervals, the interleaved stream's token shares
and the wall time of the interleaved run (the 10-minute target of issue 22 is the baseline: `ratio` = seconds /
600). Writes a bar chart of the comparison beside the JSON. The last line is one JSON object:

    {"interleaved_s": ..., "stages_s": {...}, "speech_only": {task: [acc, lo, hi]}, "interleaved": {...},
     "token_shares": {"unit": ..., "text": ..., "marker": ...}, "plot": "...png", "ratio": ...}

    .venv/bin/python bench/interleaving.py [--workdir DIR] [--plot PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_SECONDS = 600
SPEECH_TASKS = ["lexical", "word_order", "agreement"]


def _results(exp) -> dict[str, list[float]]:  # noqa: ANN001
    from slam_ray.core.stage_io import stage_dir

    results = json.loads(stage_dir(exp, "eval").local("results.json").read_text())
    return {task: [r["accuracy"], r["ci95_low"], r["ci95_high"]] for task, r in results.items()
            if "@" not in task and "accuracy" in r}


def plot(speech: dict[str, list[float]], mixed: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(mixed)
    x = np.arange(len(tasks))
    fig, ax = plt.subplots(figsize=(9, 4))
    for offset, label, arm in ((-0.2, "speech-only", speech), (0.2, "interleaved", mixed)):
        shown = [t for t in tasks if t in arm]
        acc = np.array([arm[t][0] for t in shown])
        err = np.array([[arm[t][0] - arm[t][1] for t in shown], [arm[t][2] - arm[t][0] for t in shown]])
        ax.bar([x[tasks.index(t)] + offset for t in shown], acc, 0.4, yerr=err, capsize=3, label=label)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, [t.replace("cm_grammar_", "cross-modal ") for t in tasks], rotation=20, ha="right")
    ax.set(ylim=(0.4, 1.0), ylabel="accuracy (95% CI)", title="quickstart at equal tokens: speech-only vs interleaved")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="a folder that does not exist yet (default: a fresh temporary one)")
    parser.add_argument("--plot", default="bench_out/interleaving.png", help="where to write the bar chart")
    args = parser.parse_args()

    from slam_ray.config import load_experiment
    from slam_ray.core.stage_io import stage_dir
    from slam_ray.pipeline import run_experiment

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_interleaving_")) / "quickstart_interleaved"
    if workdir.exists() and any(workdir.iterdir()):
        sys.exit(f"{workdir} is not empty: a reused stage would not be timed; pass a fresh --workdir")
    mixed = load_experiment("quickstart_interleaved", [f"workdir={workdir}"])
    start = time.perf_counter()
    stages, _ = run_experiment(mixed)
    total = time.perf_counter() - start
    speech = load_experiment("quickstart_interleaved", [f"workdir={workdir}", "pack.interleave=null",
                                                        f"eval.tasks={json.dumps(SPEECH_TASKS)}"])
    run_experiment(speech)

    counts = stage_dir(mixed, "pack").read_manifest()["counts"]
    shares = {kind: counts[f"train_{kind}_token_share"] for kind in ("unit", "text", "marker")}
    arms = {"speech_only": _results(speech), "interleaved": _results(mixed)}
    path = Path(args.plot)
    path.parent.mkdir(parents=True, exist_ok=True)
    plot(arms["speech_only"], arms["interleaved"], path)
    print(f"\nquickstart_interleaved: {total:.0f} s (target {TARGET_SECONDS} s); "
          + ", ".join(f"{s} {v:.0f} s" for s, v in stages.items()))
    print(f"training tokens: {shares['unit']:.1%} units, {shares['text']:.1%} text, {shares['marker']:.1%} markers")
    for task, (acc, lo, hi) in arms["interleaved"].items():
        other = arms["speech_only"].get(task)
        print(f"  {task:<16} interleaved {acc:.3f} ({lo:.3f}-{hi:.3f})"
              + (f"   speech-only {other[0]:.3f} ({other[1]:.3f}-{other[2]:.3f})" if other else ""))
    print(json.dumps({"interleaved_s": round(total, 1), "stages_s": stages, **arms, "token_shares": shares,
                      "plot": str(path), "target_s": TARGET_SECONDS, "ratio": round(total / TARGET_SECONDS, 3)}))


if __name__ == "__main__":
    main()
