from __future__ import annotations

import numpy as np
import pytest

from slam_ray.config import ScheduleConfig
from slam_ray.lm.optim import lr_factor
from slam_ray.stages.train import WindowBatches


def test_cosine_with_warmup_ends_at_min_lr():
    sched = ScheduleConfig(name="cosine", warmup_ratio=0.1, min_lr=1e-4)
    factors = [lr_factor(s, 100, 10, sched, 1e-3) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert lr_factor(100, 100, 10, sched, 1e-3) == pytest.approx(0.1)  # min_lr / lr


def test_inverse_sqrt_and_constant():
    inv = ScheduleConfig(name="inverse_sqrt", warmup_ratio=0.0)
    assert lr_factor(3, 100, 4, inv, 1.0) == pytest.approx(1.0)
    assert lr_factor(15, 100, 4, inv, 1.0) == pytest.approx(0.5)
    assert lr_factor(50, 100, 0, ScheduleConfig(name="constant"), 1.0) == 1.0


@pytest.mark.parametrize("warmup", [0, 4, 100])
def test_inverse_sqrt_is_hugging_faces_one_step_on(warmup):
    """slamkit's DPO (warmup 0, 813 steps) runs HF's inverse_sqrt through TRL: without a warmup its timescale is
    10,000 steps, so the lr stays near its peak (1/sqrt(step) would end at 3.5% of it). Our schedules start the
    warmup at lr/warmup, not 0: step s trains with HF's factor at s + 1."""
    from transformers.optimization import _get_inverse_sqrt_schedule_lr_lambda

    inv = ScheduleConfig(name="inverse_sqrt", warmup_steps=warmup)
    hf = [_get_inverse_sqrt_schedule_lr_lambda(s + 1, num_warmup_steps=warmup, timescale=warmup or 10_000)
          for s in range(900)]
    np.testing.assert_allclose([lr_factor(s, 900, warmup, inv, 1.0) for s in range(900)], hf, rtol=1e-12)
    if warmup == 0:
        assert lr_factor(812, 813, 0, inv, 1.0) > 0.96


def test_ranks_see_disjoint_slices_of_each_global_batch():
    windows = np.arange(40 * 4).reshape(40, 4)
    r0 = WindowBatches(windows, 5, rank=0, world=2, seed=0)
    r1 = WindowBatches(windows, 5, rank=1, world=2, seed=0)
    assert r0.per_epoch == 4
    seen = []
    for i in range(r0.per_epoch):
        a, b = r0.batch(i)[:, 0], r1.batch(i)[:, 0]
        assert not set(a) & set(b)
        seen += list(a) + list(b)
    assert len(set(seen)) == 40  # one epoch covers every window once
    assert not np.array_equal(r0.batch(0), r0.batch(4))  # next epoch is reshuffled


def test_neighbouring_seeds_do_not_share_an_epochs_order():
    """Epochs were shuffled with seed + epoch: seed 0's second epoch was seed 1's first, so a seed sweep's runs
    trained on the same orders one epoch apart. The first epoch keeps its order (runs of one epoch are unchanged)."""
    windows = np.arange(40 * 4).reshape(40, 4)
    seed0, seed1 = (WindowBatches(windows, 5, rank=0, world=1, seed=s) for s in (0, 1))
    first_epoch = [seed1.global_rows(i) for i in range(seed1.per_epoch)]
    second_epoch = [seed0.global_rows(seed0.per_epoch + i) for i in range(seed0.per_epoch)]
    assert not np.array_equal(np.concatenate(first_epoch), np.concatenate(second_epoch))
    assert np.array_equal(seed0.global_rows(0), np.random.default_rng(0).permutation(40)[:5])


def test_memory_mapped_windows_give_the_same_batches_in_any_order_of_access(tmp_path):
    """The worker maps the pack shards instead of loading them: batches equal the in-memory array's, the epoch's
    shuffle is the seeded permutation of that epoch (cached per epoch, so resuming at any step, or going back
    to an earlier epoch, gives the same batch)."""
    from slam_ray.lm.packed import PackedWindows, write_index, write_shard
    from slam_ray.parallel.train_utils import epoch_order

    windows = np.arange(30 * 4, dtype=np.uint16).reshape(30, 4)
    rows = [write_shard(tmp_path, "train", i, windows[a:b].reshape(-1), np.zeros(0), 4)  # three shards
            for i, (a, b) in enumerate(((0, 7), (7, 8), (8, 30)))]
    write_index(tmp_path, 4, {"train": rows, "val": []})
    mapped = WindowBatches(PackedWindows(tmp_path, "train"), 3, rank=1, world=2, seed=7)
    plain = WindowBatches(windows, 3, rank=1, world=2, seed=7)
    for index in [0, 1, 9, 5, 12, 3, 17, 0]:  # across epochs (5 batches each), forwards and back
        epoch, i = divmod(index, plain.per_epoch)
        order = epoch_order(7, epoch, 30)
        expected = windows[order[i * 6 + 3 : i * 6 + 6]]
        np.testing.assert_array_equal(mapped.batch(index), expected)
        np.testing.assert_array_equal(plain.batch(index), expected)
        assert type(mapped.batch(index)) is np.ndarray  # rows copied out of the map, not a view of the file


def test_too_little_data_is_a_clear_error(tmp_path):
    """Fewer packed windows than one global batch: a SlamError naming the fields, from the worker's batcher and,
    before any Ray worker starts, from the stage (it reads the count from the pack manifest)."""
    from helpers import small_experiment

    from slam_ray.core.stage_io import stage_dir
    from slam_ray.errors import SlamError
    from slam_ray.stages.train import train

    with pytest.raises(SlamError, match="3 training windows < one global batch .8.; lower train.batch_size"):
        WindowBatches(np.zeros((3, 8)), 4, 0, 2, 0)
    exp = small_experiment(tmp_path / "w", train={"batch_size": 4, "num_workers": 2})
    packed = stage_dir(exp, "pack")
    packed.path.mkdir(parents=True)
    packed.write_manifest({"status": "complete", "stage": "pack", "key": packed.key, "counts": {"train_windows": 5}})
    with pytest.raises(SlamError, match="5 training windows < one global batch .8.; lower train.batch_size, "
                                        "train.num_workers"):
        train(exp)


def test_wsd_and_linear_schedules():
    wsd = ScheduleConfig(name="wsd", warmup_ratio=0.0, warmup_steps=5, decay_ratio=0.2, min_lr=0.0)
    f = [lr_factor(s, 100, 5, wsd, 1.0) for s in range(101)]
    assert f[4] == pytest.approx(1.0) and f[50] == 1.0 and f[79] == 1.0  # stable until the last 20%
    assert f[90] == pytest.approx(0.5) and f[100] == pytest.approx(0.0)
    lin = ScheduleConfig(name="linear", warmup_ratio=0.0, min_lr=0.1)
    assert lr_factor(50, 100, 0, lin, 1.0) == pytest.approx(0.55)
    assert lr_factor(100, 100, 0, lin, 1.0) == pytest.approx(0.1)


def test_warmup_steps_override_the_ratio():
    from slam_ray.lm.optim import warmup_steps

    assert warmup_steps(ScheduleConfig(warmup_ratio=0.1), 200) == 20
    assert warmup_steps(ScheduleConfig(warmup_ratio=0.1, warmup_steps=7), 200) == 7


@pytest.mark.parametrize("name", ["adamw", "adamw_fused", "adafactor", "ademamix", "lion", "adalomo"])
def test_every_optimizer_trains_a_few_steps(name):
    """Each optimizer of the ablation space lowers the loss of a tiny Qwen2 on a repeating unit pattern."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from slam_ray.config import OptimizerConfig
    from slam_ray.lm.optim import build_optimizer

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True))
    lr = {"adafactor": 5e-2, "adalomo": 5e-2}.get(name, 3e-3)  # both scale steps by the weights' RMS
    opt = build_optimizer(OptimizerConfig(name=name, lr=lr), model.parameters())
    x = torch.arange(2, 34).repeat(4, 2)
    losses = []
    for _ in range(15):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], (name, losses[0], losses[-1])


def test_each_optimizer_name_builds_its_own_algorithm():
    """The ablation's names are not one optimizer under six names: each builds its own class (the fused AdamW with
    its kernel on), and from one start three steps end at four different weights (see the two pairs below)."""
    import torch
    from pytorch_optimizer import AdEMAMix, Lion

    from slam_ray.config import OptimizerConfig
    from slam_ray.lm.optim import build_optimizer

    classes = {"adamw": torch.optim.AdamW, "adamw_fused": torch.optim.AdamW, "adafactor": torch.optim.Adafactor,
               "ademamix": AdEMAMix, "lion": Lion}
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    finals = {}
    for name in (*classes, "adalomo"):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        opt = build_optimizer(OptimizerConfig(name=name, lr=1e-2), model.parameters())
        if name in classes:
            assert isinstance(opt, classes[name]), name
        else:
            assert type(opt).__name__ == "AdaLomo"
        assert opt.defaults.get("fused") is {"adamw": False, "adamw_fused": True}.get(name)
        for _ in range(3):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        finals[name] = model.weight.detach().clone()
    # Two pairs are one rule each: AdamW's two kernels, and AdaLomo's update as an ordinary step() (its factored
    # second moment, update clipped to RMS 1, step scaled by the weight's RMS) is torch's Adafactor at these
    # settings: what AdaLomo adds is applying it inside the backward pass (memory), which slam_ray does not.
    same = ({"adamw", "adamw_fused"}, {"adafactor", "adalomo"})
    names = list(finals)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if {a, b} not in same:
                assert not torch.allclose(finals[a], finals[b], rtol=1e-4, atol=1e-6), (a, b)
    for a, b in map(sorted, same):
        torch.testing.assert_close(finals[a], finals[b], rtol=1e-5, atol=1e-6)


def tiny_lm_and_batch(layers: int = 2):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=64))
    return model, torch.arange(2, 34).repeat(4, 2)


def loss_and_grads(model, x):
    model.train()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return loss.item(), grads


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    """Through the trainer's own `prepare_model` (what train.gradient_checkpointing turns on): a decoder layer's
    MLP runs twice a step (once more in the backward: its activations were not kept), and the loss and gradients
    are the plain model's."""
    import copy

    import torch

    from slam_ray.parallel.trainer import TrainerSettings, prepare_model

    model, x = tiny_lm_and_batch()
    checkpointed = prepare_model(copy.deepcopy(model), TrainerSettings(gradient_checkpointing=True), torch.device("cpu"))
    plain = prepare_model(model, TrainerSettings(), torch.device("cpu"))
    forwards = {"plain": 0, "checkpointed": 0}
    for name, m in (("plain", plain), ("checkpointed", checkpointed)):
        # on a module inside the layer (the checkpoint wraps the layer's forward, not its own hooks), before its
        # forward (torch's non-reentrant recompute stops once it has what the backward needs)
        m.model.layers[0].mlp.register_forward_pre_hook(lambda *_, name=name: forwards.__setitem__(name, forwards[name] + 1))
    loss, grads = loss_and_grads(plain, x)
    loss_ckpt, grads_ckpt = loss_and_grads(checkpointed, x)
    assert forwards == {"plain": 1, "checkpointed": 2}
    assert loss_ckpt == pytest.approx(loss, abs=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_compiling_many_fused_loss_chunks_warns_with_the_chunk_size_that_fixes_it(tmp_path):
    """Under train.compile each fused-loss chunk is traced into the graph: 74 chunks of a micro-batch (8 x 64 tokens in
    chunks of 7) took a tiny run 10 min to compile here. The worker warns, naming a chunk size that keeps it short —
    and that size, or no compile, or few chunks, gives no warning."""
    from helpers import small_experiment

    from slam_ray.stages.train import compiled_chunks_warning

    def train_cfg(**values):
        return small_experiment(tmp_path, train={"batch_size": 8, "compile": True, **values}).train

    warning = compiled_chunks_warning(train_cfg(loss_chunk_tokens=7), context_len=64)
    assert warning is not None and "74 loss chunks" in warning and "train.loss_chunk_tokens >= 32" in warning
    assert compiled_chunks_warning(train_cfg(loss_chunk_tokens=32), context_len=64) is None
    assert compiled_chunks_warning(train_cfg(loss_chunk_tokens=200), context_len=64) is None
    assert compiled_chunks_warning(train_cfg(loss_chunk_tokens=7, compile=False), context_len=64) is None
    assert compiled_chunks_warning(train_cfg(), context_len=64) is None


@pytest.mark.slow
def test_torch_compile_gives_the_same_loss_and_gradients():
    """Inductor on CPU (it needs a C compiler; ~20 s to compile the tiny model here). One layer: a second, identical
    one adds compile time and no case."""
    import copy

    import torch

    model, x = tiny_lm_and_batch(layers=1)
    compiled = torch.compile(copy.deepcopy(model))
    loss, grads = loss_and_grads(model, x)
    loss_c, grads_c = loss_and_grads(compiled, x)
    assert loss_c == pytest.approx(loss, abs=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(grads_c["_orig_mod." + name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_adalomo_matches_lomo_optims_fused_implementation(monkeypatch):
    """Our AdaLomo step equals lomo-optim's (the authors' package) fused-backward update, parameter for
    parameter, over several steps. lomo-optim allocates its state with `.cuda()`: on this CPU-only machine the
    test makes `.cuda()` a no-op so the reference runs unchanged otherwise."""
    import copy

    import lomo_optim
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from slam_ray.config import OptimizerConfig
    from slam_ray.lm.optim import build_optimizer

    torch.manual_seed(0)
    # untied: the fused reference would update a tied weight from half its gradient
    ours = Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=False))
    reference, start = copy.deepcopy(ours), copy.deepcopy(ours)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    lomo = lomo_optim.AdaLomo(reference, lr=1e-2, loss_scale=0)  # no loss scaling: exact fp32 gradients
    opt = build_optimizer(OptimizerConfig(name="adalomo", lr=1e-2), ours.parameters())
    x = torch.arange(2, 34).repeat(4, 2)
    for _ in range(4):
        lomo.fused_backward(reference(input_ids=x, labels=x).loss, lr=1e-2)
        ours(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    for (name, a), b, before in zip(ours.named_parameters(), reference.parameters(), start.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(a, before), f"{name} did not move"


def test_mix_weights_are_validated():
    from slam_ray.config import load_experiment
    from slam_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="mix weights"):
        load_experiment("quickstart", ["pack.mix={a: -1}"])
    exp = load_experiment("quickstart", ["extract.inputs=[{name: books, path: /data/books}, /data/LibriSpeech/, '@synth']"])
    assert exp.named_inputs() == [("books", "/data/books"), ("LibriSpeech", "/data/LibriSpeech/"), ("synth", "@synth")]


def test_training_on_pack_shards_gives_the_loss_curve_of_the_same_windows_in_memory(tmp_path):
    """The worker's data path: the same model trained on `PackedWindows` over three shards and on the same windows
    as one in-memory array (same seed) gives the same loss at every step, across an epoch boundary."""
    import torch
    from helpers import small_experiment

    from slam_ray.lm.model import build_model
    from slam_ray.lm.optim import build_optimizer
    from slam_ray.lm.packed import PackedWindows, write_index, write_shard

    exp = small_experiment(tmp_path / "w")
    rng = np.random.default_rng(0)
    windows = rng.integers(2, exp.vocab_size, size=(20, 32)).astype(np.uint16)
    rows = [write_shard(tmp_path, "train", i, windows[a:b].reshape(-1), np.zeros(0), 32)
            for i, (a, b) in enumerate(((0, 9), (9, 10), (10, 20)))]
    write_index(tmp_path, 32, {"train": rows, "val": []})

    def curve(source) -> list[float]:
        torch.manual_seed(0)
        model = build_model(exp.train.model, exp.vocab_size, max_positions=32)
        optimizer = build_optimizer(exp.train.optimizer, model.parameters())
        data, losses = WindowBatches(source, 4, rank=0, world=1, seed=3), []
        for step in range(8):  # 5 batches per epoch: crosses into the second epoch
            x = torch.from_numpy(data.batch(step).astype(np.int64))
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    sharded, in_memory = curve(PackedWindows(tmp_path, "train")), curve(windows)
    assert sharded == pytest.approx(in_memory, abs=1e-5)
    assert sharded[-1] < sharded[0]  # it trained


def packed_utterances(folder, lengths: list[int], context_len: int, vocab: int, seed: int = 0):
    """A one-shard pack output of random utterances of these lengths (in units), in order."""
    from slam_ray.lm.packed import PackedWindows, utterance_stream, write_index, write_shard

    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, vocab - 2, size=n) for n in lengths]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens, starts = utterance_stream(np.concatenate(arrays).astype(np.uint16), offsets, np.arange(len(lengths)))
    row = write_shard(folder, "train", 0, tokens, starts, context_len)
    write_index(folder, context_len, {"train": [row], "val": []})
    return PackedWindows(folder, "train")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_document_mask_gives_an_utterance_in_a_packed_window_its_logits_alone(tmp_path, attention):
    """Position ids restarting at each document make transformers attend within documents only: every document
    (an utterance, or a piece of one cut by a window boundary) in a window has the logits it has alone."""
    import torch
    from helpers import small_experiment

    from slam_ray.lm.model import build_model
    from slam_ray.stages.train import window_inputs

    exp = small_experiment(tmp_path / "w")
    windows = packed_utterances(tmp_path, [10, 25, 40, 3], 32, exp.vocab_size)  # 12 + 27 + 42 + 5 tokens
    torch.manual_seed(0)
    model = build_model(exp.train.model.model_copy(update={"attn_implementation": attention}), exp.vocab_size,
                        max_positions=32).eval()
    rows = np.arange(len(windows))
    batch = window_inputs(windows, rows, document_mask=True)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        unmasked = model(input_ids=batch["input_ids"]).logits
        checked = 0
        for k in rows:
            cuts = list(np.flatnonzero(batch["position_ids"][k] == 0)) + [32]  # the padding is a document too
            assert set(windows.document_starts(k)) <= set(cuts)
            for a, b in zip(cuts, cuts[1:], strict=False):
                alone = model(input_ids=batch["input_ids"][k : k + 1, a:b]).logits[0]
                torch.testing.assert_close(packed[k, a:b], alone, atol=1e-5, rtol=1e-5)
                checked += 1
    assert checked >= 6  # documents, pieces included, across the three windows
    assert not torch.allclose(unmasked[0, 12:32], packed[0, 12:32], atol=1e-3)  # without it: the 2nd sees the 1st
    # a document's first token is not a target; padding is no target
    assert (batch["labels"][batch["position_ids"] == 0] == -100).all()
    assert (batch["labels"][batch["input_ids"] == 0] == -100).all()


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["sdpa", "flash_attention_2"])
def test_document_mask_on_a_gpu_kernel_gives_an_utterance_its_logits_alone(tmp_path, attention):
    """The same on CUDA in bf16 with the kernels the recipe trains with: SDPA (transformers turns restarting position
    ids into a block mask) and FlashAttention-2's varlen path on the flattened micro-batch the worker feeds it
    (skipped when flash-attn is not installed). bf16 tolerances; the unmasked model must differ by more."""
    import torch
    from helpers import small_experiment

    from slam_ray.lm.model import build_model
    from slam_ray.stages.train import flat_documents, window_inputs

    if attention == "flash_attention_2":
        pytest.importorskip("flash_attn")
    exp = small_experiment(tmp_path / "w")
    windows = packed_utterances(tmp_path, [10, 25, 40, 3, 50, 7], 32, exp.vocab_size)
    torch.manual_seed(0)
    model = build_model(exp.train.model.model_copy(update={"attn_implementation": attention}), exp.vocab_size,
                        max_positions=32).to("cuda", torch.bfloat16).eval()
    batch = {k: v.cuda() if torch.is_tensor(v) else v
             for k, v in window_inputs(windows, np.arange(len(windows)), document_mask=True).items()}
    inputs = flat_documents(batch) if attention == "flash_attention_2" else batch
    with torch.no_grad():
        packed = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                       use_cache=False).logits.reshape(*batch["input_ids"].shape, -1)
        checked = 0
        for k in range(len(windows)):
            cuts = list(torch.nonzero(batch["position_ids"][k] == 0).flatten().tolist()) + [32]
            for a, b in zip(cuts, cuts[1:], strict=False):
                alone = model(input_ids=batch["input_ids"][k : k + 1, a:b]).logits[0]
                torch.testing.assert_close(packed[k, a:b].float(), alone.float(), atol=3e-2, rtol=3e-2)
                checked += 1
        unmasked = model(input_ids=batch["input_ids"]).logits
    assert checked >= 8
    assert (unmasked[0, 12:32].float() - packed[0, 12:32].float()).abs().max() > 0.1  # the 2nd sees the 1st


def test_document_mask_loss_is_the_mean_over_the_targets_of_the_whole_step(tmp_path):
    """Two micro-batches of 4 windows, each loss scaled by the step's target count as the worker does, give the
    gradients of one batch of 8 (per-micro-batch means would weight their targets unequally)."""
    import torch
    from helpers import small_experiment

    from slam_ray.lm.model import build_model
    from slam_ray.stages.train import targets_in, window_inputs

    exp = small_experiment(tmp_path / "w")
    rng = np.random.default_rng(1)
    windows = packed_utterances(tmp_path, list(rng.integers(1, 60, size=40)), 32, exp.vocab_size)
    data = WindowBatches(windows, 8, rank=0, world=1, seed=0)
    rows = data.rows(0)

    def gradients(micro_batches: list[np.ndarray], normalise: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = build_model(exp.train.model, exp.vocab_size, max_positions=32)
        n = targets_in(windows, micro_batches, True)
        for part in micro_batches:
            kwargs = {"num_items_in_batch": n / len(micro_batches)} if normalise else {}
            (model(**window_inputs(windows, part, True), **kwargs).loss / len(micro_batches)).backward()
        return [p.grad.clone() for p in model.parameters()]

    whole = gradients([rows], normalise=False)
    split = gradients([rows[:4], rows[4:]], normalise=True)
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    counts = [targets_in(windows, [part], True) for part in (rows[:4], rows[4:])]
    assert counts[0] != counts[1]  # the micro-batches hold unequal targets: plain means would differ
    naive = gradients([rows[:4], rows[4:]], normalise=False)
    assert max(float((a - b).abs().max()) for a, b in zip(whole, naive, strict=True)) > 1e-5


def test_effective_context_counts_each_documents_own_attention():
    from slam_ray.stages.train import effective_context

    positions = np.array([[0, 1, 2, 3, 0, 1, 0, 1]])  # documents of 4, 2, 2 tokens in a window of 8
    assert effective_context(positions) == pytest.approx((16 + 4 + 4) / 8)
    assert effective_context(np.arange(8)[None, :]) == 8  # one document: the window's length


def test_flash_attention_layout_flattens_a_micro_batch_into_one_row_of_documents(tmp_path):
    """FlashAttention-2 masks documents only for a batch of one row, so the worker flattens `[B, T]` to
    `[1, B*T]`: on CPU (sdpa) the flattened batch gives the batched loss and logits — windows stay apart because
    each starts a document."""
    import torch
    from helpers import small_experiment

    from slam_ray.lm.model import build_model
    from slam_ray.stages.train import flat_documents, spread_sample, window_inputs

    exp = small_experiment(tmp_path / "w")
    windows = packed_utterances(tmp_path, [10, 25, 40, 3, 50, 7], 32, exp.vocab_size)
    torch.manual_seed(0)
    model = build_model(exp.train.model, exp.vocab_size, max_positions=32).eval()
    batch = window_inputs(windows, np.arange(len(windows)), document_mask=True)
    flat = flat_documents(batch)
    assert flat["input_ids"].shape == (1, batch["input_ids"].numel()) and flat["use_cache"] is False
    with torch.no_grad():
        batched, flattened = model(**batch), model(**flat)
    torch.testing.assert_close(flattened.logits.reshape(batched.logits.shape), batched.logits, atol=1e-5, rtol=1e-5)
    assert flattened.loss.item() == pytest.approx(batched.loss.item(), rel=1e-5)
    assert list(spread_sample(5, None, 0)) == [0, 1, 2, 3, 4]
    sample = spread_sample(1000, 10, 0)
    assert len(set(sample)) == 10 and list(sample) == sorted(sample) and sample.max() > 500  # spread, in order


def test_budget_steps_takes_the_tightest_budget_and_a_flop_budget_is_6nd():
    from slam_ray.config import TrainConfig
    from slam_ray.stages.train import budget_steps

    cfg = TrainConfig(max_steps=None, max_minutes=None, max_flops=6 * 1000 * 4096 * 10)
    assert budget_steps(cfg, 4096, 1000) == 10  # exactly 10 steps of 4096 tokens for a 1000-parameter model
    assert budget_steps(cfg, 4096, 2000) == 5  # twice the parameters: half the tokens
    assert budget_steps(cfg.model_copy(update={"max_flops": 6 * 1000 * 4096 * 10 + 1}), 4096, 1000) == 11
    assert budget_steps(cfg.model_copy(update={"max_steps": 3}), 4096, 1000) == 3
    assert budget_steps(cfg.model_copy(update={"max_tokens": 4096 * 7}), 4096, 1000) == 7
    with pytest.raises(ValueError, match="max_flops"):
        TrainConfig(max_steps=None, max_minutes=None)


def test_a_validation_batch_without_targets_does_not_make_the_loss_nan():
    """A last validation window of one token and padding has no target after the shift: Hugging Face's mean loss of
    it is NaN, and weighting it by its 0 targets (`nan * 0`) made the whole validation loss NaN."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from slam_ray.stages.train import weighted_nll

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=32)).eval()
    with torch.no_grad():
        empty = model(input_ids=torch.tensor([[5, 0, 0]]), labels=torch.tensor([[5, -100, -100]])).loss.item()
        full = model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.item()
    assert np.isnan(empty)
    nll, targets = weighted_nll([(full, 2), (empty, 0), (1.5, 4)])
    assert targets == 6 and nll == pytest.approx(full * 2 + 6.0)
