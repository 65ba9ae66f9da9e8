"""`slam-ray train`: pre-train a speech LM on packed unit windows with Ray Train (`TorchTrainer`).

Read top to bottom: the driver builds a `TorchTrainer`; each worker builds the model, probes its own
throughput when the budget is wall-clock time (so a cosine schedule really ends at the budget), trains with
AdamW + warmup/cosine, logs to MLflow from rank 0, and reports two HF checkpoints: `init` (step 0, the
untrained baseline evaluation compares against) and `final`. The driver copies both into the stage folder.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import numpy as np

from slam_ray.config import Experiment
from slam_ray.optim import build_optimizer, lr_factor, warmup_steps
from slam_ray.runner import StageResult, init_ray, run_stage
from slam_ray.stage_io import StageDir, Timer, upstream_dir
from slam_ray.storage import in_filesystem, localize, run_storage, storage_root
from slam_ray.tracking import Tracker
from slam_ray.train_utils import (
    all_ranks,
    check_global_batch,
    flops_per_token,
    full_state,
    load_optimizer_state,
    out_of_time,
    peak_tflops,
    quiet_worker_logs,
    report_checkpoint,
    resume_state,
    shard_model,
)
from slam_ray.units import PAD_ID

PROBE_STEPS = 6  # timed forward/backward passes (weights untouched) that size a time-budgeted schedule
INTERMEDIATE_VAL_WINDOWS = 256  # progress reports validate on this many windows; the final pass on all
TOO_FEW_WINDOWS = "lower train.batch_size, train.num_workers or pack.context_len, or give more data"


class WindowBatches:
    """Seeded epoch-wise shuffles of the packed windows; rank r takes its slice of every global batch."""

    def __init__(self, windows: np.ndarray, batch_size: int, rank: int, world: int, seed: int) -> None:
        self.windows, self.batch_size, self.rank, self.world, self.seed = windows, batch_size, rank, world, seed
        self.global_batch = batch_size * world
        check_global_batch(len(windows), "training windows", self.global_batch, TOO_FEW_WINDOWS)
        self.per_epoch = len(windows) // self.global_batch

    def batch(self, index: int) -> np.ndarray:
        epoch, i = divmod(index, self.per_epoch)
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.windows))
        start = i * self.global_batch + self.rank * self.batch_size
        return self.windows[order[start : start + self.batch_size]]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from slam_ray.model import build_model, count_parameters

    exp = Experiment.model_validate(config["experiment"])
    cfg = exp.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.torch_threads or max(1, round(exp.ray.worker_cpus)))
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()
    tracker = Tracker(**config["tracker"]) if rank == 0 else None
    quiet_worker_logs()
    # MLflow writes go through one background thread so a slow store never eats the training budget.
    log_thread = ThreadPoolExecutor(max_workers=1)

    train_windows = np.load(localize(config["train_path"]))  # fetched to this node when the workdir is a bucket
    val_windows = np.load(localize(config["val_path"]))
    context_len = train_windows.shape[1]
    model = build_model(cfg.model, exp.vocab_size, max_positions=context_len)
    n_params = count_parameters(model)
    resumed = resume_state(model)
    if resumed is None:
        report_checkpoint(model, rank, {"step": 0, "kind": "init", "params": n_params})
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    fsdp = cfg.strategy == "fsdp"
    if fsdp:
        model = shard_model(model.to(device))
    if cfg.compile:
        model = torch.compile(model)  # save_pretrained and state_dict pass through to the HF model
    if not fsdp:
        model = ray.train.torch.prepare_model(model)  # DDP (and the move to the worker's device)
    # MFU on GPU: model FLOPs per token over the GPUs' peak (train.peak_tflops, or looked up by name)
    peak = cfg.peak_tflops or (peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
    hf_config = getattr(model, "module", model).config
    model_flops = flops_per_token(n_params, hf_config.num_hidden_layers, hf_config.hidden_size, context_len)
    opt = build_optimizer(cfg.optimizer, model.parameters())
    data = WindowBatches(train_windows, cfg.batch_size, rank, world, cfg.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    def loss_on(windows: np.ndarray, net: torch.nn.Module) -> torch.Tensor:
        x = torch.from_numpy(windows.astype(np.int64)).to(device)
        labels = x.masked_fill(x == PAD_ID, -100)
        with autocast:
            return net(input_ids=x, labels=labels).loss

    def validate(limit: int | None = None) -> float:
        """Mean loss over (the first `limit` of) the validation windows, all ranks sharing the work. Under DDP
        it runs on the unwrapped module: ranks may see unequal numbers of batches, and a DDP forward would wait
        for the other ranks (a deadlock). A sharded model's every forward is collective, so under FSDP every
        rank runs the same number of batches (a rank out of windows repeats one and does not count it)."""
        plain = (model if fsdp else getattr(model, "module", model)).eval()
        windows = val_windows[:limit]
        stride = cfg.batch_size * world
        starts = range(rank * cfg.batch_size, -(-len(windows) // stride) * stride if fsdp else len(windows), stride)
        losses = []
        with torch.no_grad():
            for i in starts:
                loss = loss_on(windows[i : i + cfg.batch_size] if i < len(windows) else windows[:1], plain).item()
                if i < len(windows):
                    losses.append(loss)
        plain.train()
        return all_ranks(sum(losses), "sum") / max(1.0, all_ranks(len(losses), "sum"))

    tokens_per_step = cfg.batch_size * context_len * cfg.grad_accum * world
    # Step and token budgets cap the step count; a time budget sizes it from measured throughput below.
    step_cap = min(cfg.max_steps or 10**12, -(-cfg.max_tokens // tokens_per_step) if cfg.max_tokens else 10**12)
    if resumed is not None:
        step, plan, reports_done = resumed["step"], resumed["plan"], resumed.get("reports_done", 0)
        start = time.perf_counter() - resumed["train_seconds"]  # the budget counts training time only
        load_optimizer_state(model, opt, resumed["optimizer"])
        torch.set_rng_state(resumed["torch_rng"])
        if tracker:
            print(f"[train] resuming at step {step}/{plan['total']} from the latest checkpoint")
    else:
        # Schedule length: max_steps, or what the time budget affords at the throughput measured here. The
        # probe runs whole steps at lr 0 (weights unchanged), then forgets the optimizer state it built.
        step, start, reports_done = 0, time.perf_counter(), 0
        total_steps = step_cap
        if cfg.max_minutes:
            probe_start = start
            for group in opt.param_groups:
                group["lr"] = 0.0
            for i in range(PROBE_STEPS):
                if i == 1:
                    probe_start = time.perf_counter()  # the first step pays one-off costs
                for micro in range(cfg.grad_accum):
                    (loss_on(data.batch(i * cfg.grad_accum + micro), model) / cfg.grad_accum).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
                opt.step()
                opt.zero_grad(set_to_none=True)
            opt.state.clear()
            for group in opt.param_groups:
                group["lr"] = cfg.optimizer.lr
            step_time = all_ranks((time.perf_counter() - probe_start) / (PROBE_STEPS - 1), "max")
            budget_left = cfg.max_minutes * 60 - (time.perf_counter() - start)
            total_steps = max(1, min(total_steps, int(budget_left / step_time)))
        # The probe misses per-step costs of the real loop (logging, data, allocator) and throughput drifts:
        # with a time budget, re-plan from the real steps' throughput at 10%, 40%, 70% and 90% of the plan
        # (each moves the lr by a few percent at most), so the schedule ends at the budget.
        replans = sorted({max(PROBE_STEPS, int(total_steps * f)) for f in (0.1, 0.4, 0.7, 0.9)}) if cfg.max_minutes else []
        plan = {"total": total_steps, "warmup": warmup_steps(cfg.schedule, total_steps), "replans": replans}
        if tracker:  # on the log thread: a worker's first MLflow call takes seconds, inside the time budget
            log_thread.submit(tracker.log_params, {"model.params": n_params, "schedule.planned_steps": plan["total"],
                                                   "schedule.warmup_steps": plan["warmup"]})
            print(f"[train] {n_params / 1e6:.2f}M params, {world} worker(s), {plan['total']} steps planned")
    sched = torch.optim.lr_scheduler.LambdaLR(  # reads plan["total"] at every step, so a re-plan applies at once
        opt, lambda s: lr_factor(s, plan["total"], plan["warmup"], cfg.schedule, cfg.optimizer.lr))
    if resumed is not None:
        sched.load_state_dict(resumed["scheduler"])
        # Building a LambdaLR sets every group's lr to its step-0 value; put back the resumed step's lr.
        for group, lr in zip(opt.param_groups, sched.get_last_lr(), strict=True):
            group["lr"] = lr

    first_step, loss_sum, last_step = step, 0.0, step
    loop_start = last_log = last_print = last_checkpoint = time.perf_counter()
    while step < plan["total"]:
        model.train()
        for micro in range(cfg.grad_accum):
            # DDP all-reduces (FSDP reduce-scatters) gradients on the last micro-batch only.
            last = micro == cfg.grad_accum - 1
            if fsdp:
                getattr(model, "_orig_mod", model).set_requires_gradient_sync(last)
            with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
                loss = loss_on(data.batch(step * cfg.grad_accum + micro), model) / cfg.grad_accum
                loss.backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP: every rank takes part in making it whole
            grad_norm = grad_norm.full_tensor()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if plan["replans"] and step >= plan["replans"][0] and step > first_step:
            plan["replans"].pop(0)
            step_time = all_ranks((time.perf_counter() - loop_start) / (step - first_step), "max")
            budget_left = cfg.max_minutes * 60 - (time.perf_counter() - start)
            plan["total"] = max(step, min(step_cap, step + int(budget_left / step_time)))
        sched.step()  # after a re-plan, so the next step's lr already follows the new plan
        # The time budget is checked every step, not at log steps only (a large log_every overshot it).
        stop = out_of_time(start, cfg.max_minutes)
        if step % cfg.log_every == 0 or step == plan["total"] or stop:
            now = time.perf_counter()
            elapsed_steps = step - last_step
            loss_sum = all_ranks(loss_sum, "sum") / world  # the loss of the global batch, not rank 0's share
            tokens_per_s = elapsed_steps * tokens_per_step / (now - last_log)
            mfu = {"train/mfu": tokens_per_s * model_flops / (world * peak * 1e12)} if peak else {}
            if tracker:
                log_thread.submit(tracker.log_metrics, {
                    "train/loss": loss_sum / elapsed_steps, "train/lr": sched.get_last_lr()[0],
                    "train/grad_norm": float(grad_norm), "train/tokens": step * tokens_per_step,
                    "train/tokens_per_s": tokens_per_s, **mfu}, step)
                if now - last_print > 20 or step == plan["total"]:
                    print(f"[train] step {step}/{plan['total']}  loss {loss_sum / elapsed_steps:.3f}  "
                          f"lr {sched.get_last_lr()[0]:.2e}  {tokens_per_s:,.0f} tokens/s"
                          + (f"  MFU {mfu['train/mfu']:.1%}" if mfu else ""))
                    last_print = now
            loss_sum, last_log, last_step = 0.0, now, step
        if stop:
            break
        if cfg.val_reports and step < plan["total"] and step * cfg.val_reports >= (reports_done + 1) * plan["total"]:
            # Progress report: the validation loss at each 1/val_reports of the budget, which a sweep's
            # early-stopping scheduler (ASHA, median) compares across trials at equal shares of their budgets.
            reports_done = step * cfg.val_reports // plan["total"]
            progress = {"step": step, "progress": round(100 * step / plan["total"], 2),
                        "val/loss": validate(INTERMEDIATE_VAL_WINDOWS), "train/tokens": step * tokens_per_step}
            if tracker:
                log_thread.submit(tracker.log_metrics, {"val/loss": progress["val/loss"]}, step)
            ray.train.report(progress)
        due = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0
        if cfg.checkpoint_every_minutes and step < plan["total"]:  # every rank must agree: it is a barrier
            due |= all_ranks(float(time.perf_counter() - last_checkpoint > cfg.checkpoint_every_minutes * 60), "max") > 0
        if due and step < plan["total"]:
            last_checkpoint = time.perf_counter()
            weights, optimizer_state = full_state(model, opt)  # collective under FSDP
            state = {"step": step, "plan": plan, "reports_done": reports_done,
                     "train_seconds": time.perf_counter() - start,
                     "optimizer": optimizer_state, "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state()}
            report_checkpoint(model, rank, {"step": step, "kind": "periodic"}, state, weights)
    train_seconds = time.perf_counter() - start
    log_thread.shutdown(wait=True)
    if tracker:
        tracker.log_params({"schedule.total_steps": plan["total"]})  # idempotent when a resumed run logs it again

    val_loss = validate()
    metrics = {"step": step, "kind": "final", "progress": 100.0, "val/loss": val_loss, "tokens": step * tokens_per_step,
               "train_seconds": train_seconds, "tokens_per_s": (step - first_step) * tokens_per_step / (time.perf_counter() - loop_start),
               "params": n_params, "total_steps": plan["total"]}
    if peak:
        metrics["mfu"] = metrics["tokens_per_s"] * model_flops / (world * peak * 1e12)
    if tracker:
        tracker.log_metrics({"val/loss": val_loss, "train/tokens_per_s_mean": metrics["tokens_per_s"],
                             **({"train/mfu_mean": metrics["mfu"]} if peak else {})}, step)
    report_checkpoint(model, rank, metrics, weights=full_state(model, opt)[0] if fsdp else None)


def _tune_callbacks() -> list:
    """Inside a sweep trial (a Tune function), forward the progress reports to Tune so its scheduler can
    stop the trial early; elsewhere nothing."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportProgress(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):  # noqa: ANN001
            if "progress" in metrics[0]:  # not the step-0 checkpoint report
                super().after_report(run_context, [{k: v for k, v in metrics[0].items() if k != "kind"}], None)

    try:
        return [ReportProgress()]
    except RuntimeError:  # "must be used in a Tune session"
        return []


def _train(exp: Experiment, out: StageDir, tracker: Tracker, timer: Timer) -> StageResult:
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    packed = upstream_dir(exp, "pack")
    # Fail here, before Ray starts workers, when the data cannot fill one global batch (a worker would fail alike).
    n_windows = ((packed.read_manifest() or {}).get("counts") or {}).get("train_windows")
    if n_windows is not None:
        check_global_batch(int(n_windows), "training windows", exp.train.batch_size * exp.train.num_workers, TOO_FEW_WINDOWS)
    init_ray(exp)
    resources = exp.train.resources_per_worker or {"CPU": exp.ray.worker_cpus, **({"GPU": 1} if exp.train.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": exp.model_dump(mode="json"), "tracker": asdict(tracker),
                           "train_path": packed.location("train.npy"),
                           "val_path": packed.location("val.npy")},
        scaling_config=ScalingConfig(num_workers=exp.train.num_workers, use_gpu=exp.train.use_gpu,
                                     resources_per_worker=resources),
        # Ray Train's own INFO lines (resources requested, results reported) stay in its log files.
        run_config=RunConfig(**run_storage(exp, out, "train"),
                             failure_config=FailureConfig(max_failures=exp.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=None),
                             logging_config=LoggingConfig(log_level="WARNING"), callbacks=_tune_callbacks()),
    )
    with timer.phase("fit"):
        result = trainer.fit()
    checkpoints = {m.get("kind"): (ckpt, m) for ckpt, m in result.best_checkpoints}  # the latest of each kind
    for kind, folder in (("init", "checkpoint_init"), ("final", "checkpoint")):
        target = out.path / folder
        shutil.rmtree(target, ignore_errors=True)
        checkpoints[kind][0].to_directory(str(target))
    # Every reported checkpoint, oldest first: what `eval.checkpoints: [all]` scores for a learning curve.
    root = storage_root(exp, out)
    listing = sorted(({"step": int(m["step"]), "kind": m.get("kind"), "path": in_filesystem(root, ckpt.path)}
                      for ckpt, m in result.best_checkpoints), key=lambda c: c["step"])
    (out.path / "checkpoints.json").write_text(json.dumps(listing, indent=1))
    final = checkpoints["final"][1]
    return StageResult(
        counts={"steps": int(final["step"]), "tokens": int(final["tokens"]), "params": int(final["params"])},
        outputs={"checkpoint": "checkpoint", "checkpoint_init": "checkpoint_init"},
        metrics={"val/loss_final": float(final["val/loss"]), "train/seconds": float(final["train_seconds"]),
                 "train/tokens_per_s_mean": float(final["tokens_per_s"]),
                 **({"train/mfu_mean": float(final["mfu"])} if "mfu" in final else {})},
    )


def train(exp: Experiment) -> StageDir:
    return run_stage(exp, "train", _train)

