"""`slam-ray dpo`: preference optimisation of a pre-trained speech LM with Ray Train (`TorchTrainer`).

Read top to bottom: the driver gathers preference triples of unit ids — the built-in grammar's (prompt =
the first words of a sentence, chosen = its grammatical rest, rejected = a corrupted rest), spoken with the
synth voices and tokenised with the extract tokenizer, or slamkit's preference JSONL — and writes them to
`triples.json`. With `reference: precomputed`, a Ray Data pass (one actor per worker) computes the frozen
reference's log-probs of every triple once (`reference_logps.parquet`), so training workers hold no reference
model; otherwise each worker keeps a frozen copy beside the policy. Each worker loads the `train` stage's
checkpoint as the policy and trains with the DPO (or IPO) loss (`slam_ray/lm/dpo_loss.py`): AdamW, inverse-sqrt
or cosine, grad-norm clipping, a step / token / epoch / time budget, resumable checkpoints, and `train`'s
precision, compile, gradient checkpointing and DDP/FSDP unless `dpo.*` sets its own (the trainer scaffold shared
with `train`, `slam_ray/parallel/trainer.py`). Rank 0 logs loss, rewards, reward accuracy and margin to MLflow. At the
end, the held-out triples measure what DPO changed: the policy's chosen-vs-rejected log-likelihood margin
before and after, and the reward accuracy. Outputs: `checkpoint` (after DPO), `checkpoint_before_dpo` and
`checkpoint_init` (the pre-trained and the untrained model, which `eval` scores beside it), `triples.json`.
The spoken, tokenised triples are cached under `WORKDIR/dpo_triples/` for every DPO run on them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from slam_ray.config import Experiment, ScheduleConfig
from slam_ray.core.runner import StageResult, cached_json, init_ray, run_stage
from slam_ray.core.stage_io import StageDir, Timer, stage_payload, upstream_dir
from slam_ray.core.storage import localize, model_source
from slam_ray.core.tracking import Tracker
from slam_ray.errors import SlamError
from slam_ray.lm.optim import lr_factor, replan_before
from slam_ray.lm.preferences import grammar_preference_triples, read_slamkit_preferences
from slam_ray.parallel.train_utils import check_global_batch, epoch_order, flops_per_token
from slam_ray.parallel.trainer import (
    Budget,
    Mfu,
    Plan,
    Trainer,
    TrainerSettings,
    applied_counts,
    autocast,
    finished_before,
    fit,
    plain_model,
    prepare_frozen,
    prepare_model,
    resume_state,
    setup_worker,
)
from slam_ray.speech.units import UNIT_OFFSET, units_to_tokens

if TYPE_CHECKING:
    import torch

TRIPLES = "triples.json"
TOO_FEW_TRIPLES = "lower dpo.batch_size, dpo.grad_accum or dpo.num_workers, or give more triples (dpo.n_pairs, dpo.inputs)"
REFERENCE_LOGPS = "reference_logps.parquet"


# ---------------------------------------------------------------------------------------------------------------
# preference triples (driver)


def _spoken_grammar_triples(exp: Experiment, out: StageDir, timer: Timer) -> tuple[list[dict], list[dict], list[dict]]:
    from slam_ray.parallel.encode import encode_spoken

    cfg, held_out = exp.dpo, exp.synth.corpus.held_out_percent
    splits = {"train": grammar_preference_triples(cfg.n_pairs, cfg.seed, held_out, "train"),
              "val": grammar_preference_triples(cfg.val_pairs, cfg.seed, held_out, "held_out")}
    rng = random.Random(cfg.seed)
    low, high = exp.synth.speed
    items = []
    for split, triples in splits.items():
        for t in triples:
            # one voice and speed per triple, so chosen and rejected differ only in their words
            voice, speed = rng.choice(exp.synth.voices), round(rng.uniform(low, high), 2)
            for part in ("prompt", "chosen", "rejected"):
                uid = f"{split}-{t.id}-{part}"
                items.append({"id": uid, "text": getattr(t, part), "voice": voice, "speed": speed, "speaker": voice,
                              "path": out.location("audio", split, f"{uid}.flac")})
    init_ray(exp)
    with timer.phase("speak_and_tokenise"):  # one pass, no audio files (hf: spoken into files first)
        encoded, bad = encode_spoken(exp, items, upstream_dir(exp, "extract").location("tokenizer"))
    units = {r["id"]: units_to_tokens(r["units"], add_bos=False, add_eos=False).tolist() for r in encoded}
    result: dict[str, list[dict]] = {}
    for split, triples in splits.items():
        result[split] = [{"id": t.id, "task": t.task, **{p: units[f"{split}-{t.id}-{p}"] for p in ("prompt", "chosen", "rejected")}}
                         for t in triples if all(f"{split}-{t.id}-{p}" in units for p in ("prompt", "chosen", "rejected"))]
    errors = [{k: e.get(k) for k in ("id", "path", "error")} for e in bad]
    return result["train"], result["val"], errors


def preference_triples(exp: Experiment, out: StageDir, timer: Timer) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, held-out, errors): triples as {id, prompt, chosen, rejected} of unit vocabulary ids."""
    train: list[dict] = []
    val: list[dict] = []
    errors: list[dict] = []
    for entry in exp.dpo.inputs:
        if entry == "@grammar":
            t, v, e = _spoken_grammar_triples(exp, out, timer)
            train, val, errors = train + t, val + v, errors + e
            continue
        if not Path(entry).is_file():
            raise SlamError(f"dpo.inputs: {entry!r} is neither '@grammar' nor a slamkit preference JSONL file")
        for i, triple in enumerate(read_slamkit_preferences(entry)):
            highest = max(max(part, default=0) for part in (triple.prompt, triple.chosen, triple.rejected))
            if highest >= exp.vocab_size:
                raise SlamError(f"{entry}: triple {i + 1} holds unit {highest - UNIT_OFFSET}, but this experiment's "
                                f"tokenizer has {exp.extract.tokenizer.n_units} units: set extract.tokenizer.n_units to "
                                "the k-means size these units came from (500 for slamkit's mHuBERT tokeniser)")
            (val if i % 10 == 9 else train).append(asdict(triple))  # every 10th triple is held out
    if not train or not val:
        raise SlamError(f"DPO needs training and held-out triples; got {len(train)} and {len(val)} "
                        f"(see {out.errors_path} for inputs that failed)")
    return train, val, errors


def triples_payload(exp: Experiment) -> dict:
    """What the spoken, tokenised triples depend on: the inputs (a JSONL by its content too), pairs, seed, voices and
    tokenizer. What DPO starts from and how it trains (schedule, precision, strategy...) do not change them: a
    sweep over those, or a DPO from another checkpoint, speaks and tokenises them once."""
    payload = stage_payload(exp, "dpo")
    for trained in ("train", "dpo_trainer", "inverse_sqrt_version"):
        payload.pop(trained, None)
    payload["dpo"] = {k: payload["dpo"][k] for k in ("inputs", "n_pairs", "val_pairs", "seed")}
    # a JSONL input is keyed by its content too: an edited file makes new triples
    payload["files"] = {entry: hashlib.sha256(Path(entry).read_bytes()).hexdigest()
                        for entry in exp.dpo.inputs if entry != "@grammar" and Path(entry).is_file()}
    return payload


def cached_triples(exp: Experiment, timer: Timer) -> tuple[str, dict]:
    """The triples file and its content, made once per `triples_payload` under WORKDIR/dpo_triples/<key>/ and
    shared by every DPO run on them (each trial of a sweep over pre-training or DPO settings)."""
    payload = triples_payload(exp)

    def make(cache: StageDir) -> dict:
        train, val, errors = preference_triples(exp, cache, timer)
        return {"train": train, "val": val, "errors": errors}

    return cached_json(exp, "dpo_triples", payload, TRIPLES, make)


# ---------------------------------------------------------------------------------------------------------------
# precomputed reference log-probs (a Ray Data pass on the driver's cluster)


class ReferenceLogps:
    """Ray Data actor: the frozen start checkpoint's (chosen, rejected) log-probs of a batch of triples."""

    def __init__(self, checkpoint: str, use_gpu: bool, precision: str = "fp32", attn_implementation: str = "sdpa") -> None:
        import torch

        from slam_ray.lm.model import load_checkpoint
        from slam_ray.parallel.actors import limit_threads

        limit_threads()
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_checkpoint(checkpoint, attn_implementation).to(self.device).eval()  # as the policy
        self.context_len = self.model.config.max_position_embeddings
        self.precision = precision  # the training workers' (their forwards of the policy are alike)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from slam_ray.lm.dpo_loss import build_preference_batch, reference_logps

        rows = build_preference_batch(list(batch["prompt"]), list(batch["chosen"]), list(batch["rejected"]),
                                      self.context_len)
        with autocast(self.device, self.precision):
            [(chosen, rejected)] = reference_logps(self.model, [rows], self.device)
        return pd.DataFrame({"key": batch["key"], "ref_chosen": chosen.numpy(), "ref_rejected": rejected.numpy()})


def precompute_reference(exp: Experiment, triples: dict, checkpoint: str, out: StageDir) -> str:
    """The location of REFERENCE_LOGPS in the stage folder (Parquet: key = "split/index", ref_chosen, ref_rejected) for every training and held-out triple,
    computed once by a pool of actors (one per DPO worker; by the driver itself for one worker without a GPU) so no
    training worker holds a reference model.
    Kept in the stage folder: a re-run after an interruption reads it instead of recomputing."""
    from slam_ray.parallel.actors import map_rows, one_cpu_actor

    rows = [{"key": f"{split}/{i}", "prompt": t["prompt"], "chosen": t["chosen"], "rejected": t["rejected"]}
            for split in ("train", "val") for i, t in enumerate(triples[split])]
    path = out.local(REFERENCE_LOGPS)
    if path.is_file() and len(pd.read_parquet(path, columns=["key"])) == len(rows):
        return out.location(REFERENCE_LOGPS)
    rows.sort(key=lambda r: len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"])))  # less padding per batch
    actors, gpus = exp.dpo.num_workers or exp.train.num_workers, 1.0 if exp.train.use_gpu else 0.0
    in_driver = one_cpu_actor(actors, gpus)
    print(f"[dpo] reference log-probs of {len(rows)} triples ({'in the driver' if in_driver else f'{actors} actor(s)'})")
    parts = list(map_rows(exp, rows, ReferenceLogps, {"checkpoint": checkpoint, "use_gpu": exp.train.use_gpu,
                          "precision": exp.trainer_settings("dpo")["precision"],
                          "attn_implementation": exp.train.model.attn_implementation},
                          actors, exp.dpo.batch_size * 4, num_gpus=gpus, in_driver=in_driver))
    table = pd.concat(parts, ignore_index=True)
    if sorted(table["key"]) != sorted(r["key"] for r in rows):
        raise SlamError(f"the reference pass returned {len(table)} rows for {len(rows)} triples")
    tmp = path.with_suffix(".tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(path)
    out.publish(REFERENCE_LOGPS)
    return out.location(REFERENCE_LOGPS)


def _load_reference(path: str, sizes: dict[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{split: (chosen, rejected)} reference log-probs in triple order, from the Parquet of the reference pass."""
    import torch

    table = pd.read_parquet(localize(path)).set_index("key")
    out = {}
    for split, n in sizes.items():
        rows = table.loc[[f"{split}/{i}" for i in range(n)]]
        out[split] = (torch.tensor(rows["ref_chosen"].to_numpy(), dtype=torch.float32),
                      torch.tensor(rows["ref_rejected"].to_numpy(), dtype=torch.float32))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the training loop (each Ray Train worker)


def dpo_loop_per_worker(config: dict[str, Any]) -> None:
    import torch

    from slam_ray.lm.dpo_loss import (
        build_preference_batch,
        dpo_loss,
        preference_logps,
        preference_tokens,
        reference_logps,
    )
    from slam_ray.lm.model import load_checkpoint

    exp = Experiment.model_validate(config["experiment"])
    cfg = exp.dpo
    w = setup_worker(exp, config, cfg.seed)
    settings = TrainerSettings.of(exp, "dpo")
    triples = json.loads(localize(config["triples_path"]).read_text())
    train, val = triples["train"], triples["val"]

    init_checkpoint = model_source(config["init_checkpoint"])
    policy = load_checkpoint(init_checkpoint, exp.train.model.attn_implementation)
    context_len = policy.config.max_position_embeddings
    n_params = sum(p.numel() for p in policy.parameters())
    hf_config = policy.config
    resumed = resume_state(policy)
    if finished_before(w, resumed, "dpo"):
        return

    def batch_of(rows: list[dict]):
        return build_preference_batch([r["prompt"] for r in rows], [r["chosen"] for r in rows],
                                      [r["rejected"] for r in rows], context_len).to(w.device)

    def all_logps(model, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) log-probs of every row, without gradients (each rank computes all of them)."""
        batches = (batch_of(rows[i : i + cfg.batch_size]) for i in range(0, len(rows), cfg.batch_size))
        with autocast(w.device, settings.precision):
            parts = reference_logps(model, batches)
        return torch.cat([c for c, _ in parts]).to(w.device), torch.cat([r for _, r in parts]).to(w.device)

    reference = precomputed = None
    if config.get("reference_logps"):
        # the Ray Data pass computed them before training: no reference model in this worker's memory
        loaded = _load_reference(config["reference_logps"], {"train": len(train), "val": len(val)})
        precomputed = tuple(t.to(w.device) for t in loaded["train"])
        ref_val = tuple(t.to(w.device) for t in loaded["val"])
    else:
        reference = prepare_frozen(load_checkpoint(init_checkpoint, exp.train.model.attn_implementation), settings, w.device)
        ref_val = all_logps(reference, val)

    model = prepare_model(policy, settings, w.device)
    per_micro = cfg.batch_size * w.world
    global_batch = per_micro * cfg.grad_accum
    check_global_batch(len(train), "training triples", global_batch, TOO_FEW_TRIPLES)  # the driver checked it too
    steps_per_epoch = max(1, len(train) // global_batch)
    triple_tokens = np.array([preference_tokens(t["prompt"], t["chosen"], t["rejected"], context_len) for t in train])

    @functools.lru_cache(maxsize=2)
    def order_of(epoch: int) -> np.ndarray:
        return epoch_order(cfg.seed, epoch, len(train))

    def micro_indices(index: int) -> np.ndarray:
        """All ranks' triples of micro-batch `index` (epoch-wise seeded shuffles, like pre-training)."""
        epoch, i = divmod(index, steps_per_epoch * cfg.grad_accum)
        return order_of(epoch)[i * per_micro : (i + 1) * per_micro]

    def step_tokens(s: int) -> int:
        """Tokens all ranks read at step `s`: known in advance, so every rank plans the same token budget."""
        return int(sum(triple_tokens[micro_indices(s * cfg.grad_accum + m)].sum() for m in range(cfg.grad_accum)))

    caps = [cfg.max_steps or math.inf, math.ceil(cfg.epochs * steps_per_epoch) if cfg.epochs else math.inf]
    if cfg.max_tokens:
        steps, seen = 0, 0
        while seen < cfg.max_tokens and steps < min(caps):
            seen += step_tokens(steps)
            steps += 1
        caps.append(steps)
    total = int(min(caps)) if min(caps) < math.inf else 10**9  # a time budget alone: inverse-sqrt needs no end
    schedule = ScheduleConfig(name=cfg.schedule, warmup_steps=cfg.warmup_steps)
    # MFU counts the policy's training FLOPs at the triples' mean row length (each triple is two rows)
    mean_row = float(triple_tokens.mean()) / 2
    t = Trainer(w, settings, model, torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0),
                Plan(total, cfg.warmup_steps), lambda s, plan: lr_factor(s, plan.total, plan.warmup, schedule, cfg.lr),
                Budget(cfg.max_minutes, total), cfg.grad_accum, cfg.max_grad_norm,
                mfu=Mfu.of(w.device, flops_per_token(n_params, hf_config.num_hidden_layers, hf_config.hidden_size,
                                                     int(mean_row)), exp.train.peak_tflops),
                resumed=resumed, prefix="dpo")
    w.log.print(f"[dpo] {len(train)} training / {len(val)} held-out triples, {w.world} worker(s), global batch "
                f"{global_batch}, {'up to ' + str(total) + ' steps' if total < 10**9 else 'time budget'}, reference "
                f"{'precomputed' if precomputed is not None else 'model'}, {settings.precision}, {settings.strategy}")

    def micro_loss(index: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The DPO loss of this rank's part of micro-batch `index`."""
        picked = micro_indices(index)[w.rank * cfg.batch_size : (w.rank + 1) * cfg.batch_size]
        batch = batch_of([train[j] for j in picked])
        pol_c, pol_r = preference_logps(t.model, batch)
        if precomputed is not None:
            ref_c, ref_r = precomputed[0][picked], precomputed[1][picked]
        else:
            with torch.no_grad():
                ref_c, ref_r = preference_logps(reference, batch)
        lengths = batch.continuation_lengths()
        return dpo_loss(pol_c, pol_r, ref_c, ref_r, cfg.beta, cfg.loss, cfg.nll_weight,
                        chosen_lengths=lengths[0], rejected_lengths=lengths[1])

    if resumed is None and cfg.schedule != "inverse_sqrt":  # a schedule with an end: what the time budget affords
        t.size_plan(micro_loss, lambda _: cfg.warmup_steps, replan_before(schedule))
        if t.plan.total < total:
            w.log.print(f"[dpo] {t.plan.total} steps planned: what the {cfg.max_minutes:g}-minute budget affords")
    t.run(micro_loss, step_tokens, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
          describe=lambda m: f"loss {m['loss']:.4f}  reward accuracy {m['rewards/accuracy']:.3f}  "
                             f"margin {m['rewards/margin']:.3f}")
    # What DPO changed on triples it never trained on.
    pol_val = all_logps(plain_model(t.model, settings), val)
    margin_before = (ref_val[0] - ref_val[1]).mean().item()
    margin_after = (pol_val[0] - pol_val[1]).mean().item()
    rewards = (pol_val[0] - ref_val[0]) - (pol_val[1] - ref_val[1])
    # Compute: the policy's training (6 N D) plus the frozen reference's forward passes (2 N D) on the same tokens.
    metrics = {"tokens": t.tokens, "train_seconds": t.train_seconds, "params": n_params,
               "dpo/flops_6nd": 6.0 * n_params * t.tokens, "dpo/flops": 8.0 * n_params * t.tokens,
               "val/logp_margin_before": margin_before, "val/logp_margin_after": margin_after,
               "val/reward_accuracy": (rewards > 0).float().mean().item(),
               "val/reward_margin": cfg.beta * rewards.mean().item(),
               "val/chosen_preferred_before": (ref_val[0] > ref_val[1]).float().mean().item(),
               "val/chosen_preferred_after": (pol_val[0] > pol_val[1]).float().mean().item()}
    w.log.metrics({k: v for k, v in metrics.items() if k.startswith(("val/", "dpo/"))}, t.step)
    w.log.print(f"[dpo] held-out: log-likelihood margin {margin_before:.3f} -> {margin_after:.3f}, chosen preferred "
                f"{metrics['val/chosen_preferred_before']:.3f} -> {metrics['val/chosen_preferred_after']:.3f}, "
                f"reward accuracy {metrics['val/reward_accuracy']:.3f}")
    t.finish(metrics)


# ---------------------------------------------------------------------------------------------------------------
# the stage (driver)


def _dpo(exp: Experiment, out: StageDir, tracker: Tracker, timer: Timer) -> StageResult:
    from transformers import AutoConfig, AutoModelForCausalLM

    if exp.dpo.init:  # any compatible HF checkpoint (an id or a path)
        start, untrained = exp.dpo.init, None
        vocab = AutoConfig.from_pretrained(model_source(start)).vocab_size
        if vocab != exp.vocab_size:
            raise SlamError(f"dpo.init {start!r} has a vocabulary of {vocab} ids; this experiment's units need "
                            f"{exp.vocab_size} (extract.tokenizer.n_units + 2). Give a checkpoint trained on these units")
    else:
        pretrained = upstream_dir(exp, "train")
        start, untrained = pretrained.location("checkpoint"), pretrained.location("checkpoint_init")
    with timer.phase("triples"):
        triples_path, triples = cached_triples(exp, timer)
    # Fail here, before Ray starts workers: with fewer triples than one global batch a rank would get none.
    world = exp.dpo.num_workers or exp.train.num_workers
    check_global_batch(len(triples["train"]), "training triples", exp.dpo.batch_size * world * exp.dpo.grad_accum,
                       TOO_FEW_TRIPLES)
    init_ray(exp)
    reference = None
    if exp.dpo.reference == "precomputed":
        with timer.phase("reference"):
            reference = precompute_reference(exp, triples, start, out)
    with timer.phase("fit"):
        result = fit(exp, out, "dpo", dpo_loop_per_worker,
                     {"triples_path": triples_path, "init_checkpoint": start, "reference_logps": reference},
                     tracker, world)
    final_checkpoint, final = next((c, m) for c, m in reversed(result.best_checkpoints) if m.get("kind") == "final")
    for folder in ("checkpoint", "checkpoint_before_dpo", "checkpoint_init"):
        shutil.rmtree(out.path / folder, ignore_errors=True)
    final_checkpoint.to_directory(str(out.path / "checkpoint"))
    AutoModelForCausalLM.from_pretrained(model_source(start)).save_pretrained(out.path / "checkpoint_before_dpo")
    if untrained is not None:  # the untrained baseline, when pre-training was this experiment's
        shutil.copytree(localize(untrained), out.path / "checkpoint_init")
    shutil.copy(localize(triples_path), out.path / TRIPLES)  # the stage output is self-contained
    return StageResult(
        counts={"steps": int(final["step"]), "tokens": int(final["tokens"]), "params": int(final["params"]),
                "flops_6nd": float(final["dpo/flops_6nd"]), "flops": float(final["dpo/flops"]),
                "train_triples": len(triples["train"]), "val_triples": len(triples["val"]),
                **applied_counts(final)},
        outputs={"checkpoint": "checkpoint", "checkpoint_before_dpo": "checkpoint_before_dpo",
                 **({"checkpoint_init": "checkpoint_init"} if untrained else {}), "triples": TRIPLES, "started_from": start},
        errors=triples["errors"],
        metrics={k: float(v) for k, v in final.items() if k.startswith(("val/", "dpo/"))} | {"dpo/seconds": final["train_seconds"]},
    )


def dpo(exp: Experiment) -> StageDir:
    if exp.pack.interleave is not None:
        raise SlamError("dpo cannot take an interleaved model yet (DPO of interleaved models is outside the interleaving work; docs/interleaving.md): "
                        "drop 'dpo' from `stages`, or pack.interleave")
    return run_stage(exp, "dpo", _dpo)
