"""A fused linear cross-entropy: the output head and the loss computed a chunk of tokens at a time.

With an interleaved model's ~152k-row vocabulary the logits dominate training memory: a 16k-token micro-batch has
16k x 152k logits, held in the autocast dtype, again in fp32 for the loss, and once more as their gradient. Here
the head's matmul moves into the loss: each chunk's logits are made, turned into the chunk's loss *and* its
gradients (softmax minus one-hot, times the head) inside the forward, and dropped, so no more than one chunk's
logits ever exist and nothing is recomputed in backward (the idea of Liger-Kernel's fused linear cross-entropy,
in plain torch ops, so it runs on CPU and any GPU). The result equals the model's own head + `ForCausalLMLoss` to
rounding.

`use_linear_cross_entropy(model, chunk_tokens)` switches a transformers causal LM to it: the head module becomes
a pass-through (its weight, tied or not, stays where it is, so checkpoints and FSDP/DDP are untouched) and the
model's `loss_function` does the head's work. The model's `logits` output is then its last hidden states: only a
training loss reads it.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import torch
from torch import nn


def _chunk_nll(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> tuple:
    """A chunk's fp32 logits (autocast's dtype for the matmul, as the model's own head), their log-partition, the
    targets (ignored ones clamped to 0), each target's weight (0 when ignored: masked, not indexed, so no device
    sync) and the chunk's weighted NLL."""
    weights = (y != -100).float() * scale
    y = y.clamp_min(0)
    logits = (h @ weight.T).float()
    log_z = torch.logsumexp(logits, dim=-1)
    return logits, log_z, y, weights, ((log_z - logits.gather(1, y[:, None]).squeeze(1)) * weights).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """`scale` x the sum over targets of -log softmax(hidden @ weight.T)[target]; gradients made in the forward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                scale: torch.Tensor) -> torch.Tensor:
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start : start + chunk_tokens]
            logits, log_z, y, weights, nll = _chunk_nll(h, weight, targets[start : start + chunk_tokens], scale)
            total += nll
            grad_logits = logits.sub_(log_z[:, None]).exp_()  # the softmax, in the logits' memory
            grad_logits[torch.arange(len(y), device=y.device), y] -= 1.0
            grad_logits *= weights[:, None]
            grad_hidden[start : start + chunk_tokens] = grad_logits @ weight
            grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, (grad_weight * grad_output).to(ctx.weight_dtype), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                         num_items_in_batch: float | torch.Tensor | None = None) -> torch.Tensor:
    """`ForCausalLMLoss(hidden @ weight.T, labels)` without the whole logits: targets are `labels` shifted left
    (-100 ignored); the mean over targets, or the sum over `num_items_in_batch` when that is given. Without
    gradients to make (validation, under no_grad) only the loss is computed, chunk by chunk."""
    targets = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1).to(hidden.device)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    # a tensor, not a Python number: no device sync, and no graph break under torch.compile
    if num_items_in_batch is None:  # the mean over targets (none at all: a loss of 0, not NaN)
        scale = 1.0 / (targets != -100).sum().float().clamp_min(1)
    else:  # a step-wide count, divided by as given (it may be below 1 per micro-batch and rank)
        scale = 1.0 / torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens, scale)
    return sum(_chunk_nll(hidden[start : start + chunk_tokens], weight, targets[start : start + chunk_tokens], scale)[-1]
               for start in range(0, hidden.shape[0], chunk_tokens))


class _PassThroughHead(nn.Linear):
    """The head with its matmul deferred to the loss: the same weight parameter, returning its input; it carries
    the loss's chunk size."""

    chunk_tokens: int

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def _fused_loss(self: Any, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                num_items_in_batch: float | torch.Tensor | None = None, ignore_index: int = -100,
                shift_labels: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
    """The model's `loss_function`, bound to it (a deep copy of the model rebinds it to the copy's head). `logits`
    are the last hidden states here; the head's weight is read at call time: under FSDP the gathered weight of
    the running forward."""
    if ignore_index != -100 or shift_labels is not None:
        raise ValueError("the fused cross-entropy shifts labels itself and ignores -100 only")
    head = self.get_output_embeddings()
    return linear_cross_entropy(logits, head.weight, labels, head.chunk_tokens, num_items_in_batch)


def use_linear_cross_entropy(model: Any, chunk_tokens: int) -> Any:
    """Switch `model` (a transformers causal LM, before DDP/FSDP/compile wrap it) to the fused loss, `chunk_tokens`
    tokens at a time. Its head's weight (tied to the embeddings or not) is the same parameter afterwards."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None:
        raise ValueError(f"{type(model).__name__}: the fused cross-entropy needs a bias-free nn.Linear output head, "
                         f"not {type(head).__name__}{' with a bias' if type(head) is nn.Linear else ''}")
    head.__class__ = _PassThroughHead  # the module keeps its weight, hooks and state-dict key (lm_head.weight)
    head.chunk_tokens = chunk_tokens
    model.loss_function = types.MethodType(_fused_loss, model)
    # FSDP2 warns of a view among a wrapped model's outputs: that view is these hidden states (the `logits` output),
    # which nothing edits in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return model
