"""The trainer scaffold `train` and `dpo` share: small components (torchtune-style functions and dataclasses, no
base class), so each stage keeps only its data and its loss.

Read top to bottom: a worker sets itself up (`setup_worker`: threads, seed, device, MLflow log on rank 0, quiet
Ray Train logs); `prepare_model` applies the stage's `TrainerSettings` (gradient checkpointing, FSDP or DDP,
torch.compile); `Trainer` holds model, optimizer, lr schedule (`Plan`), time budget (`Budget`) and MFU, restores
a resumed run's state, and `Trainer.run` is the step loop: micro-batches under the stage's precision, gradient
sync on the last one only, clipping, re-plans of a time-budgeted schedule, logging, resumable checkpoints.
`Trainer.finish` reports the final checkpoint. On the driver, `fit` builds and runs the `TorchTrainer`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slam_ray.config import Experiment
from slam_ray.core.storage import run_storage
from slam_ray.core.tracking import Tracker, driver_writer
from slam_ray.parallel.train_utils import all_ranks, out_of_time, peak_tflops

if TYPE_CHECKING:
    import torch

TRAINER_STATE = "trainer_state.pt"
FINISHED = "finished.json"  # in a final checkpoint: its run needs no more training (the step it ended at)
PROBE_STEPS = 6  # timed steps (weights untouched) that size a time-budgeted schedule
PRINT_SECONDS = 20  # a progress line at most this often (and at the end)
TRAIN_POLL_INTERVAL_S = 0.25  # Ray Train controller's poll of its workers (Ray's default 2 s); see poll_reports_fast()


# ---------------------------------------------------------------------------------------------------------------
# settings: what `train.*` and `dpo.*` choose about how (not what) the model trains


@dataclass(frozen=True)
class TrainerSettings:
    precision: str = "fp32"  # "bf16": forwards under bf16 autocast, weights and optimizer state stay fp32
    compile: bool = False
    gradient_checkpointing: bool = False
    strategy: str = "ddp"  # or "fsdp"
    # Not a config field: every DPO batch is padded to its own longest row, so DPO compiles with dynamic shapes
    # from the start (a default compile built a static graph, then a dynamic one at the second width); train's
    # windows all have one length.
    dynamic_shapes: bool = False

    @classmethod
    def of(cls, exp: Experiment, stage: str) -> TrainerSettings:
        return cls(**exp.trainer_settings(stage), dynamic_shapes=stage == "dpo")

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp"


# ---------------------------------------------------------------------------------------------------------------
# worker setup and logging


class MetricsLog:
    """Rank 0's MLflow writes (through the driver's writer actor), on one background thread so a slow store never
    eats the training budget (the writer's first call to a new store takes seconds); a no-op on other ranks. After
    `close`, writes are synchronous."""

    def __init__(self, tracker: Tracker | None) -> None:
        self.tracker = tracker
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(max_workers=1) if tracker else None
        self._pending: list[Future] = []
        self.failed = 0  # writes that raised: said on the terminal, not silently dropped

    def _call(self, fn: Callable, *args: Any) -> None:
        if self._pool is not None:
            self._check(wait=False)
            self._pending.append(self._pool.submit(fn, *args))
        else:
            fn(*args)

    def _check(self, wait: bool) -> None:
        """Take the finished writes off the list (all of them, waiting, with `wait`); a failed one is printed (the
        first, then every 100th): a training run goes on without its metrics rather than die of a metrics store."""
        still = []
        for future in self._pending:
            if not wait and not future.done():
                still.append(future)
            elif (error := future.exception()) is not None:
                self.failed += 1
                if self.failed == 1 or self.failed % 100 == 0:
                    print(f"[mlflow] {self.failed} metric write(s) of this run failed, the latest: {error!r}")
        self._pending = still

    def params(self, values: dict[str, Any]) -> None:
        if self.tracker:
            self._call(self.tracker.log_params, values)

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.tracker:
            self._call(self.tracker.log_metrics, values, step)

    def print(self, line: str) -> None:
        if self.tracker:
            print(line)

    def flush(self) -> None:
        """Wait for what was logged so far (before a checkpoint a resumed run could start from)."""
        self._check(wait=True)

    def close(self) -> None:
        if self._pool is not None:
            self._check(wait=True)
            self._pool.shutdown(wait=True)
            self._pool = None


def peak_memory(device: Any, prefix: str) -> dict[str, float]:
    """`<prefix>/peak_mem_gib`: the most GPU memory this rank's tensors have held so far (torch's allocator; what
    decides whether a micro-batch fits a smaller card). Nothing on a CPU."""
    import torch

    if getattr(device, "type", None) != "cuda":
        return {}
    return {f"{prefix}/peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30}


@dataclass
class Worker:
    rank: int
    world: int
    device: torch.device
    log: MetricsLog


def setup_worker(exp: Experiment, config: dict[str, Any], seed: int) -> Worker:
    """Inside a Ray Train worker: intra-op threads, the seed (before any model is built), this worker's device,
    MLflow on rank 0, Ray Train's per-report INFO lines off the console."""
    import ray.train
    import ray.train.torch
    import torch

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(exp.train.torch_threads or max(1, round(exp.ray.worker_cpus)))
    torch.manual_seed(seed)
    quiet_worker_logs()
    return Worker(rank, ctx.get_world_size(), ray.train.torch.get_device(),
                  MetricsLog(Tracker(**config["tracker"]) if rank == 0 else None))


class _NoTrainInfo:
    """A logging filter: drops Ray Train's own records below WARNING (e.g. "Reporting training result ...").
    Matched by source file as well as by logger name: Train V2's context module logs through
    `logging.getLogger(__file__)`, a logger named by its path that propagates to the root logger."""

    def __init__(self) -> None:
        import os

        import ray.train

        self.package_dir = os.path.dirname(ray.train.__file__) + os.sep

    def filter(self, record) -> bool:  # noqa: ANN001
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


# ---------------------------------------------------------------------------------------------------------------
# precision, gradient checkpointing, compile, DDP / FSDP


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward pass's precision: bf16 autocast (CPU and GPU), or nothing for fp32."""
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def shard_model(model: Any) -> Any:
    """FSDP2 (`fully_shard`): each transformer block (the model's `_no_split_modules` classes) is its own shard
    unit, the rest (embeddings, tied head, final norm) the root's. Weights, gradients and optimizer state are
    split across ranks and gathered a block at a time. Ray's `prepare_model(parallel_strategy="fsdp")` refuses
    CPU; `fully_shard` runs on gloo too."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    return model


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute each layer's activations in the backward (non-reentrant). transformers renamed the switch in
    5.x (`gradient_checkpointing_enable`, e.g. 5.17 on the GPU image, is a deprecated alias in 5.25): either."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def prepare_model(model: Any, settings: TrainerSettings, device: torch.device) -> Any:
    """The model a worker trains: gradient checkpointing, then FSDP sharding or (after compile) DDP."""
    import ray.train.torch
    import torch
    import torch.distributed as dist

    if settings.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if settings.fsdp:
        model = shard_model(model.to(device))
    if settings.compile:
        # save_pretrained and state_dict pass through to the HF model; dynamic=None is torch's automatic choice
        model = torch.compile(model, dynamic=True if settings.dynamic_shapes else None)
    if not settings.fsdp:
        # DDP (and the move to the worker's device) in a Ray Train worker; outside a process group just the move
        model = ray.train.torch.prepare_model(model) if dist.is_available() and dist.is_initialized() else model.to(device)
    return model


def applied_settings(model: Any) -> dict[str, float]:
    """What `prepare_model` made of a model, seen on the model itself (1.0 / 0.0, for a report): compiled, and
    recomputing its layers' activations in the backward. `Trainer.finish` reports them and the stages' manifests
    count them (`applied_counts`), so a setting that never reached the workers shows as 0."""
    inner = getattr(model, "module", model)  # DDP's wrapped module
    base = getattr(inner, "_orig_mod", inner)  # torch.compile's
    return {"compiled": float(hasattr(inner, "_orig_mod")),
            "activation_checkpointing": float(bool(getattr(base, "is_activation_checkpointing",  # older: ...gradient...
                                                           getattr(base, "is_gradient_checkpointing", False))))}


def applied_counts(final: dict[str, Any]) -> dict[str, int]:
    """The manifest counts of `applied_settings`, from a run's final report (the driver's side)."""
    return {name: int(final[name]) for name in ("compiled", "activation_checkpointing")}


def prepare_frozen(model: Any, settings: TrainerSettings, device: torch.device) -> Any:
    """A frozen model beside the trained one (DPO's reference): sharded like it under FSDP (its forwards are
    then collective: every rank must run the same ones), else a plain copy on the device."""
    model = model.requires_grad_(False).eval()
    return shard_model(model.to(device)).eval() if settings.fsdp else model.to(device)


def plain_model(model: Any, settings: TrainerSettings) -> Any:
    """The model for forwards that ranks may run unequally often (evaluation): DDP's inner module, whose forward
    waits for no other rank. A sharded model has no such view: every rank must run the same forwards."""
    return model if settings.fsdp else getattr(model, "module", model)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints and resume


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


def report_checkpoint(model: Any, rank: int, metrics: dict[str, Any], state: dict[str, Any] | None = None,
                      weights: dict[str, Any] | None = None, finished: bool = False) -> None:
    """Every rank calls report (it is a barrier); rank 0 attaches the HF checkpoint (`weights`: the gathered
    state dict of a sharded model), plus the trainer state (optimizer, scheduler, step, plan, RNG, elapsed time)
    that a resumed run continues from, or for the final one (`finished`) the step the run ended at."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            getattr(model, "module", model).save_pretrained(tmp, state_dict=weights)
            if state is not None:
                torch.save(state, Path(tmp) / TRAINER_STATE)
            if finished:
                (Path(tmp) / FINISHED).write_text(json.dumps({"step": metrics["step"]}))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def resume_state(model: Any) -> dict[str, Any] | None:
    """Weights (loaded into `model`, before it is wrapped) and trainer state of the latest checkpoint of this run
    (after a worker failure, or when the same command is run again after an interruption); None for a fresh start;
    `{"finished": True, "step": N}` when the latest is the final checkpoint (`finished_before`)."""
    import ray.train
    import torch
    from transformers import AutoModelForCausalLM

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        if (Path(folder) / FINISHED).is_file():
            return {"finished": True, **json.loads((Path(folder) / FINISHED).read_text())}
        if not (Path(folder) / TRAINER_STATE).is_file():
            return None  # the step-0 checkpoint: nothing trained yet
        model.load_state_dict(AutoModelForCausalLM.from_pretrained(folder).state_dict())
        return torch.load(Path(folder) / TRAINER_STATE, weights_only=False)


def finished_before(w: Worker, resumed: dict[str, Any] | None, prefix: str) -> bool:
    """Whether this run had already reported its final checkpoint (the run restarted after it: a worker lost in the
    final report's barrier, or the command run again when the driver was stopped before the stage's manifest was
    written). Ray Train keeps that checkpoint and every one before it, so there is nothing to do: without this the
    run restarted from its random init and spent its whole budget again."""
    if not (resumed and resumed.get("finished")):
        return False
    w.log.print(f"[{prefix}] finished before at step {resumed['step']}: its final checkpoint stands, nothing to train")
    w.log.close()
    return True


# ---------------------------------------------------------------------------------------------------------------
# budget: the schedule's length and the wall clock


@dataclass
class Plan:
    """The schedule's length: `total` steps (re-planned from measured throughput at the `replans` steps under a
    time budget), `warmup` steps. The lr schedule reads `total` at every step, so a re-plan applies at once."""

    total: int
    warmup: int
    replans: list[int] = field(default_factory=list)


@dataclass
class Budget:
    """The wall clock of a training run: `max_minutes` of training (data preparation excluded), counted from
    `start` (a `time.perf_counter()`, moved back by the seconds a resumed run had already spent), and the cap
    `step_cap` other budgets put on a re-planned schedule."""

    max_minutes: float | None
    step_cap: int = 10**12
    start: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return (self.max_minutes or 0) * 60 - self.seconds()

    def spent(self) -> bool:
        """Agreed by every rank (one clock may cross the budget a step before another's); checked every step."""
        return out_of_time(self.start, self.max_minutes)

    def steps_affordable(self, step_time: float) -> int:
        """Steps that fit in the time left, the same on every rank (collective): each rank's clock started when it
        built its trainer, so their `left()` differ by a few ms, enough for `int()` to round two ranks' plans
        apart; a rank whose plan ended a step early then left the loop while the others all-reduced gradients."""
        return int(all_ranks(self.left(), "min") / step_time)


def replan_steps(total: int, max_minutes: float | None, before: float = 1.0) -> list[int]:
    """The probe misses per-step costs of the real loop (logging, data, allocator) and throughput drifts: with a
    time budget, re-plan from the real steps' throughput at 10%, 40%, 70% and 90% of the plan, so the schedule ends
    at the budget — those before the fraction `before` of it (a WSD schedule's decay start,
    `lm.optim.replan_before`: a re-plan inside the decay moved its start behind the current step, and the lr fell
    by half in one step). A cosine or linear lr moves by a few percent at most."""
    return sorted({max(PROBE_STEPS, int(total * f)) for f in (0.1, 0.4, 0.7, 0.9) if f < before}) if max_minutes else []


# ---------------------------------------------------------------------------------------------------------------
# MFU


@dataclass
class Mfu:
    """Model FLOPs utilisation on GPU: tokens/s x FLOPs per token over the workers' bf16 peak; None on CPU."""

    flops_per_token: float
    peak: float | None  # TFLOPS per worker

    @classmethod
    def of(cls, device: torch.device, flops_per_token: float, configured: float | None) -> Mfu:
        import torch

        peak = configured or (peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
        return cls(flops_per_token, peak)

    def __call__(self, tokens_per_s: float, world: int) -> float | None:
        return tokens_per_s * self.flops_per_token / (world * self.peak * 1e12) if self.peak else None


# ---------------------------------------------------------------------------------------------------------------
# the trainer and its step loop

MicroLoss = Callable[[int], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass
class Trainer:
    """A worker's training state. `lr_factor(step, plan)` scales the optimizer's lr; `resumed` (from
    `resume_state`) puts back the optimizer, scheduler, step, tokens, plan, clock and RNG of a resumed run."""

    worker: Worker
    settings: TrainerSettings
    model: Any
    optimizer: Any
    plan: Plan
    lr_factor: Callable[[int, Plan], float]
    budget: Budget
    grad_accum: int
    max_grad_norm: float | None
    mfu: Mfu | None = None
    resumed: dict[str, Any] | None = None
    prefix: str = "train"  # of the printed lines and the MLflow metrics
    step: int = 0
    tokens: int = 0
    tokens_per_s: float = 0.0  # over the run's training loop (this session's part of it after a resume)
    train_seconds: float = 0.0  # the budget's clock at the loop's end

    def __post_init__(self) -> None:
        import torch

        state = self.resumed
        if state is not None:
            self.step, self.tokens = state["step"], state.get("tokens", 0)
            if "plan" in state:
                self.plan = Plan(**state["plan"])
            self.budget.start = time.perf_counter() - state["train_seconds"]  # the budget counts training time only
            load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: self.lr_factor(s, self.plan))
        if state is not None:
            self.scheduler.load_state_dict(state["scheduler"])
            # Building a LambdaLR sets every group's lr to its step-0 value; put back the resumed step's lr.
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
                group["lr"] = lr
            torch.set_rng_state(state["torch_rng"])
            if "cuda_rng" in state and self.worker.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"], self.worker.device)
            self.worker.log.print(f"[{self.prefix}] resuming at step {self.step}/{self.plan.total} from the latest checkpoint")

    def apply_plan(self) -> None:
        """After the plan was sized outside the loop (by `probe_step_time`): the current step's lr from it."""
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * self.lr_factor(self.step, self.plan)

    def size_plan(self, micro_loss: MicroLoss, warmup: Callable[[int], int], replan_before: float = 1.0) -> None:
        """A fresh run's schedule, for a schedule with an end: under a time budget, the steps it affords at the
        throughput probed here (capped by the other budgets, `budget.step_cap`), re-planned as it trains
        (`replan_steps`); the warmup for that length; step 0's lr. Without it, a run stopped by its time budget
        stopped wherever its schedule was (a cosine over a step cap far beyond the budget: hardly decayed)."""
        if self.budget.max_minutes:
            self.plan.total = max(1, min(self.budget.step_cap, self.budget.steps_affordable(self.probe_step_time(micro_loss))))
        self.plan.warmup = warmup(self.plan.total)
        self.plan.replans = replan_steps(self.plan.total, self.budget.max_minutes, replan_before)
        self.apply_plan()

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.worker.device, self.settings.precision)

    @contextlib.contextmanager
    def _grad_sync(self, last: bool) -> Iterator[None]:
        """DDP all-reduces (FSDP reduce-scatters) gradients on the last micro-batch of an accumulation only."""
        if self.settings.fsdp:
            getattr(self.model, "_orig_mod", self.model).set_requires_gradient_sync(last)
        with contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync():
            yield

    def _backward(self, micro_loss: MicroLoss, index: int, last: bool) -> dict[str, float]:
        """One micro-batch: forward under the precision, backward of its share of the step's loss."""
        with self._grad_sync(last):
            with self.autocast():
                loss, stats = micro_loss(index)
            (loss / self.grad_accum).backward()
        return {"loss": loss.item(), **stats}

    def _optimizer_step(self) -> float:
        import torch

        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP: every rank takes part in making it whole
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def probe_step_time(self, micro_loss: MicroLoss) -> float:
        """Seconds per step (the slowest rank's), timed over whole steps at lr 0 (weights unchanged); the
        optimizer state they built is forgotten. The first step pays one-off costs and is not timed."""
        # Some optimizers count steps in their param groups (pytorch_optimizer's AdEMAMix: `group["step"]`, its bias
        # corrections and alpha/beta3 warm-up): the probe's steps must leave no trace there either.
        groups = [copy.deepcopy({k: v for k, v in group.items() if k != "params"}) for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        start = time.perf_counter()
        for i in range(PROBE_STEPS):
            if i == 1:
                start = time.perf_counter()
            for micro in range(self.grad_accum):
                self._backward(micro_loss, i * self.grad_accum + micro, micro == self.grad_accum - 1)
            self._optimizer_step()
        self.optimizer.state.clear()
        for group, before in zip(self.optimizer.param_groups, groups, strict=True):
            for key in set(group) - set(before) - {"params"}:
                del group[key]
            group.update(before)
        return all_ranks((time.perf_counter() - start) / (PROBE_STEPS - 1), "max")

    def state(self, optimizer_state: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """What a resumed run continues from (the data position is the step)."""
        import torch

        return {"step": self.step, "tokens": self.tokens, "plan": asdict(self.plan), "train_seconds": self.budget.seconds(),
                "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                # dropout on a GPU draws from the CUDA generator, not the CPU one
                **({"cuda_rng": torch.cuda.get_rng_state(self.worker.device)} if self.worker.device.type == "cuda" else {}),
                **extra}

    def checkpoint(self, **extra: Any) -> None:
        """A resumable checkpoint (collective: every rank calls it)."""
        self.worker.log.flush()  # the metrics up to here are in MLflow before a resume could start from here
        weights, optimizer_state = full_state(self.model, self.optimizer)  # gathered under FSDP
        report_checkpoint(self.model, self.worker.rank, {"step": self.step, "kind": "periodic"},
                          self.state(optimizer_state, **extra), weights)

    def run(self, micro_loss: MicroLoss, step_tokens: Callable[[int], int], *, log_every: int,
            describe: Callable[[dict[str, float]], str], checkpoint_every: int | None = None,
            checkpoint_every_minutes: float | None = None, after_step: Callable[[], None] | None = None,
            extra_state: Callable[[], dict[str, Any]] | None = None) -> None:
        """Train until the plan's end or the time budget. `micro_loss(index)` is (loss, stats) of this rank's
        part of micro-batch `index` (run under the precision's autocast); `step_tokens(step)` the tokens all
        ranks read at `step`. Every `log_every` steps the ranks' mean loss and stats go to MLflow as
        `<prefix>/<name>` with lr, grad norm, tokens, tokens/s (and MFU); `describe(means)` is the printed line.
        `after_step()` runs after every step that is not the last (progress reports)."""
        w, plan = self.worker, self.plan
        first_step, first_tokens = self.step, self.tokens
        sums: dict[str, float] = {}
        last_step, last_tokens, grad_norm = self.step, self.tokens, 0.0
        loop_start = last_log = last_print = last_checkpoint = time.perf_counter()
        # Re-plans time the steps after this session's first, whose one-off costs (compile, a GPU's warm-up) the probe
        # absorbs in a fresh run but a resumed run (no probe) paid here: averaged over the few steps before its first
        # re-plan, they shrank the schedule (measured: 306 steps planned instead of 646, the budget a third spent).
        timed_from, timed_start = first_step + 1, loop_start
        while self.step < plan.total:
            self.model.train()
            for micro in range(self.grad_accum):
                stats = self._backward(micro_loss, self.step * self.grad_accum + micro, micro == self.grad_accum - 1)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v / self.grad_accum
            grad_norm = self._optimizer_step()
            self.tokens += step_tokens(self.step)
            self.step += 1
            if self.step == timed_from:
                timed_start = time.perf_counter()
            if plan.replans and self.step >= plan.replans[0] and self.step > timed_from:
                plan.replans.pop(0)
                step_time = all_ranks((time.perf_counter() - timed_start) / (self.step - timed_from), "max")
                plan.total = max(self.step, min(self.budget.step_cap, self.step + self.budget.steps_affordable(step_time)))
            self.scheduler.step()  # after a re-plan, so the next step's lr already follows the new plan
            # The time budget is checked every step, not at log steps only (a large log_every overshot it).
            stop = self.budget.spent()
            if self.step % log_every == 0 or self.step == plan.total or stop:
                now = time.perf_counter()
                # the global batch's means, not rank 0's share
                means = {k: all_ranks(v, "sum") / w.world / (self.step - last_step) for k, v in sums.items()}
                tokens_per_s = (self.tokens - last_tokens) / (now - last_log)
                mfu = self.mfu(tokens_per_s, w.world) if self.mfu else None
                lr = self.scheduler.get_last_lr()[0]  # the next step's, as Hugging Face's Trainer logs it
                w.log.metrics({**{f"{self.prefix}/{k}": v for k, v in means.items()}, f"{self.prefix}/lr": lr,
                               f"{self.prefix}/grad_norm": grad_norm, f"{self.prefix}/tokens": self.tokens,
                               f"{self.prefix}/tokens_per_s": tokens_per_s,
                               **({f"{self.prefix}/mfu": mfu} if mfu is not None else {}),
                               **peak_memory(w.device, self.prefix)}, self.step)
                if now - last_print > PRINT_SECONDS or self.step == plan.total or stop:
                    total = f"/{plan.total}" if plan.total < 10**9 else ""  # a time budget alone has no planned end
                    w.log.print(f"[{self.prefix}] step {self.step}{total}  {describe({**means, 'lr': lr})}  "
                                f"{tokens_per_s:,.0f} tokens/s" + (f"  MFU {mfu:.1%}" if mfu is not None else ""))
                    last_print = now
                sums, last_log, last_step, last_tokens = {}, now, self.step, self.tokens
            if stop:
                break
            if self.step < plan.total:
                if after_step:
                    after_step()
                due = bool(checkpoint_every) and self.step % checkpoint_every == 0
                if checkpoint_every_minutes:  # every rank must agree: a checkpoint is a barrier
                    late = time.perf_counter() - last_checkpoint > checkpoint_every_minutes * 60
                    due |= all_ranks(float(late), "max") > 0
                if due:
                    last_checkpoint = time.perf_counter()
                    self.checkpoint(**(extra_state() if extra_state else {}))
        self.tokens_per_s = (self.tokens - first_tokens) / (time.perf_counter() - loop_start)
        self.train_seconds = self.budget.seconds()  # the budget's clock: without what follows the loop
        w.log.close()

    def finish(self, metrics: dict[str, Any]) -> None:
        """Report the final checkpoint (kind "final"; weights gathered under FSDP — collective)."""
        weights = full_state(self.model, self.optimizer)[0] if self.settings.fsdp else None
        report_checkpoint(self.model, self.worker.rank,
                          {"step": self.step, "kind": "final", **metrics, **applied_settings(self.model)}, weights=weights,
                          finished=True)


# ---------------------------------------------------------------------------------------------------------------
# the driver: the TorchTrainer


def tune_progress(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """What of a training report goes to Tune's scheduler: the validation reports while the run trains, not the
    step-0 checkpoint (no progress yet) nor the final one. At 100% the trial still has to be evaluated, and an
    ASHA rung at 100% (or one first reached there) stopped trials that had trained their whole budget: their eval
    was lost and they were called stopped early. The trial's own last report, after eval, gives Tune its end."""
    if "progress" not in metrics or metrics.get("kind") == "final":
        return None
    return {k: v for k, v in metrics.items() if k != "kind"}


def tune_callbacks() -> list:
    """Inside a sweep trial (a Tune function), forward the progress reports to Tune so its scheduler can
    stop the trial early; elsewhere nothing."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportProgress(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):  # noqa: ANN001
            if (progress := tune_progress(metrics[0])) is not None:
                super().after_report(run_context, [progress], None)

    try:
        return [ReportProgress()]
    except RuntimeError:  # "must be used in a Tune session"
        return []


def poll_reports_fast() -> None:
    """Ray Train's controller polls every TRAIN_POLL_INTERVAL_S in the runs this process starts (a set value wins).

    The controller takes one report off each worker's one-slot queue per poll, every 2 s by default, so a worker
    reporting more often than that waits out the rest (measured: ~1.9 s per validation report on runs of fast steps,
    half the wall time of a 30-step run). Train passes this variable from the process that calls fit() to its
    controller and workers: set there, not at Ray's start, it also reaches runs in a Ray started elsewhere (a
    notebook's, a cluster's Tune trials)."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(TRAIN_POLL_INTERVAL_S))


def trainer_class() -> type:
    """Ray Train's `TorchTrainer`, less the Ray Data set-up when no dataset is given (slam_ray's loops read their
    shards themselves): Train V2 starts a `DatasetManager` actor for every run regardless, a process that imports
    Ray Data (~2 s of CPU, on the path to the first step)."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks import DatasetsCallback

    class TorchTrainerWithoutData(TorchTrainer):
        def _create_default_callbacks(self) -> list:
            callbacks = super()._create_default_callbacks()
            return [c for c in callbacks if self.datasets or not isinstance(c, DatasetsCallback)]

    return TorchTrainerWithoutData


@contextlib.contextmanager
def sigint_handler_kept() -> Iterator[None]:
    """Put back this process's SIGINT handler after a Ray Train run. Train's `fit()` in the main thread installs
    its own (Ctrl+C aborts the run) and leaves it there; the handler holds the run's controller, so that actor (a
    process) stayed alive after the run until the next run replaced the handler (seen: a `TrainController` ALIVE
    after every finished run in a process; a 1-CPU placement group once stayed with it), and a Ctrl+C during a
    later stage (eval after train) went to the finished run's controller instead of the CLI."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # Train installs nothing there
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def finished_run(exp: Experiment, out: Any, stage: str) -> Any:
    """The `Result` of this stage's Ray Train run when its latest checkpoint is the final one (the driver stopped
    after the run's last report, before the stage's manifest said complete), read from the run's folder; else
    None. A rerun then starts no controller and no worker (~20 s of CPU on a small machine) to learn that nothing
    is left to train."""
    from pyarrow.fs import FileType
    from ray.train import Result

    storage = run_storage(exp, out, stage)
    fs = storage.get("storage_filesystem")
    try:
        result = Result.from_path(f"{storage['storage_path'].rstrip('/')}/{storage['name']}", storage_filesystem=fs)
    except RuntimeError:  # no run yet, or none that reported a checkpoint
        return None
    checkpoint = result.checkpoint
    if checkpoint is None:
        return None
    marker = checkpoint.filesystem.get_file_info(f"{checkpoint.path.rstrip('/')}/{FINISHED}")
    return result if marker.type == FileType.File else None


def fit(exp: Experiment, out: Any, stage: str, loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any],
        tracker: Tracker, num_workers: int, callbacks: list | None = None) -> Any:
    """Run `loop` on `num_workers` Ray Train workers (each `train.resources_per_worker`, or `ray.worker_cpus` CPUs
    and a GPU with `train.use_gpu`); checkpoints under the stage's Ray Train run folder, every one kept; the
    `Result`. `loop_config` gets the experiment and the tracker added."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    if (done := finished_run(exp, out, stage)) is not None:
        print(f"[{stage}] finished before at step {done.metrics.get('step')}: its final checkpoint stands, "
              "nothing to train")
        return done
    cfg = exp.train
    resources = cfg.resources_per_worker or {"CPU": exp.ray.worker_cpus, **({"GPU": 1} if cfg.use_gpu else {})}
    poll_reports_fast()
    # Rank 0 writes its metrics through the driver's MLflow writer (a sweep trial's tracker names its sweep's).
    tracker = replace(tracker, writer=tracker.writer or driver_writer())
    trainer = trainer_class()(
        loop,
        train_loop_config={"experiment": exp.model_dump(mode="json"), "tracker": asdict(tracker), **loop_config},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        # Ray Train's own INFO lines (resources requested, results reported) stay in its log files.
        run_config=RunConfig(**run_storage(exp, out, stage), failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=None),
                             logging_config=LoggingConfig(log_level="WARNING"), callbacks=callbacks or []),
    )
    with sigint_handler_kept():
        return trainer.fit()
