"""Likelihood scoring shared by every evaluation task.

A sequence is `<s> u+2 ... <s>`; its score is the NLL of every token after BOS (EOS included), averaged per
token (`mean`, slamkit's convention) or summed (`sum`, older papers). Lower NLL = the model prefers it. In a
merged vocabulary (interleaving) a sequence is any token ids with the index of its first scored token: a
cross-modal comparison scores the continuation only, given its context (`token_nll`); a speech-only sequence may
be scored over the speech ids alone (`eval.speech_logits_only`: text logits masked, the rest renormalised).
A comparison (a pair, or a group of one positive and several negatives) scores 1 when the positive is strictly
the most likely, 0 when a negative is more likely, and 1/k when it ties k-1 negatives (0.5 for a pair).
`slam_ray.parallel.nll.score_sequences` spreads the NLLs over a pool of Ray Data actors (no Ray here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from slam_ray.speech.units import PAD_ID, units_to_tokens


def sequence_nll(model, unit_seqs: Sequence[Sequence[int]], convention: str = "mean", batch_size: int = 32,
                 device: str = "cpu") -> np.ndarray:
    """NLL per unit sequence (as `<s> u+2 ... <s>`, every token after BOS scored) under a causal LM."""
    return token_nll(model, [(units_to_tokens(u), 1) for u in unit_seqs], convention, batch_size, device)


def token_nll(model, sequences: Sequence[tuple[Sequence[int], int] | tuple[Sequence[int], int, bool]],
              convention: str = "mean", batch_size: int = 32, device: str = "cpu", pad_id: int = PAD_ID,
              speech_ids: tuple[int, int, int] | None = None) -> np.ndarray:
    """NLL per `(token ids, first scored index >= 1[, speech only])` under a causal LM: the tokens from that index
    on are the targets; batches sorted by length, right-padded with an attention mask. A sequence marked speech
    only is scored over `speech_ids` = (first unit id, number of units, EOS id) alone: every other logit masked
    before the softmax."""
    import torch

    token_seqs = [np.asarray(s[0], dtype=np.int64) for s in sequences]
    firsts = [int(s[1]) for s in sequences]
    speech_only = [bool(s[2]) if len(s) > 2 else False for s in sequences]
    if any(speech_only) and speech_ids is None:
        raise ValueError("sequences marked speech only need speech_ids (first unit id, number of units, EOS id)")
    if any(not 1 <= f < len(t) for f, t in zip(firsts, token_seqs, strict=True)):
        raise ValueError("each sequence needs a first scored index in [1, its length)")
    order = np.argsort([len(t) for t in token_seqs])
    scores = np.zeros(len(token_seqs), dtype=np.float64)
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        longest = max(len(token_seqs[i]) for i in idx)
        ids = torch.full((len(idx), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), longest), dtype=torch.long)
        scored = torch.zeros((len(idx), longest), dtype=torch.float32)
        for row, i in enumerate(idx):
            ids[row, : len(token_seqs[i])] = torch.from_numpy(token_seqs[i])
            mask[row, : len(token_seqs[i])] = 1
            scored[row, firsts[i] : len(token_seqs[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        marks = [speech_only[i] for i in idx]
        masking = any(marks)
        if masking:
            marked = torch.tensor(marks, device=logits.device)
            offset, n_units, eos = speech_ids
            blocked = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
            blocked[offset : offset + n_units] = False
            blocked[eos] = False
            logits.masked_fill_(marked[:, None, None] & blocked, float("-inf"))  # in place: no copy of the rows
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        target_mask = scored[:, 1:].to(logp.device)
        if masking and torch.isinf(logp[target_mask > 0]).any():
            raise ValueError("a sequence marked speech only scores a token outside the units and EOS (a marker or "
                             "text): its first scored index must come after them")
        nll = -logp.masked_fill(target_mask == 0, 0.0).sum(1)  # not times the mask: a masked logit's -inf x 0 is NaN
        if convention == "mean":
            nll = nll / target_mask.sum(1)
        scores[idx] = nll.cpu().numpy()
    return scores


def _check_scores(nlls: np.ndarray) -> None:
    """A NaN NLL compares as neither more nor less likely: it scored as a tie (pairs) or a win (groups)."""
    if (bad := int(np.isnan(nlls).sum())):
        raise ValueError(f"{bad} of {nlls.size} NLLs are NaN (a model whose weights diverged, or a broken checkpoint): "
                         "no comparison with them can be scored")


def pair_outcomes(positive_nll: np.ndarray, negative_nll: np.ndarray) -> np.ndarray:
    """1 where the positive is more likely, 0 where less, 0.5 for a tie."""
    _check_scores(np.concatenate([np.ravel(positive_nll), np.ravel(negative_nll)]).astype(float))
    return np.where(positive_nll < negative_nll, 1.0, np.where(positive_nll > negative_nll, 0.0, 0.5))


def group_outcome(positive_nll: float, negative_nlls: Sequence[float]) -> float:
    """1 if the positive is strictly the most likely, 0 if any negative is more likely, 1/k on a k-way tie."""
    _check_scores(np.array([positive_nll, *negative_nlls], dtype=float))
    best = min(negative_nlls)
    if positive_nll < best:
        return 1.0
    if positive_nll > best:
        return 0.0
    return 1.0 / (1 + sum(n == positive_nll for n in negative_nlls))


def accuracy_with_ci(outcomes: np.ndarray) -> dict[str, float]:
    """Mean outcome with a 95% normal-approximation confidence interval (clipped to [0, 1]). For 0/1
    outcomes the variance is p(1-p); for outcomes averaged over voices, their own variance."""
    outcomes = np.asarray(outcomes, dtype=np.float64)
    n = len(outcomes)
    acc = float(outcomes.mean()) if n else float("nan")
    half = 1.96 * math.sqrt(float(outcomes.var()) / n) if n else float("nan")
    return {"accuracy": acc, "n": n, "ci95_low": max(0.0, acc - half), "ci95_high": min(1.0, acc + half)}


def aggregate(scored: pd.DataFrame, aggregate_by: str | None, breakdown: Sequence[str]) -> dict[str, Any]:
    """Task accuracy from per-comparison `outcome`s: averaged per `aggregate_by` first (ZeroSpeech: an item over
    its voices), then over items; plus the same for every value of each breakdown column."""
    def stats(df: pd.DataFrame) -> dict[str, float]:
        per_item = df.groupby(aggregate_by, sort=False)["outcome"].mean() if aggregate_by else df["outcome"]
        return {**accuracy_with_ci(per_item.to_numpy()), "comparisons": len(df)}

    result: dict[str, Any] = stats(scored)
    for column in breakdown:
        if column in scored:
            result[f"by_{column}"] = {str(value): stats(part) for value, part in scored.groupby(column, sort=True)}
    return result
