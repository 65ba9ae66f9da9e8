"""Pieces the Ray Train loops (`train`, `dpo`) share: agreement across ranks, and checkpoints that carry the
trainer state a resumed run continues from."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from slam_ray.errors import SlamError


def all_ranks(value: float, op: str) -> float:
    """`value` summed ("sum") or maxed ("max") over the ranks; the value itself outside a process group."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    # NCCL (Ray Train's backend on GPUs) reduces CUDA tensors only; Ray has set this worker's current device.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
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


TRAINER_STATE = "trainer_state.pt"


def shard_model(model: Any) -> Any:
    """FSDP2 (`fully_shard`): each transformer block (the model's `_no_split_modules` classes) is its own shard
    unit, the rest (embeddings, tied head, final norm) the root's. Weights, gradients and optimizer state are
    split across ranks and gathered a block at a time."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    return model


def full_state(model: Any, optimizer: Any) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(full model state dict or None when the model is not sharded, optimizer state dict to resume from).
    For a sharded model both are gathered to full tensors on the CPU — every rank must call this."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    module = getattr(model, "_orig_mod", model)  # under torch.compile
    if not hasattr(module, "reshard"):  # not FSDP
        return None, optimizer.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options), get_optimizer_state_dict(module, optimizer, options=options)


def load_optimizer_state(model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Put back an optimizer state saved by `full_state` (sharded again under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    module = getattr(model, "_orig_mod", model)
    if not hasattr(module, "reshard"):
        optimizer.load_state_dict(state)
    else:
        # keys a scheduler added to the saved groups (LambdaLR's initial_lr) must exist before the load
        for group, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
            for key, value in saved.items():
                group.setdefault(key, value)
        set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))


class _NoTrainInfo:
    """A logging filter: drops Ray Train's own records below WARNING (e.g. "Reporting training result ...").
    Matched by source file as well as by logger name: Train V2's context module logs through
    `logging.getLogger(__file__)`, a logger named by its path that propagates to the root logger."""

    def __init__(self) -> None:
        import os

        import ray.train

        self.package_dir = os.path.dirname(ray.train.__file__) + os.sep

    def filter(self, record) -> bool:
        import logging

        if record.levelno >= logging.WARNING:
            return True
        return not (record.name.startswith("ray.train") or record.pathname.startswith(self.package_dir))


def quiet_worker_logs() -> None:
    """Ray Train's per-report INFO lines stay in its log files: in a worker, the console handlers that could
    print them (on the `ray.train`, `ray` and root loggers) drop them; the file handlers keep everything."""
    import logging

    for logger in (logging.getLogger("ray.train"), logging.getLogger("ray"), logging.getLogger()):
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                if not any(isinstance(f, _NoTrainInfo) for f in handler.filters):
                    handler.addFilter(_NoTrainInfo())


def report_checkpoint(model: Any, rank: int, metrics: dict[str, Any], state: dict[str, Any] | None = None,
                      weights: dict[str, Any] | None = None) -> None:
    """Every rank calls report (it is a barrier); rank 0 attaches the HF checkpoint (`weights`: the gathered
    state dict of a sharded model), plus the trainer state (optimizer, scheduler, step, plan, RNG, elapsed time)
    that a resumed run continues from."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            getattr(model, "module", model).save_pretrained(tmp, state_dict=weights)
            if state is not None:
                torch.save(state, Path(tmp) / TRAINER_STATE)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def resume_state(model: Any) -> dict[str, Any] | None:
    """Weights and trainer state of the latest checkpoint of this run (after a worker failure, or when the
    same command is run again after an interruption); None for a fresh start."""
    import ray.train
    import torch
    from transformers import AutoModelForCausalLM

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        if not (Path(folder) / TRAINER_STATE).is_file():
            return None  # the step-0 checkpoint: nothing trained yet
        model.load_state_dict(AutoModelForCausalLM.from_pretrained(folder).state_dict())
        return torch.load(Path(folder) / TRAINER_STATE, weights_only=False)


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
