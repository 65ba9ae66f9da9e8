"""Training throughput: slam_ray's Ray Train path vs a plain single-process PyTorch loop, same model and data.

Both train the quickstart model (Qwen2, 2 x 128) on the same packed windows for the same number of steps
with the same optimizer; tokens/s of the Ray path are measured inside the worker over its training loop (Ray
start-up and checkpoint upload excluded, as for the baseline), and the last line is one JSON object.

`--profile` also samples every process on the machine once a second while the Ray path runs and prints the CPU
seconds each kind of process used (the training worker, Ray Train's controller, the dashboard, GCS, raylet, …):
where the cores went besides the worker (`bench/cpu_profile.py`; psutil, from the dev extra).

    .venv/bin/python bench/train.py [--steps 300] [--context 256] [--batch 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def packed_windows(n_windows: int, context: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Token windows with real structure (repeated random 'words'), not uniform noise."""
    rng = np.random.default_rng(seed)
    words = [rng.integers(2, vocab, size=rng.integers(3, 9)) for _ in range(300)]
    stream = np.concatenate([words[i] for i in rng.integers(0, len(words), size=n_windows * context)])
    return stream[: n_windows * context].reshape(n_windows, context).astype(np.uint16)


def plain_loop(exp, windows: np.ndarray, steps: int, threads: int) -> float:
    import torch

    from slam_ray.lm.model import build_model
    from slam_ray.lm.optim import build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(exp.train.model, exp.vocab_size, max_positions=windows.shape[1])
    opt = build_optimizer(exp.train.optimizer, model.parameters())
    b = exp.train.batch_size
    x_all = torch.from_numpy(windows.astype(np.int64))
    start = time.perf_counter()
    for step in range(steps):
        i = (step * b) % (len(x_all) - b)
        x = x_all[i : i + b]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * b * windows.shape[1] / (time.perf_counter() - start)


def ray_train_path(exp, windows: np.ndarray) -> float:
    from slam_ray.core.stage_io import stage_dir
    from slam_ray.lm.packed import save_windows
    from slam_ray.stages.train import train

    out = stage_dir(exp, "pack")
    out.path.mkdir(parents=True, exist_ok=True)
    save_windows(out.path, windows, windows[:8])
    out.write_manifest({"status": "complete", "stage": "pack", "key": out.key})
    result = train(exp)
    manifest = json.loads(result.manifest_path.read_text())
    return float(manifest["metrics"]["train/tokens_per_s_mean"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="CPU seconds per process kind during the Ray path")
    args = parser.parse_args()

    from slam_ray.config import load_experiment

    with tempfile.TemporaryDirectory() as tmp:
        exp = load_experiment("quickstart", [
            f"workdir={tmp}", f"train.max_steps={args.steps}", "train.max_minutes=null", "train.checkpoint_every=null",
            f"train.batch_size={args.batch}", f"pack.context_len={args.context}", f"ray.worker_cpus={args.threads}",
            "train.log_every=50"])
        windows = packed_windows(max(4 * args.batch, 600), args.context, exp.vocab_size)
        baseline = plain_loop(exp, windows, args.steps, args.threads)
        if args.profile:
            from cpu_profile import CpuProfile  # bench/ is this script's folder

            with CpuProfile() as profile:
                ray_path = ray_train_path(exp, windows)
            print("CPU seconds by process during the Ray path:\n" + profile.table())
        else:
            ray_path = ray_train_path(exp, windows)
    figures = {"slam_tokens_per_s": round(ray_path), "baseline_tokens_per_s": round(baseline),
               "ratio": round(ray_path / baseline, 3), "steps": args.steps, "batch": args.batch,
               "context": args.context, "threads": args.threads}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
