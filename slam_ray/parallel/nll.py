"""Sequence NLLs of many token sequences under one checkpoint, on a pool of Ray Data actors (one model each; one
per GPU on a cluster): the parallel side of `slam_ray/lm/scoring.py`, whose `token_nll` each actor runs."""

from __future__ import annotations

import pandas as pd

from slam_ray.core.storage import model_source
from slam_ray.lm.scoring import token_nll
from slam_ray.parallel.actors import limit_threads, map_rows, one_cpu_actor
from slam_ray.speech.units import PAD_ID


class NllActor:
    """Ray Data actor: rows (`checkpoint`, `key`, `tokens`, `first`) -> (`checkpoint`, `key`, `nll`). Rows arrive grouped by
    checkpoint, so the actor keeps one model and loads the next when its rows begin: one pool scores every
    checkpoint (a pool per checkpoint paid the actors' start-up, and on a cluster their scheduling, each time)."""

    def __init__(self, convention: str, batch_size: int, threads: int = 1, pad_id: int = PAD_ID,
                 speech_ids: tuple[int, int, int] | None = None) -> None:
        import torch

        limit_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU only when the actor was given one
        self.convention, self.batch_size, self.pad_id = convention, batch_size, pad_id
        self.speech_ids = tuple(speech_ids) if speech_ids is not None else None
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
            nll = token_nll(self._model(checkpoint),
                            list(zip(part["tokens"], part["first"], part["speech_only"], strict=True)),
                            self.convention, self.batch_size, self.device, self.pad_id, self.speech_ids)
            parts.append(pd.DataFrame({"checkpoint": checkpoint, "key": part["key"].to_numpy(), "nll": nll}))
        return pd.concat(parts, ignore_index=True)


def score_sequences(exp, checkpoints: list[str], sequences: dict[str, tuple], pad_id: int = PAD_ID,
                    speech_ids: tuple[int, int, int] | None = None) -> dict[str, dict[str, float]]:
    """NLL of every `(token ids, first scored index[, speech only])` sequence under every checkpoint (checkpoint -> key
    -> NLL; `speech_ids` as `token_nll` reads them): on one pool of
    `eval.num_actors` Ray Data actors (one model at a time each; a GPU each with `eval.num_gpus_per_actor`), or in
    this process when one CPU actor is asked for (an actor would only add its start-up). Rows go out grouped by
    checkpoint and sorted by length within it, so each batch pads little."""
    checkpoints = list(dict.fromkeys(str(c) for c in checkpoints))
    ordered = sorted(sequences.items(), key=lambda kv: len(kv[1][0]))
    if one_cpu_actor(exp.eval.num_actors, exp.eval.num_gpus_per_actor):
        from transformers import AutoModelForCausalLM

        out = {}
        for checkpoint in checkpoints:
            model = AutoModelForCausalLM.from_pretrained(model_source(checkpoint))
            nll = token_nll(model, [item for _, item in ordered], exp.eval.convention, exp.eval.batch_size,
                            pad_id=pad_id, speech_ids=speech_ids)
            out[checkpoint] = {k: float(v) for (k, _), v in zip(ordered, nll, strict=True)}
        return out
    rows = [{"checkpoint": c, "key": k, "tokens": [int(t) for t in item[0]], "first": item[1],
             "speech_only": bool(item[2]) if len(item) > 2 else False}
            for c in checkpoints for k, item in ordered]
    ctor = {"convention": exp.eval.convention, "batch_size": exp.eval.batch_size,
            "threads": max(1, int(exp.ray.actor_cpus)), "pad_id": pad_id, "speech_ids": speech_ids}
    out: dict[str, dict[str, float]] = {c: {} for c in checkpoints}
    for df in map_rows(exp, rows, NllActor, ctor, exp.eval.num_actors, exp.eval.batch_size,
                       exp.eval.num_gpus_per_actor):
        for checkpoint, key, nll in zip(df["checkpoint"], df["key"], df["nll"].astype(float), strict=True):
            out[checkpoint][key] = nll
    return out
