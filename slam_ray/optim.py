"""Optimizers and learning-rate schedules of the paper's ablations, from well-kept implementations.

Optimizers: `adamw` and `adamw_fused` (torch), `adafactor` (torch), `ademamix` and `lion` (pytorch-optimizer).
Schedules (a multiplier of the base lr per step, after linear warmup): `cosine` (to `min_lr`), `linear`
(to `min_lr`), `inverse_sqrt`, `wsd` (warmup-stable-decay: flat, then a linear decay to `min_lr` over the
last `decay_ratio` of the steps), `constant`.
"""

from __future__ import annotations

import math

from slam_ray.config import OptimizerConfig, ScheduleConfig

OPTIMIZERS = ("adamw", "adamw_fused", "adafactor", "ademamix", "lion")


def build_optimizer(cfg: OptimizerConfig, params):
    import torch

    if cfg.name in ("adamw", "adamw_fused"):
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 fused=cfg.name == "adamw_fused")
    if cfg.name == "adafactor":
        return torch.optim.Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    from pytorch_optimizer import AdEMAMix, Lion

    if cfg.name == "ademamix":
        return AdEMAMix(params, lr=cfg.lr, betas=(*cfg.betas, cfg.beta3), alpha=cfg.alpha, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, weight_decouple=True)
    if cfg.name == "lion":
        return Lion(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}; choose from {', '.join(OPTIMIZERS)}")


def warmup_steps(sched: ScheduleConfig, total: int) -> int:
    return sched.warmup_steps if sched.warmup_steps is not None else int(round(sched.warmup_ratio * total))


def lr_factor(step: int, total: int, warmup: int, sched: ScheduleConfig, base_lr: float) -> float:
    """Multiplier of the base lr at `step` (0-based): linear warmup, then the named decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    floor = sched.min_lr / base_lr
    if sched.name == "constant":
        return 1.0
    if sched.name == "inverse_sqrt":
        return math.sqrt(max(warmup, 1) / (step + 1))
    if sched.name == "wsd":
        decay_start = total - int(round(sched.decay_ratio * total))
        if step < decay_start:
            return 1.0
        return 1.0 - (1.0 - floor) * min(1.0, (step - decay_start) / max(1, total - decay_start))
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if sched.name == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
