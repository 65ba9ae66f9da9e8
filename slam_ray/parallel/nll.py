"""Sequence NLLs of many unit sequences under one checkpoint, on a pool of Ray Data actors (one model each; one
per GPU on a cluster): the parallel side of `slam_ray/lm/scoring.py`, whose `sequence_nll` each actor runs."""

from __future__ import annotations

import pandas as pd

from slam_ray.core.storage import model_source
from slam_ray.lm.scoring import sequence_nll
from slam_ray.parallel.actors import limit_threads, map_rows


class NllActor:
    """Ray Data actor: rows (`checkpoint`, `key`, `units`) -> (`checkpoint`, `key`, `nll`). Rows arrive grouped by
    checkpoint, so the actor keeps one model and loads the next when its rows begin: one pool scores every
    checkpoint (a pool per checkpoint paid the actors' start-up, and on a cluster their scheduling, each time)."""

    def __init__(self, convention: str, batch_size: int, threads: int = 1) -> None:
        import torch

        limit_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU only when the actor was given one
        self.convention, self.batch_size = convention, batch_size
        self.checkpoint: str | None = None
        self.model = None

    def _model(self, checkpoint: str):  # noqa: ANN202 (a transformers model)
        if checkpoint != self.checkpoint:
            from transformers import AutoModelForCausalLM

            self.model = None  # free the previous model before loading the next
            self.model = AutoModelForCausalLM.from_pretrained(model_source(checkpoint)).to(self.device)
            self.checkpoint = checkpoint
        return self.model

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        parts = []
        for checkpoint, part in batch.groupby("checkpoint", sort=False):
            nll = sequence_nll(self._model(checkpoint), [list(u) for u in part["units"]], self.convention,
                               self.batch_size, self.device)
            parts.append(pd.DataFrame({"checkpoint": checkpoint, "key": part["key"].to_numpy(), "nll": nll}))
        return pd.concat(parts, ignore_index=True)


def score_sequences(exp, checkpoints: list[str], sequences: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """NLL of every unit sequence under every checkpoint (checkpoint -> key -> NLL): on one pool of
    `eval.num_actors` Ray Data actors (one model at a time each; a GPU each with `eval.num_gpus_per_actor`), or in
    this process when one CPU actor is asked for (an actor would only add its start-up). Rows go out grouped by
    checkpoint and sorted by length within it, so each batch pads little."""
    checkpoints = list(dict.fromkeys(str(c) for c in checkpoints))
    ordered = sorted(sequences.items(), key=lambda kv: len(kv[1]))
    if exp.eval.num_actors == 1 and not exp.eval.num_gpus_per_actor:
        from transformers import AutoModelForCausalLM

        out = {}
        for checkpoint in checkpoints:
            model = AutoModelForCausalLM.from_pretrained(model_source(checkpoint))
            nll = sequence_nll(model, [u for _, u in ordered], exp.eval.convention, exp.eval.batch_size)
            out[checkpoint] = {k: float(v) for (k, _), v in zip(ordered, nll, strict=True)}
        return out
    rows = [{"checkpoint": c, "key": k, "units": u} for c in checkpoints for k, u in ordered]
    ctor = {"convention": exp.eval.convention, "batch_size": exp.eval.batch_size,
            "threads": max(1, int(exp.ray.actor_cpus))}
    out: dict[str, dict[str, float]] = {c: {} for c in checkpoints}
    for df in map_rows(exp, rows, NllActor, ctor, exp.eval.num_actors, exp.eval.batch_size,
                       exp.eval.num_gpus_per_actor):
        for checkpoint, key, nll in zip(df["checkpoint"], df["key"], df["nll"].astype(float), strict=True):
            out[checkpoint][key] = nll
    return out
