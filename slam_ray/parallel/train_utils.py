"""Plain helpers of the training loops (`train`, `dpo`; the scaffold itself is `slam_ray/parallel/trainer.py`): agreement
across ranks, the global-batch check, epochs' seeded orders, and the FLOPs arithmetic of MFU. No Ray here."""

from __future__ import annotations

import time

import numpy as np

from slam_ray.errors import SlamError


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of `n` items in an epoch: the first from `seed` alone, later ones from (seed, epoch). Seeding with
    `seed + epoch` gave seed s's second epoch seed s+1's first order, so runs of neighbouring seeds (a seed sweep,
    grid repeats) shared their later epochs' orders."""
    return np.random.default_rng(seed if epoch == 0 else (seed, epoch)).permutation(n)


def all_ranks(value: float, op: str) -> float:
    """`value` summed ("sum"), maxed ("max") or minimised ("min") over the ranks; the value itself outside a
    process group."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    # NCCL (Ray Train's backend on GPUs) reduces CUDA tensors only; Ray has set this worker's current device.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op={"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}[op])
    return float(t.item())


def out_of_time(start: float, max_minutes: float | None) -> bool:
    """Whether the time budget counted from `start` (a `time.perf_counter()`) is spent, agreed by every rank:
    one rank's clock may cross it a step before another's, and all must stop on the same step. Called every
    step: a one-float all-reduce, negligible beside the gradient all-reduce the same step does."""
    return bool(max_minutes) and all_ranks(float(time.perf_counter() - start > max_minutes * 60), "max") > 0


def check_global_batch(n: int, what: str, global_batch: int, fix: str) -> None:
    """A clear error when the data holds fewer `what` than one global batch (a rank would get none)."""
    if n < global_batch:
        raise SlamError(f"{n} {what} < one global batch ({global_batch}); {fix}")


# Dense bf16 tensor-core peaks (no sparsity), per GPU, from the vendors' data sheets; matched by device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A6000": 155.0, "A5000": 111.0, "A10": 125.0, "4090": 165.0, "3090": 71.0, "V100": 125.0}


def peak_tflops(device_name: str) -> float | None:
    """The bf16 peak of a GPU by its `torch.cuda.get_device_name()`; None when unknown (set train.peak_tflops)."""
    for key, tflops in PEAK_BF16_TFLOPS.items():  # the more specific names come first
        if key in device_name:
            return tflops
    return None


def flops_per_token(n_params: int, n_layers: int, hidden: int, context: int) -> float:
    """Training FLOPs per token: 6 N for the weights (forward + backward) plus 12 L H T for attention scores
    (PaLM, appendix B). Recomputation for gradient checkpointing is not counted, as MFU conventions require."""
    return 6.0 * n_params + 12.0 * n_layers * hidden * context
