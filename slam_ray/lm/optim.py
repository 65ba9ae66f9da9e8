"""Optimizers and learning-rate schedules of the paper's ablations, from well-kept implementations.

Optimizers: `adamw` and `adamw_fused` (torch), `adafactor` (torch), `ademamix` and `lion` (pytorch-optimizer),
`adalomo` (AdaLomo's update rule, below: lomo-optim's own class needs CUDA and a fused backward).
Schedules (a multiplier of the base lr per step, after linear warmup): `cosine` (to `min_lr`), `linear`
(to `min_lr`), `inverse_sqrt`, `wsd` (warmup-stable-decay: flat, then a linear decay to `min_lr` over the
last `decay_ratio` of the steps), `constant`.
"""

from __future__ import annotations

import math

from slam_ray.config import OptimizerConfig, ScheduleConfig

OPTIMIZERS = ("adamw", "adamw_fused", "adafactor", "ademamix", "lion", "adalomo")


def _adalomo_class():
    import torch

    class AdaLomo(torch.optim.Optimizer):
        """AdaLomo (Lv et al. 2023): an Adafactor-style factored second moment (rows x columns for matrices),
        the update clipped to RMS <= `clip_threshold`, and a step scaled by the parameter's RMS (at least
        `eps[1]`), with beta2 = 1 - t^decay_rate. lomo-optim applies it inside the backward pass to save gradient
        memory; that fused form allocates its state with `.cuda()`, cannot accumulate gradients or sum them
        across DDP ranks, and updates a tied weight from half its gradient. This is the same rule as an
        ordinary `step()` after backward (tested against lomo-optim's fused version, parameter for parameter),
        so it runs on CPU, with accumulation, DDP and tied embeddings; the memory saving is not reproduced."""

        def __init__(self, params, lr: float = 1e-3, eps: tuple[float, float] = (1e-30, 1e-3),
                     clip_threshold: float = 1.0, decay_rate: float = -0.8, weight_decay: float = 0.0) -> None:
            super().__init__(params, dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                                          weight_decay=weight_decay))

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                eps, decay_rate = group["eps"], group["decay_rate"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    grad = p.grad.float()
                    state = self.state[p]
                    if not state:
                        state["step"] = 0
                        if p.dim() > 1:
                            state["row"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                            state["col"] = torch.zeros(p.shape[1], dtype=torch.float32, device=p.device)
                        else:
                            state["sq"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                    state["step"] += 1
                    beta2t = 1.0 - math.pow(state["step"], decay_rate)
                    squared = grad**2 + eps[0]
                    if p.dim() > 1:
                        state["row"].mul_(beta2t).add_(squared.mean(dim=-1), alpha=1.0 - beta2t)
                        state["col"].mul_(beta2t).add_(squared.mean(dim=-2), alpha=1.0 - beta2t)
                        row_factor = (state["row"] / state["row"].mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
                        update = row_factor * state["col"].unsqueeze(-2).rsqrt() * grad
                    else:
                        state["sq"].mul_(beta2t).add_(squared, alpha=1.0 - beta2t)
                        update = state["sq"].rsqrt() * grad
                    update.div_((update.norm(2) / update.numel() ** 0.5 / group["clip_threshold"]).clamp_(min=1.0))
                    weights = p.float()
                    lr = group["lr"] * max(eps[1], float(weights.norm(2) / math.sqrt(p.numel())))
                    if group["weight_decay"]:
                        weights.mul_(1.0 - lr * group["weight_decay"])
                    weights.add_(update, alpha=-lr)
                    p.copy_(weights)

    return AdaLomo


def build_optimizer(cfg: OptimizerConfig, params):
    import torch

    if cfg.name in ("adamw", "adamw_fused"):
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 fused=cfg.name == "adamw_fused")
    if cfg.name == "adalomo":
        return _adalomo_class()(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adafactor":
        return torch.optim.Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    from pytorch_optimizer import AdEMAMix, Lion

    if cfg.name == "ademamix":
        return AdEMAMix(params, lr=cfg.lr, betas=(*cfg.betas, cfg.beta3), alpha=cfg.alpha, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, weight_decouple=True)
    if cfg.name == "lion":
        return Lion(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}; choose from {', '.join(OPTIMIZERS)}")


INVERSE_SQRT_TIMESCALE = 10_000  # transformers.get_inverse_sqrt_schedule's default without warmup


def warmup_steps(sched: ScheduleConfig, total: int) -> int:
    return sched.warmup_steps if sched.warmup_steps is not None else int(round(sched.warmup_ratio * total))


def replan_before(sched: ScheduleConfig) -> float:
    """The fraction of a schedule before which a time budget's re-plans may move its end: a WSD schedule's decay
    start (its lr is flat until then, then falls over the last `decay_ratio`), anywhere for the others."""
    return 1.0 - sched.decay_ratio if sched.name == "wsd" else 1.0


def lr_factor(step: int, total: int, warmup: int, sched: ScheduleConfig, base_lr: float) -> float:
    """Multiplier of the base lr at `step` (0-based): linear warmup, then the named decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    floor = sched.min_lr / base_lr
    if sched.name == "constant":
        return 1.0
    if sched.name == "inverse_sqrt":
        # Hugging Face's (slamkit's DPO runs it through TRL), one step on as the warmup above is: timescale = the
        # warmup, or 10,000 steps without one; 1/sqrt(step) without a warmup would leave DPO's usual warmup-free
        # run at 3.5% of its lr by step 813.
        timescale = warmup or INVERSE_SQRT_TIMESCALE
        return math.sqrt(timescale / (step + 1 + timescale - warmup))
    if sched.name == "wsd":
        decay_start = total - int(round(sched.decay_ratio * total))
        if step < decay_start:
            return 1.0
        return 1.0 - (1.0 - floor) * min(1.0, (step - decay_start) / max(1, total - decay_start))
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if sched.name == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
