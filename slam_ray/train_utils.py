"""Pieces the Ray Train loops (`train`, `dpo`) share: agreement across ranks, and checkpoints that carry the
trainer state a resumed run continues from."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any


def all_ranks(value: float, op: str) -> float:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return float(t.item())


TRAINER_STATE = "trainer_state.pt"


def report_checkpoint(model: Any, rank: int, metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None:
    """Every rank calls report (it is a barrier); rank 0 attaches the HF checkpoint, plus the trainer state
    (optimizer, scheduler, step, plan, RNG, elapsed time) that a resumed run continues from."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            getattr(model, "module", model).save_pretrained(tmp)
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
