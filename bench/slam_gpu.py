"""The `slam` recipe on a GPU through Ray: the full-size model (random weights, the paper's shape) trained by the
`train` stage itself — Ray Train, bf16, document masking, the recipe's micro-batch x accumulation, `compile` as
asked — beside bench/gpu.py's bare train step in the same run (the Ray Train wrapper's cost as a ratio), then DPO
of that model in bf16 through the `dpo` stage (tokens/s and peak memory).

The recipe file is loaded as shipped; only what needs data or a hub is replaced: the model is built from its
shape (`train.model.init: random`, no base to download), the pack output is written by the pack stage's own
writer from random utterances of 40-600 units (as bench/gpu.py's document-masked variant), and DPO reads a
slamkit preference JSONL of random unit triples of SpokenSwag-like lengths. Figures are read from what the
stages logged to MLflow (`train/tokens_per_s`, `train/mfu`, `train/peak_mem_gib` per log step; the first log
interval, which holds the compilation, left out).

On the lent GPU machine (no Ray, MLflow or pydantic there): `bash bench/gpu_bundle.sh` here, then
`bash bench/gpu_device.sh` there with `.whl` carried. `--tiny` runs the same path on a CPU with a tiny model
(the check that the script works before a GPU is spent on it; no bare step, no MFU).

    python bench/slam_gpu.py [--steps 120] [--dpo-steps 30] [--batch 8x10] [--compile] [--tiny] [--bare-steps 12]
    (last line: one JSON object)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

TINY_MODEL = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 128}


def overrides(workdir: Path, args: argparse.Namespace, prefs: Path) -> list[str]:
    from gpu import SLAM_MODEL

    batch, accum = (int(x) for x in args.batch.split("x"))
    model = TINY_MODEL if args.tiny else SLAM_MODEL
    values = [
        f"workdir={workdir}", f"stages={json.dumps(['pack', 'train'] + (['dpo'] if args.dpo_steps else []))}",
        "train.model.init=random", "train.model.base=null", *(f"train.model.{k}={v}" for k, v in model.items()),
        f"train.batch_size={batch}", f"train.grad_accum={accum}", f"train.compile={str(args.compile).lower()}",
        f"train.max_steps={args.steps}", "train.max_minutes=null", f"train.log_every={args.log_every}",
        f"dpo.inputs={json.dumps([str(prefs)])}", f"dpo.max_steps={max(1, args.dpo_steps)}", "dpo.max_minutes=null",
        f"dpo.log_every={max(1, args.dpo_steps // 4)}",  # several intervals: the first (warm-up) is left out
    ]
    if args.tiny:  # a CPU: no GPU requests, a short context, the recipe's precision and masking kept
        values += ["pack.context_len=128", "train.use_gpu=false", "ray.worker_cpus=1", "dpo.batch_size=2",
                   "dpo.grad_accum=2"]
    return values


def write_pack_output(exp, n_windows: int) -> None:
    """The pack stage's output for `exp`: document windows from the pack writer, and a complete manifest."""
    from gpu import document_windows

    from slam_ray.core.stage_io import stage_dir

    out = stage_dir(exp, "pack")
    out.path.mkdir(parents=True, exist_ok=True)
    document_windows(n_windows, out.path, context=exp.pack.context_len, vocab=exp.vocab_size, n_val=16)
    out.write_manifest({"status": "complete", "stage": "pack", "key": out.key, "counts": {"train_windows": n_windows}})


def write_preferences(path: Path, n_units: int, n_triples: int, tiny: bool) -> None:
    """slamkit preference triples of random units: prompts ~6 s, continuations ~4-8 s at 25 Hz (SpokenSwag-like)."""
    from slam_ray.speech.units import write_jsonl

    rng = np.random.default_rng(0)
    scale = 0.2 if tiny else 1.0

    def part(low: int, high: int) -> dict:
        units = rng.integers(0, n_units, size=int(rng.integers(low, high) * scale)).tolist()
        return {"units": units, "duration": [1] * len(units)}

    write_jsonl(path, [{"prompt": part(120, 180), "chosen": part(100, 200), "rejected": part(100, 200)}
                       for _ in range(n_triples)])


def history(exp, stage: str, metric: str) -> list[float]:
    """The values a stage logged for `metric`, by step."""
    import mlflow

    from slam_ray.core.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri(exp))
    runs = client.search_runs([client.get_experiment_by_name(exp.name).experiment_id],
                              f"tags.`slam_ray.stage` = '{stage}'")
    return [m.value for m in sorted(client.get_metric_history(runs[0].info.run_id, metric), key=lambda m: m.step)]


def steady(values: list[float]) -> float | None:
    """The mean over the log intervals after the first (which holds compilation and warm-up)."""
    rest = values[1:] or values
    return float(np.mean(rest)) if rest else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="train steps through the stage")
    parser.add_argument("--dpo-steps", type=int, default=30, help="DPO steps through the stage (0: no DPO)")
    parser.add_argument("--batch", default="8x10", help="micro-batch x accumulation (the recipe's: 8x10)")
    parser.add_argument("--compile", action="store_true", help="train.compile (dpo takes train's)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--bare-steps", type=int, default=12, help="timed steps of bench/gpu.py's bare step")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on a CPU: checks the script, no figures")
    args = parser.parse_args()

    from slam_ray.config import load_experiment
    from slam_ray.pipeline import stage_function

    workdir = Path(tempfile.mkdtemp(prefix="slam_gpu_"))
    prefs = workdir / "preferences.jsonl"
    exp = load_experiment("slam", overrides(workdir / "work", args, prefs))
    write_preferences(prefs, exp.extract.tokenizer.n_units, 400 if not args.tiny else 80, args.tiny)
    write_pack_output(exp, n_windows=2048 if not args.tiny else 256)
    result: dict = {"steps": args.steps, "batch": args.batch, "compile": args.compile, "tiny": args.tiny}

    start = time.perf_counter()
    stage_function("train")(exp)
    result["train_stage_wall_s"] = round(time.perf_counter() - start, 1)
    result["stage_tokens_per_s"] = steady(history(exp, "train", "train/tokens_per_s"))
    result["stage_mfu"] = steady(history(exp, "train", "train/mfu")) if not args.tiny else None
    peaks = history(exp, "train", "train/peak_mem_gib") if not args.tiny else []
    result["stage_peak_mem_gib"] = max(peaks) if peaks else None
    print(f"[slam_gpu] train through Ray: {result}", flush=True)
    if not args.tiny:  # the bare step after Ray has let go of the GPU, same shapes, same process
        from gpu import train_throughput

        batch, accum = (int(x) for x in args.batch.split("x"))
        bare = train_throughput(batch, accum, exp.train.optimizer.name, args.compile, args.bare_steps, document_mask=True)
        result["bare"] = bare
        result["ratio"] = round(result["stage_tokens_per_s"] / bare["tokens_per_s"], 3)
        print(f"[slam_gpu] bare step {bare['tokens_per_s']:,} tokens/s, MFU {bare['mfu']}; stage/bare {result['ratio']}",
              flush=True)

    if args.dpo_steps:
        start = time.perf_counter()
        stage_function("dpo")(exp)
        result["dpo_stage_wall_s"] = round(time.perf_counter() - start, 1)
        result["dpo_tokens_per_s"] = steady(history(exp, "dpo", "dpo/tokens_per_s"))
        peaks = history(exp, "dpo", "dpo/peak_mem_gib") if not args.tiny else []
        result["dpo_peak_mem_gib"] = max(peaks) if peaks else None
        print(f"[slam_gpu] dpo through Ray: tokens/s {result['dpo_tokens_per_s']}, peak {result['dpo_peak_mem_gib']} GiB",
              flush=True)

    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
