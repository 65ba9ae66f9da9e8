"""The core of DPO: preference batches, sequence log-probs, DPO / IPO losses, precomputed reference log-probs.

Plain torch + any HF causal LM, so a Ray Train loop calls it directly (trl keeps its loss inside `DPOTrainer`,
which brings its own training loop). Conventions are trl's, which slamkit trains DPO with: a row is
`<s> prompt continuation <s>`, a sequence's log-prob is the sum over its continuation tokens (EOS included),
and a batch holds the B chosen rows first, then the B rejected rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from slam_ray.speech.units import BOS_ID, EOS_ID, PAD_ID, UNIT_OFFSET

if TYPE_CHECKING:
    import numpy as np
    import torch

    TokenIds = Sequence[int] | np.ndarray

LOSS_TYPES = ("sigmoid", "ipo")


class PreferenceBatch(NamedTuple):
    """`input_ids` (2B x T, long): B prompt+chosen rows, then B prompt+rejected rows, right-padded (PAD_ID).
    `loss_mask` (2B x T, bool): the continuation tokens (chosen / rejected, EOS included) that are scored."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor

    def continuation_lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens counted per row, as (chosen, rejected): what IPO and the NLL term normalise by."""
        chosen, rejected = self.loss_mask.sum(1).chunk(2)
        return chosen, rejected

    def to(self, device) -> PreferenceBatch:
        return PreferenceBatch(self.input_ids.to(device), self.loss_mask.to(device))


def _ids(item: TokenIds, what: str) -> list[int]:
    ids = [int(t) for t in item]
    # ids below UNIT_OFFSET are PAD/BOS/EOS: a raw (unshifted) unit sequence or one that already has BOS/EOS
    # would silently corrupt the attention mask and the masked log-probs
    if any(t < UNIT_OFFSET for t in ids):
        raise ValueError(f"{what} holds ids < {UNIT_OFFSET}: pass unit vocabulary ids (unit + {UNIT_OFFSET}, "
                         "see slam_ray.speech.units.units_to_tokens) without BOS/EOS; they are added here")
    return ids


def _fit(prompt: list[int], continuations: list[list[int]],
         context_len: int) -> tuple[list[int], list[list[int]]]:
    """`<s> prompt` and the EOS-terminated continuations cut to fit `context_len`: the prompt loses its oldest
    tokens first (BOS stays), then the continuations lose their ends. Both rows of a pair keep the same
    prompt, so chosen and rejected are still compared in the same context."""
    longest = max(len(c) for c in continuations)
    keep = min(len(prompt), max(0, context_len - 1 - longest))
    head = [BOS_ID] + prompt[len(prompt) - keep :]
    room = context_len - len(head)
    return head, [c[:room] for c in continuations]


def preference_tokens(prompt: TokenIds, chosen: TokenIds, rejected: TokenIds, context_len: int) -> int:
    """Tokens the model reads for one triple (its chosen row plus its rejected row, after truncation): what a
    DPO token budget counts."""
    head, (cont_c, cont_r) = _fit(list(prompt), [list(chosen) + [EOS_ID], list(rejected) + [EOS_ID]], context_len)
    return 2 * len(head) + len(cont_c) + len(cont_r)


def build_preference_batch(prompts: Sequence[TokenIds], chosens: Sequence[TokenIds],
                           rejecteds: Sequence[TokenIds], context_len: int) -> PreferenceBatch:
    """Model inputs for B preference triples of unit vocabulary ids (no BOS/EOS): rows `<s> prompt chosen <s>`
    then `<s> prompt rejected <s>`, each at most `context_len` tokens, padded to the longest row."""
    import torch

    if not (len(prompts) == len(chosens) == len(rejecteds)):
        raise ValueError(f"{len(prompts)} prompts, {len(chosens)} chosen, {len(rejecteds)} rejected: "
                         "need one each")
    if not prompts:
        raise ValueError("an empty preference batch")
    if context_len < 2:
        raise ValueError(f"context_len {context_len} < 2 leaves no room for a continuation after BOS")
    chosen_rows: list[tuple[list[int], list[int]]] = []
    rejected_rows: list[tuple[list[int], list[int]]] = []
    for i, (p, c, r) in enumerate(zip(prompts, chosens, rejecteds, strict=True)):
        continuations = [_ids(c, f"chosen {i}") + [EOS_ID], _ids(r, f"rejected {i}") + [EOS_ID]]
        head, (cont_c, cont_r) = _fit(_ids(p, f"prompt {i}"), continuations, context_len)
        chosen_rows.append((head, cont_c))
        rejected_rows.append((head, cont_r))
    rows = chosen_rows + rejected_rows
    width = max(len(h) + len(c) for h, c in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, (head, cont) in enumerate(rows):
        input_ids[row, : len(head) + len(cont)] = torch.tensor(head + cont, dtype=torch.long)
        loss_mask[row, len(head) : len(head) + len(cont)] = True
    return PreferenceBatch(input_ids, loss_mask)


def sequence_logps(model, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probs of the masked tokens, one value per row (float32); gradients flow when enabled."""
    import torch.nn.functional as F

    # every real token is >= BOS_ID, so the padding is exactly the PAD_ID positions
    attention_mask = (input_ids != PAD_ID).long()
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    # token t is predicted by the logits at t - 1; float32 keeps bf16 rounding out of sums over many tokens
    token_logps = -F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    return (token_logps * loss_mask[:, 1:]).sum(1)


def preference_logps(model, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed continuation log-probs of a batch, B values each."""
    chosen, rejected = sequence_logps(model, batch.input_ids, batch.loss_mask).chunk(2)
    return chosen, rejected


def reference_logps(model, batches: Iterable[PreferenceBatch],
                    device=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Reference (chosen, rejected) log-probs of every batch, computed once without gradients in eval mode and
    returned on the CPU, so the training loop can free the reference model. Pass the batches in the order (and
    with the same rows) the loop will use; the model's train/eval mode is restored afterwards."""
    import torch

    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for batch in batches:
                if device is not None:
                    batch = batch.to(device)
                chosen, rejected = preference_logps(model, batch)
                out.append((chosen.cpu(), rejected.cpu()))
    finally:
        model.train(was_training)
    return out


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             loss_type: str = "sigmoid", nll_weight: float = 0.0, chosen_nll: torch.Tensor | None = None,
             chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean DPO (`sigmoid`) or IPO (`ipo`) loss over B pairs of summed log-probs, plus `nll_weight` times the
    chosen continuations' mean per-token NLL (RPO). Returns (loss, stats); rewards = beta * (policy - ref).

    IPO needs `chosen_lengths` / `rejected_lengths` (tokens per continuation, from
    `PreferenceBatch.continuation_lengths`): like trl it compares per-token log-ratios. The NLL term uses
    `chosen_nll` if given, else derives it from `policy_chosen_logps` and `chosen_lengths`."""
    import torch.nn.functional as F

    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose from {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    # the reference is a constant of the objective: no gradient may reach it, whoever computed it
    chosen_logratios = policy_chosen_logps - ref_chosen_logps.detach()
    rejected_logratios = policy_rejected_logps - ref_rejected_logps.detach()
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    else:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type 'ipo' needs chosen_lengths and rejected_lengths "
                             "(tokens per continuation)")
        # IPO's squared loss would otherwise grow with continuation length; trl (with the IPO authors)
        # averages per token, which is what the paper's 1 / (2 * beta) target refers to
        chosen_per_token = chosen_logratios / chosen_lengths.clamp(min=1)
        rejected_per_token = rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (chosen_per_token - rejected_per_token - 1 / (2 * beta)) ** 2
    preference_loss = losses.mean()
    loss = preference_loss
    stats: dict[str, float] = {}
    if nll_weight:
        if chosen_nll is None:
            if chosen_lengths is None:
                raise ValueError("nll_weight > 0 needs chosen_nll or chosen_lengths")
            # token-level mean over the whole batch (trl's `sft` term), not a mean of per-row means
            chosen_nll = -policy_chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)
        loss = loss + nll_weight * chosen_nll
        stats["loss/nll"] = float(chosen_nll.detach())
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    stats.update({
        "loss/preference": float(preference_loss.detach()),
        "rewards/chosen": float(chosen_rewards.mean()),
        "rewards/rejected": float(rejected_rewards.mean()),
        "rewards/accuracy": float((chosen_rewards > rejected_rewards).float().mean()),
        "rewards/margin": float((chosen_rewards - rejected_rewards).mean()),
        "logps/chosen": float(policy_chosen_logps.detach().mean()),
        "logps/rejected": float(policy_rejected_logps.detach().mean()),
    })
    return loss, stats
