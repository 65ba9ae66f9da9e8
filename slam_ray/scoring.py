"""Likelihood scoring shared by every evaluation task.

A sequence is `<s> u+2 ... <s>`; its score is the NLL of every token after BOS (EOS included), averaged per
token (`mean`, slamkit's convention) or summed (`sum`, older papers). Lower NLL = the model prefers it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from slam_ray.units import PAD_ID, units_to_tokens


def sequence_nll(model, unit_seqs: Sequence[Sequence[int]], convention: str = "mean", batch_size: int = 32,
                 device: str = "cpu") -> np.ndarray:
    """NLL per sequence under a causal LM; batches sorted by length, right-padded with an attention mask."""
    import torch

    token_seqs = [units_to_tokens(u) for u in unit_seqs]
    order = np.argsort([len(t) for t in token_seqs])
    scores = np.zeros(len(token_seqs), dtype=np.float64)
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        longest = max(len(token_seqs[i]) for i in idx)
        ids = torch.full((len(idx), longest), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(idx), longest), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(token_seqs[i])] = torch.from_numpy(token_seqs[i])
            mask[row, : len(token_seqs[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        target_mask = mask[:, 1:].float()
        nll = -(logp * target_mask).sum(1)
        if convention == "mean":
            nll = nll / target_mask.sum(1)
        scores[idx] = nll.cpu().numpy()
    return scores


def pair_outcomes(positive_nll: np.ndarray, negative_nll: np.ndarray) -> np.ndarray:
    """1 where the positive is more likely, 0 where less, 0.5 for a tie."""
    return np.where(positive_nll < negative_nll, 1.0, np.where(positive_nll > negative_nll, 0.0, 0.5))


def accuracy_with_ci(outcomes: np.ndarray) -> dict[str, float]:
    """Accuracy with a 95% normal-approximation confidence interval (clipped to [0, 1])."""
    n = len(outcomes)
    acc = float(outcomes.mean()) if n else float("nan")
    half = 1.96 * math.sqrt(max(acc * (1 - acc), 0.0) / n) if n else float("nan")
    return {"accuracy": acc, "n": n, "ci95_low": max(0.0, acc - half), "ci95_high": min(1.0, acc + half)}
