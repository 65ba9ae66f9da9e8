"""Likelihood scoring throughput: slam_ray's Ray Data actors vs a plain in-process loop, same model, same pairs.

The baseline is slamkit's way: one process scores pair after pair in padded batches. slam_ray's path is what
`slam-ray eval` runs (`slam_ray.parallel.nll.score_sequences`): sequences sorted by length, spread over an actor pool,
one model per actor (one per GPU on a cluster). Both use the same CPU threads in total; the Ray path's time
includes starting its actors and loading the model in each. Pairs: random unit sequences with sSC-like lengths
(60-220 de-duplicated units, 25 Hz). Model: a Qwen2 of `--layers` x `--hidden` over 502 ids (the recipe's
vocabulary) with random weights, built here. Last line: JSON.

    .venv/bin/python bench/eval.py [--pairs 400] [--actors 2] [--hidden 256] [--layers 4] [--batch 32]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    import os

    import ray
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from slam_ray.config import Experiment
    from slam_ray.lm.scoring import pair_outcomes, sequence_nll
    from slam_ray.parallel.nll import score_sequences

    rng = np.random.default_rng(0)
    seqs = {f"{i}-{side}": rng.integers(0, 500, size=int(rng.uniform(60, 220))).tolist()
            for i in range(args.pairs) for side in ("pos", "neg")}
    n_tokens = sum(len(s) + 2 for s in seqs.values())
    cpus = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        cfg = Qwen2Config(vocab_size=502, hidden_size=args.hidden, num_hidden_layers=args.layers,
                          num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64),
                          intermediate_size=4 * args.hidden, tie_word_embeddings=True)
        Qwen2ForCausalLM(cfg).save_pretrained(tmp)
        print(f"{args.pairs} pairs, {n_tokens:,} tokens, Qwen2 {args.layers}x{args.hidden}, {cpus} CPU threads in total")

        torch.set_num_threads(cpus)
        start = time.perf_counter()
        model = Qwen2ForCausalLM.from_pretrained(tmp).eval()
        keys = list(seqs)
        baseline_nll = dict(zip(keys, sequence_nll(model, [seqs[k] for k in keys], "mean", args.batch), strict=True))
        baseline_s = time.perf_counter() - start
        print(f"baseline (one process, {cpus} threads): {baseline_s:.1f} s, {args.pairs / baseline_s:.1f} pairs/s")

        exp = Experiment.model_validate({"name": "bench_eval", "ray": {"actor_cpus": cpus / args.actors},
                                         "eval": {"num_actors": args.actors, "batch_size": args.batch}})
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
        try:
            start = time.perf_counter()
            ray_nll = score_sequences(exp, [tmp], seqs)[str(tmp)]
            ray_s = time.perf_counter() - start
        finally:
            ray.shutdown()
        print(f"slam_ray ({args.actors} Ray Data actors x {int(cpus / args.actors)} threads): {ray_s:.1f} s, "
              f"{args.pairs / ray_s:.1f} pairs/s")
        diff = max(abs(ray_nll[k] - baseline_nll[k]) for k in keys)
        agree = (pair_outcomes(np.array([ray_nll[f"{i}-pos"] for i in range(args.pairs)]),
                               np.array([ray_nll[f"{i}-neg"] for i in range(args.pairs)])) ==
                 pair_outcomes(np.array([baseline_nll[f"{i}-pos"] for i in range(args.pairs)]),
                               np.array([baseline_nll[f"{i}-neg"] for i in range(args.pairs)]))).mean()
        print(f"largest NLL difference {diff:.2e}; pair outcomes identical for {agree:.1%}")
    print(json.dumps({"slam_pairs_per_s": round(args.pairs / ray_s, 2), "baseline_pairs_per_s": round(args.pairs / baseline_s, 2),
                      "ratio": round(baseline_s / ray_s, 3), "pairs": args.pairs, "tokens": n_tokens,
                      "max_nll_difference": diff}))


if __name__ == "__main__":
    main()
