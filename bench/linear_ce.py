"""The output head + cross-entropy of one micro-batch, the model's own way (the whole logits, transformers'
`ForCausalLMLoss`) against slam_ray's fused linear cross-entropy (`train.loss_chunk_tokens`: a chunk of tokens at
a time, gradients made in the forward), on the device here: forward + backward time and peak memory.

The shape is the interleaved `slam` model's head: hidden 896 (Qwen2.5-0.5B), 152,168 rows (its 151,665 text tokens +
500 units + 2 markers + `<pad>`; `--vocab 502` is the speech-only head), `--tokens` per micro-batch. Each variant runs in a
fresh process, so the peak resident memory (CPU: ru_maxrss; GPU: torch.cuda.max_memory_allocated) is its own.
The weight and hidden states are made before the clock and the peak's baseline.

    python bench/linear_ce.py [--tokens 4096] [--vocab 152168] [--hidden 896] [--chunks 1024,4096] [--bf16]
                              [--device cpu|cuda] [--repeats 3]
    (last line: one JSON object)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def measure(args: argparse.Namespace, chunk: int) -> dict[str, float]:
    """Seconds per forward + backward (best of `repeats`, after one warm-up) and the peak memory above the
    inputs, for the full head (chunk 0) or the fused loss in chunks of `chunk` tokens."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from slam_ray.lm.linear_ce import linear_cross_entropy

    torch.manual_seed(0)
    device = torch.device(args.device)
    weight = (torch.randn(args.vocab, args.hidden, device=device) * 0.02).requires_grad_()
    hidden = torch.randn(1, args.tokens, args.hidden, device=device).requires_grad_()
    labels = torch.randint(0, args.vocab, (1, args.tokens), device=device)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            if chunk:
                loss = linear_cross_entropy(hidden, weight, labels, chunk)
            else:
                loss = ForCausalLMLoss(hidden @ weight.T, labels, args.vocab)
        loss.backward()
        weight.grad = hidden.grad = None
        return loss.item()

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = step()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"seconds": min(times), "peak_gib": peak / 2**30, "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=152_168)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--chunks", default="1024,4096", help="fused variants' chunk sizes (tokens)")
    parser.add_argument("--bf16", action="store_true", help="under bf16 autocast, as train.precision: bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child process's variant
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args, args.one)))
        return

    results = {}
    for chunk in [0] + [int(c) for c in args.chunks.split(",")]:
        child = [a for a in sys.argv[1:]] + ["--one", str(chunk)]
        out = subprocess.run([sys.executable, __file__, *child], capture_output=True, text=True)
        name = f"fused/{chunk}" if chunk else "full"
        if out.returncode != 0:  # e.g. out of memory: the other variants still run
            print(f"{name:>12}: failed ({out.stderr.strip().splitlines()[-1:]})", flush=True)
            results[name] = {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
            continue
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        results[name] = figures
        print(f"{name:>12}: {figures['seconds'] * 1e3:8.1f} ms fwd+bwd, peak {figures['peak_gib']:6.2f} GiB above inputs, "
              f"loss {figures['loss']:.4f}", flush=True)
    full = results["full"]
    for name, figures in results.items():
        if name != "full" and "error" not in figures and "error" not in full:
            figures["speedup"] = full["seconds"] / figures["seconds"]
            figures["memory_ratio"] = figures["peak_gib"] / full["peak_gib"] if full["peak_gib"] > 0 else None
    print(json.dumps({"tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden, "bf16": args.bf16,
                      "device": args.device, **results}))


if __name__ == "__main__":
    main()
