"""`slam-ray train`: pre-train a speech LM on packed unit windows with Ray Train (`TorchTrainer`).

Read top to bottom: the driver runs a `TorchTrainer`; each worker builds the model, probes its own
throughput when the budget is wall-clock time (so a cosine schedule really ends at the budget), trains with
AdamW + warmup/cosine, logs to MLflow from rank 0, and reports two HF checkpoints: `init` (step 0, the
untrained baseline evaluation compares against) and `final`. The driver copies both into the stage folder.
What is not this stage's data or loss (precision, compile, DDP/FSDP, budgets, resume, logging, MFU) is the
trainer scaffold's, shared with `dpo` (`slam_ray/parallel/trainer.py`).
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from typing import Any

import numpy as np

from slam_ray.config import Experiment, TrainConfig
from slam_ray.core.runner import StageResult, init_ray, run_stage
from slam_ray.core.stage_io import StageDir, Timer, upstream_dir
from slam_ray.core.storage import in_filesystem, localize, storage_root
from slam_ray.core.tracking import Tracker
from slam_ray.lm.optim import build_optimizer, lr_factor, replan_before, warmup_steps
from slam_ray.lm.packed import PackedWindows
from slam_ray.parallel.train_utils import all_ranks, check_global_batch, epoch_order, flops_per_token
from slam_ray.parallel.trainer import (
    Budget,
    Mfu,
    Plan,
    Trainer,
    TrainerSettings,
    applied_counts,
    finished_before,
    fit,
    plain_model,
    prepare_model,
    report_checkpoint,
    resume_state,
    setup_worker,
    tune_callbacks,
)
from slam_ray.speech.units import PAD_ID

INTERMEDIATE_VAL_WINDOWS = 256  # progress reports validate on this many windows; the final pass on all
TOO_FEW_WINDOWS = "lower train.batch_size, train.num_workers or pack.context_len, or give more data"


class WindowBatches:
    """Seeded epoch-wise shuffles of the packed windows; rank r takes its slice of every global batch."""

    def __init__(self, windows: np.ndarray | PackedWindows, batch_size: int, rank: int, world: int, seed: int) -> None:
        self.windows, self.batch_size, self.rank, self.world, self.seed = windows, batch_size, rank, world, seed
        self.global_batch = batch_size * world
        check_global_batch(len(windows), "training windows", self.global_batch, TOO_FEW_WINDOWS)
        self.per_epoch = len(windows) // self.global_batch
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def global_rows(self, index: int) -> np.ndarray:
        """The windows of global batch `index` (all ranks, rank 0's slice first)."""
        epoch, i = divmod(index, self.per_epoch)
        if epoch != self._epoch:  # one permutation per epoch, not per step (O(windows) each)
            self._epoch, self._order = epoch, epoch_order(self.seed, epoch, len(self.windows))
        return self._order[i * self.global_batch : (i + 1) * self.global_batch]

    def rows(self, index: int) -> np.ndarray:
        """This rank's windows of global batch `index`."""
        return self.global_rows(index)[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def batch(self, index: int) -> np.ndarray:
        return self.windows[self.rows(index)]


def window_inputs(windows: PackedWindows | np.ndarray, rows: np.ndarray, document_mask: bool) -> dict[str, Any]:
    """Model inputs (CPU tensors) of windows `rows`: padding is never a target; under document masking the position
    ids restart at every document and a document's first token is not a target (no target crosses a boundary)."""
    import torch

    tokens = windows[rows]
    x = torch.from_numpy(tokens.astype(np.int64))
    labels = x.masked_fill(x == getattr(windows, "pad_id", PAD_ID), -100)
    if not document_mask:
        return {"input_ids": x, "labels": labels}
    positions = torch.from_numpy(windows.positions(rows, tokens))  # the rows read once
    # use_cache=False: transformers reads restarting position ids as packed documents only when there is no KV
    # cache, and it makes one whenever config.use_cache holds (the documents would then attend to each other).
    return {"input_ids": x, "labels": labels.masked_fill(positions == 0, -100), "position_ids": positions,
            "use_cache": False}


MANY_COMPILED_CHUNKS = 16


def compiled_chunks_warning(cfg: TrainConfig, context_len: int) -> str | None:
    """What to change when `train.compile` would trace many fused-loss chunks: torch.compile unrolls the chunk loop,
    one copy of the head's matmul and loss per chunk, so compilation grows with their number (measured: 74 chunks per
    micro-batch made a tiny 20-step run take 10 min on 2 CPU cores, 3 chunks 1 min). None when it is fine."""
    if not (cfg.compile and cfg.loss_chunk_tokens):
        return None
    tokens = cfg.batch_size * context_len  # a micro-batch's
    chunks = -(-tokens // cfg.loss_chunk_tokens)
    if chunks <= MANY_COMPILED_CHUNKS:
        return None
    return (f"[train] warning: train.compile traces each of the {chunks} loss chunks of a micro-batch (batch_size "
            f"{cfg.batch_size} x context {context_len} / train.loss_chunk_tokens {cfg.loss_chunk_tokens}) into its "
            f"graph, so compiling takes long; train.loss_chunk_tokens >= {-(-tokens // MANY_COMPILED_CHUNKS)} keeps "
            f"it to {MANY_COMPILED_CHUNKS} chunks")


def budget_steps(cfg: TrainConfig, tokens_per_step: int, n_params: int) -> int:
    """The steps the step, token and FLOP budgets allow (the smallest; 10**12 when none is set). A FLOP budget is
    6 N D: the run stops at the first step whose tokens reach max_flops / (6 N)."""
    caps = [cfg.max_steps or 10**12]
    if cfg.max_tokens:
        caps.append(-(-cfg.max_tokens // tokens_per_step))
    if cfg.max_flops:
        caps.append(max(1, math.ceil(cfg.max_flops / (6 * n_params * tokens_per_step))))
    return min(caps)


def spread_sample(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Row indices: all `n`, or a seeded sample of `limit` of them in file order (so reads stay sequential)."""
    if limit is None or n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def flat_documents(batch: dict[str, Any]) -> dict[str, Any]:
    """A micro-batch of windows as one row `[1, B * T]` with its restarting position ids, for FlashAttention-2:
    transformers takes its varlen (document-masked) path only for a batch of one row, so `[B, T]` would attend
    across documents. Each window starts a document (position 0, no target), so no target crosses windows."""
    return {k: v.reshape(1, -1) if hasattr(v, "reshape") else v for k, v in batch.items()}


def targets_in(windows: PackedWindows | np.ndarray, micro_batches: list[np.ndarray], document_mask: bool) -> int:
    """Targets (labels left after the causal shift, not -100) in these micro-batches of windows: a step's count,
    from every rank's rows, known to each rank from the seeded batch order without a collective."""
    rows = np.concatenate(micro_batches)
    return int((window_inputs(windows, rows, document_mask)["labels"][:, 1:] != -100).sum())


def weighted_nll(batches: list[tuple[float, int]]) -> tuple[float, int]:
    """(NLL summed over targets, targets) of batches given as (mean loss, targets): a batch without a target (a
    last window of one token and padding) has a NaN mean and adds nothing, where `nan * 0` made the whole loss NaN."""
    nll, targets = 0.0, 0
    for loss, count in batches:
        if count:
            nll, targets = nll + loss * count, targets + count
    return nll, targets


def document_lengths(positions: np.ndarray) -> list[np.ndarray]:
    """Per window, the lengths of its documents (position ids restart at 0 at each document)."""
    return [np.diff(np.append(np.flatnonzero(row == 0), len(row))) for row in positions]


def effective_context(positions: np.ndarray) -> float:
    """The context length whose full-window attention costs what these windows' documents cost: sum of squared
    document lengths over the window length, averaged over windows (the MFU's attention term under masking)."""
    return float(np.mean([np.sum(lengths.astype(np.float64) ** 2) / positions.shape[1]
                          for lengths in document_lengths(positions)]))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch

    from slam_ray.lm.linear_ce import use_linear_cross_entropy
    from slam_ray.lm.model import build_model, count_embedding_parameters, count_parameters
    from slam_ray.lm.vocabulary import vocabulary_of_pack

    exp = Experiment.model_validate(config["experiment"])
    cfg = exp.train
    w = setup_worker(exp, config, cfg.seed)
    settings = TrainerSettings.of(exp, "train")
    # The pack output's shards, memory-mapped (fetched to this node first when the workdir is a bucket): a batch
    # reads its rows, and the workers of a node share the page cache; a worker's own memory does not grow with
    # the corpus.
    packed = localize(config["pack_root"])
    train_windows, val_windows = PackedWindows(packed, "train"), PackedWindows(packed, "val")
    context_len = train_windows.context_len
    vocabulary = vocabulary_of_pack(train_windows.vocabulary, exp.extract.tokenizer.n_units)
    model = build_model(cfg.model, vocabulary.size, max_positions=context_len, vocabulary=vocabulary)
    n_params = count_parameters(model)
    n_non_embedding = n_params - count_embedding_parameters(model)
    resumed = resume_state(model)
    if finished_before(w, resumed, "train"):
        return
    if resumed is None:
        report_checkpoint(model, w.rank, {"step": 0, "kind": "init", "params": n_params})
    hf_config = model.config
    if cfg.loss_chunk_tokens:
        use_linear_cross_entropy(model, cfg.loss_chunk_tokens)  # before DDP/FSDP/compile wrap it
        if w.rank == 0 and (warning := compiled_chunks_warning(cfg, context_len)):
            print(warning)
    model = prepare_model(model, settings, w.device)
    data = WindowBatches(train_windows, cfg.batch_size, w.rank, w.world, cfg.seed)
    tokens_per_step = cfg.batch_size * context_len * cfg.grad_accum * w.world
    # Under document masking, attention costs each document's own length: the MFU counts that (measured on the
    # 256 windows sampled over every shard), not the window's.
    attention_context = (effective_context(train_windows.positions(spread_sample(len(train_windows), 256, cfg.seed)))
                         if cfg.document_mask else context_len)
    # Step, token and FLOP budgets cap the step count; a time budget sizes it from measured throughput below.
    step_cap = budget_steps(cfg, tokens_per_step, n_params)
    step_flops = flops_per_token(n_params, hf_config.num_hidden_layers, hf_config.hidden_size, attention_context)
    t = Trainer(w, settings, model, build_optimizer(cfg.optimizer, model.parameters()),
                Plan(step_cap, warmup_steps(cfg.schedule, step_cap)),
                lambda s, plan: lr_factor(s, plan.total, plan.warmup, cfg.schedule, cfg.optimizer.lr),
                Budget(cfg.max_minutes, step_cap), cfg.grad_accum, cfg.max_grad_norm,
                mfu=Mfu.of(w.device, step_flops, cfg.peak_tflops), resumed=resumed, prefix="train")

    def compute(tokens: int) -> dict[str, float]:
        """The compute of `tokens` trained tokens: 6 N D (what scaling laws count) and with attention (what MFU
        counts; under document masking over each document's own length)."""
        return {"train/flops_6nd": 6.0 * n_params * tokens, "train/flops": step_flops * tokens}

    def loss_on(windows: PackedWindows, rows: np.ndarray, net: torch.nn.Module, **kwargs: Any) -> torch.Tensor:
        batch = window_inputs(windows, rows, cfg.document_mask)
        if cfg.document_mask and cfg.model.attn_implementation == "flash_attention_2":
            batch = flat_documents(batch)
        return net(**{k: v.to(w.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}, **kwargs).loss

    @functools.lru_cache(maxsize=1)  # the step's micro-batches all ask for the same count
    def targets_in_step(step: int) -> int:
        return targets_in(train_windows, [data.global_rows(step * cfg.grad_accum + m) for m in range(cfg.grad_accum)],
                          cfg.document_mask)

    def micro_loss(index: int) -> tuple[torch.Tensor, dict[str, float]]:
        if not cfg.document_mask:
            return loss_on(train_windows, data.rows(index), t.model), {}
        # The step's loss is the mean over all its targets: each micro-batch's NLL sum over the step's count, scaled
        # by what the trainer divides by (micro-batches) and DDP averages over (ranks).
        scale = targets_in_step(index // cfg.grad_accum) / (cfg.grad_accum * w.world)
        return loss_on(train_windows, data.rows(index), t.model, num_items_in_batch=scale), {}

    def validate(limit: int | None = None) -> float:
        """Mean loss over the targets of the validation windows (each batch weighted by its targets: a mean of
        batch means would weigh a short last batch's tokens more) (a fixed seeded sample of `limit` of them, spread over every
        shard — the first ones would be one group's few input shards), all ranks sharing the work. Under DDP
        it runs on the unwrapped module: ranks may see unequal numbers of batches, and a DDP forward would wait
        for the other ranks (a deadlock). A sharded model's every forward is collective, so under FSDP every
        rank runs the same number of batches (a rank out of windows repeats one and does not count it)."""
        plain = plain_model(t.model, settings).eval()
        chosen = spread_sample(len(val_windows), limit, cfg.seed)
        n = len(chosen)
        stride = cfg.batch_size * w.world
        end = -(-n // stride) * stride if settings.fsdp else n
        batches = []  # (mean loss, targets) of this rank's batches; a repeated one counts no target
        with torch.no_grad(), t.autocast():
            for i in range(w.rank * cfg.batch_size, end, stride):
                rows = chosen[i : i + cfg.batch_size] if i < n else chosen[:1]
                batches.append((loss_on(val_windows, rows, plain).item(),
                                targets_in(val_windows, [rows], cfg.document_mask) if i < n else 0))
        nll, targets = weighted_nll(batches)
        plain.train()
        targets = all_ranks(targets, "sum")
        return all_ranks(nll, "sum") / targets if targets else float("nan")  # no split: not a perfect 0

    reports_done = resumed.get("reports_done", 0) if resumed else 0
    if resumed is None:
        t.size_plan(micro_loss, lambda total: warmup_steps(cfg.schedule, total), replan_before(cfg.schedule))
        # on the log thread: a worker's first MLflow call takes seconds, inside the time budget
        w.log.params({"model.params": n_params, "model.params_non_embedding": n_non_embedding,
                      "schedule.planned_steps": t.plan.total,
                      "schedule.warmup_steps": t.plan.warmup})
        w.log.print(f"[train] {n_params / 1e6:.2f}M params, {w.world} worker(s), {t.plan.total} steps planned")

    def progress_report() -> None:
        """The validation loss at each 1/val_reports of the budget, which a sweep's early-stopping scheduler
        (ASHA, median) compares across trials at equal shares of their budgets."""
        nonlocal reports_done
        if not cfg.val_reports or t.step * cfg.val_reports < (reports_done + 1) * t.plan.total:
            return
        reports_done = t.step * cfg.val_reports // t.plan.total
        progress = {"step": t.step, "progress": round(100 * t.step / t.plan.total, 2),
                    "val/loss": validate(INTERMEDIATE_VAL_WINDOWS), "train/tokens": t.step * tokens_per_step,
                    **compute(t.step * tokens_per_step)}
        w.log.metrics({k: progress[k] for k in ("val/loss", "train/flops_6nd", "train/flops")}, t.step)
        ray.train.report(progress)

    t.run(micro_loss, lambda step: tokens_per_step, log_every=cfg.log_every,
          describe=lambda m: f"loss {m['loss']:.3f}  lr {m['lr']:.2e}", checkpoint_every=cfg.checkpoint_every,
          checkpoint_every_minutes=cfg.checkpoint_every_minutes, after_step=progress_report,
          extra_state=lambda: {"reports_done": reports_done})
    w.log.params({"schedule.total_steps": t.plan.total})  # idempotent when a resumed run logs it again
    val_loss = validate()
    metrics = {"progress": 100.0, "val/loss": val_loss, "tokens": t.step * tokens_per_step,
               "train_seconds": t.train_seconds, "tokens_per_s": t.tokens_per_s, "params": n_params,
               "params_non_embedding": n_non_embedding, "total_steps": t.plan.total,
               **compute(t.step * tokens_per_step)}
    if (mfu := t.mfu(t.tokens_per_s, w.world)) is not None:
        metrics["mfu"] = mfu
    w.log.metrics({"val/loss": val_loss, "train/tokens_per_s_mean": metrics["tokens_per_s"],
                   **compute(t.step * tokens_per_step), **({"train/mfu_mean": mfu} if mfu is not None else {})}, t.step)
    t.finish(metrics)


def _train(exp: Experiment, out: StageDir, tracker: Tracker, timer: Timer) -> StageResult:
    packed = upstream_dir(exp, "pack")
    # Fail here, before Ray starts workers, when the data cannot fill one global batch (a worker would fail alike).
    n_windows = ((packed.read_manifest() or {}).get("counts") or {}).get("train_windows")
    if n_windows is not None:
        check_global_batch(int(n_windows), "training windows", exp.train.batch_size * exp.train.num_workers, TOO_FEW_WINDOWS)
    init_ray(exp)
    with timer.phase("fit"):
        result = fit(exp, out, "train", train_loop_per_worker,
                     {"pack_root": packed.root},
                     tracker, exp.train.num_workers, callbacks=tune_callbacks())
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
    # FLOPs stay out of `metrics`: the workers logged them per report and at the last step, and the stage's metrics
    # are logged at step 0, which would add a false first point to the FLOPs-by-step history.
    return StageResult(
        counts={"steps": int(final["step"]), "tokens": int(final["tokens"]), "params": int(final["params"]),
                "params_non_embedding": int(final["params_non_embedding"]),
                "flops_6nd": float(final["train/flops_6nd"]), "flops": float(final["train/flops"]),
                **applied_counts(final)},  # train.compile / gradient_checkpointing as applied, not as asked
        outputs={"checkpoint": "checkpoint", "checkpoint_init": "checkpoint_init"},
        metrics={"val/loss_final": float(final["val/loss"]), "train/seconds": float(final["train_seconds"]),
                 "train/tokens_per_s_mean": float(final["tokens_per_s"]),
                 **({"train/mfu_mean": float(final["mfu"])} if "mfu" in final else {})},
    )


def train(exp: Experiment) -> StageDir:
    return run_stage(exp, "train", _train)

