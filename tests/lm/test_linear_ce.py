"""The fused linear cross-entropy (`train.loss_chunk_tokens`) against the model's own head and loss."""

from __future__ import annotations

import copy
import socket

import pytest

torch = pytest.importorskip("torch")


def tiny_lm(tied: bool, vocab: int = 300, layers: int = 2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=tied))


def batch(vocab: int = 300):
    """Three rows of 23 tokens: ignored targets (a padded row end, a masked first half) and targets at every id."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (3, 23), generator=generator)
    labels = x.clone()
    labels[0, 15:] = -100
    labels[2, :11] = -100
    return x, labels


def loss_and_grads(model, x, labels, bf16: bool = False, **kwargs):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=x, labels=labels, **kwargs).loss
    loss.backward()
    return loss.item(), {name.removeprefix("module."): p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("num_items", [None, 17.0])
def test_fused_loss_and_gradients_equal_the_models_own_head_and_loss(tied, num_items):
    """fp32 to rounding, in chunks of 7 tokens (not dividing the 69): the mean over targets, or the sum over
    `num_items_in_batch` (document masking's step-wide count); every parameter's gradient, the head's included."""
    from slam_ray.lm.linear_ce import use_linear_cross_entropy

    own = tiny_lm(tied)
    fused = use_linear_cross_entropy(copy.deepcopy(own), 7)
    x, labels = batch()
    kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
    loss, grads = loss_and_grads(own, x, labels, **kwargs)
    loss_fused, grads_fused = loss_and_grads(fused, x, labels, **kwargs)
    assert loss_fused == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_fused.keys() and ("lm_head.weight" in grads or tied)
    for name, g in grads.items():
        torch.testing.assert_close(grads_fused[name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert (fused.lm_head.weight is fused.model.embed_tokens.weight) == tied  # the head's parameter, unchanged
    assert fused.state_dict().keys() == own.state_dict().keys()


def test_fused_loss_under_bf16_autocast_equals_the_models_own_to_bf16_rounding():
    from slam_ray.lm.linear_ce import use_linear_cross_entropy

    own = tiny_lm(True)
    fused = use_linear_cross_entropy(copy.deepcopy(own), 16)
    x, labels = batch()
    loss, grads = loss_and_grads(own, x, labels, bf16=True)
    loss_fused, grads_fused = loss_and_grads(fused, x, labels, bf16=True)
    assert loss_fused == pytest.approx(loss, rel=1e-3)
    for name, g in grads.items():
        torch.testing.assert_close(grads_fused[name], g, rtol=0.02, atol=2e-3 * g.abs().max().item(), msg=name)


def test_a_fused_model_saves_and_trains_like_the_original(tmp_path):
    """The checkpoint of a fused model is the HF model's own (reloads with its head); a few AdamW steps follow
    the same loss curve."""
    from transformers import AutoModelForCausalLM

    from slam_ray.lm.linear_ce import use_linear_cross_entropy

    own = tiny_lm(True)
    fused = use_linear_cross_entropy(copy.deepcopy(own), 5)
    x, labels = batch()
    curves = []
    for model in (own, fused):
        optimizer, curve = torch.optim.AdamW(model.parameters(), lr=1e-2), []
        for _ in range(4):
            loss = model(input_ids=x, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            curve.append(loss.item())
        curves.append(curve)
    assert curves[1] == pytest.approx(curves[0], rel=1e-5) and curves[0][-1] < curves[0][0]
    fused.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        logits = reloaded(input_ids=x).logits
        expected = own(input_ids=x).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_a_head_with_a_bias_is_refused():
    from slam_ray.lm.linear_ce import use_linear_cross_entropy

    model = tiny_lm(False)
    model.lm_head = torch.nn.Linear(32, 300, bias=True)
    with pytest.raises(ValueError, match="bias-free"):
        use_linear_cross_entropy(model, 8)


def test_a_deep_copy_of_a_fused_model_trains_its_own_head():
    """The loss is bound to its model: a copy's loss reads the copy's head weight, and its gradient lands there."""
    from slam_ray.lm.linear_ce import use_linear_cross_entropy

    fused = use_linear_cross_entropy(tiny_lm(True), 7)
    twin = copy.deepcopy(fused)
    with torch.no_grad():
        twin.lm_head.weight.mul_(2.0)
    x, labels = batch()
    twin(input_ids=x, labels=labels).loss.backward()
    assert twin.lm_head.weight.grad is not None and fused.lm_head.weight.grad is None
    assert twin(input_ids=x, labels=labels).loss.item() != pytest.approx(fused(input_ids=x, labels=labels).loss.item())
    with pytest.raises(ValueError, match="shifts labels itself"):
        fused.loss_function(torch.zeros(1, 3, 32), labels[:1, :3], 300, shift_labels=labels[:1, :3])


@pytest.fixture
def one_rank_group():
    """A gloo process group of one rank in this process (what DDP and FSDP2 need to wrap a model)."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_fused_loss_under_ddp_and_fsdp2_equals_the_unwrapped_models_own(wrap, one_rank_group):
    """The trainer's wrappers: under FSDP2 the head's weight is the root unit's, gathered only inside the forward
    the loss runs in; under DDP the gradient reaches the reducer through the head's parameter."""
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    from slam_ray.lm.linear_ce import use_linear_cross_entropy
    from slam_ray.parallel.trainer import shard_model

    own = tiny_lm(True)
    fused = use_linear_cross_entropy(copy.deepcopy(own), 6)
    fused = shard_model(fused) if wrap == "fsdp" else DistributedDataParallel(fused)
    x, labels = batch()
    loss, grads = loss_and_grads(own, x, labels)
    loss_fused, grads_fused = loss_and_grads(fused, x, labels)
    assert loss_fused == pytest.approx(loss, rel=1e-6)
    for name, g in grads.items():
        got = grads_fused[name]
        got = got.full_tensor() if isinstance(got, DTensor) else got
        torch.testing.assert_close(got, g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_fused_loss_compiles_into_one_graph_with_the_model():
    """torch.compile (inductor on CPU, ~10 s) with fullgraph=True: a graph break (a device sync such as `.item()`)
    would fail it; the compiled loss and gradients equal the model's own. One layer and 3 chunks (two full, one
    partial) of the 69 targets: each more is traced, lowered and compiled again for no new case (cold: 66 -> 46 s)."""
    from slam_ray.lm.linear_ce import use_linear_cross_entropy

    own = tiny_lm(True, layers=1)
    fused = torch.compile(use_linear_cross_entropy(copy.deepcopy(own), 30), fullgraph=True)
    x, labels = batch()
    loss, grads = loss_and_grads(own, x, labels)
    loss_fused, grads_fused = loss_and_grads(fused, x, labels)
    assert loss_fused == pytest.approx(loss, rel=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(grads_fused["_orig_mod." + name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_without_gradients_only_the_loss_is_computed():
    """Validation runs under no_grad: the same loss as the model's own, and no gradient work — the forward makes
    no (V x H) weight-gradient buffer (counted by the fp32 allocations of that shape it makes)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from slam_ray.lm.linear_ce import use_linear_cross_entropy

    own = tiny_lm(True)
    fused = use_linear_cross_entropy(copy.deepcopy(own), 7)
    x, labels = batch()
    head_shape = tuple(own.lm_head.weight.shape)

    class CountHeadSized(TorchDispatchMode):
        made = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.startswith("zeros") and isinstance(out, torch.Tensor) and tuple(out.shape) == head_shape:
                CountHeadSized.made += 1
            return out

    with torch.no_grad():
        expected = own(input_ids=x, labels=labels).loss.item()
        with CountHeadSized():
            got = fused(input_ids=x, labels=labels).loss.item()
    assert got == pytest.approx(expected, rel=1e-6)
    assert CountHeadSized.made == 0
    with CountHeadSized():  # with gradients it makes one: the check can see it
        fused(input_ids=x, labels=labels).loss.backward()
    assert CountHeadSized.made >= 1
