"""Sequence NLLs of many unit sequences under one checkpoint, on a pool of Ray Data actors (one model each; one
per GPU on a cluster): the parallel side of `slam_ray/lm/scoring.py`, whose `sequence_nll` each actor runs."""

from __future__ import annotations

import pandas as pd

from slam_ray.core.storage import model_source
from slam_ray.lm.scoring import sequence_nll
from slam_ray.parallel.actors import limit_threads, map_rows


class NllActor:
    """Ray Data actor: rows (`key`, `units`) -> (`key`, `nll`) under one checkpoint."""

    def __init__(self, checkpoint: str, convention: str, batch_size: int, threads: int = 1) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        limit_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU only when the actor was given one
        self.model = AutoModelForCausalLM.from_pretrained(model_source(checkpoint)).to(self.device)
        self.convention, self.batch_size = convention, batch_size

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        units = [list(u) for u in batch["units"]]
        nll = sequence_nll(self.model, units, self.convention, self.batch_size, self.device)
        return pd.DataFrame({"key": batch["key"].to_numpy(), "nll": nll})


def score_sequences(exp, checkpoint: str, sequences: dict[str, list[int]]) -> dict[str, float]:
    """NLL of every unit sequence under `checkpoint`: on `eval.num_actors` Ray Data actors (one model each; a GPU
    each with `eval.num_gpus_per_actor`), or in this process when one CPU actor is asked for (an actor would only
    add its start-up). Rows go out sorted by length, so each batch pads little."""
    rows = [{"key": k, "units": u} for k, u in sorted(sequences.items(), key=lambda kv: len(kv[1]))]
    if exp.eval.num_actors == 1 and not exp.eval.num_gpus_per_actor:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_source(checkpoint))
        nll = sequence_nll(model, [r["units"] for r in rows], exp.eval.convention, exp.eval.batch_size)
        return {r["key"]: float(v) for r, v in zip(rows, nll, strict=True)}
    ctor = {"checkpoint": str(checkpoint), "convention": exp.eval.convention, "batch_size": exp.eval.batch_size,
            "threads": max(1, int(exp.ray.actor_cpus))}
    out: dict[str, float] = {}
    for df in map_rows(exp, rows, NllActor, ctor, exp.eval.num_actors, exp.eval.batch_size,
                       exp.eval.num_gpus_per_actor):
        out.update(zip(df["key"], df["nll"].astype(float), strict=True))
    return out
