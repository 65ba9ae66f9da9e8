"""The trainer scaffold (`slam_ray/trainer.py`) that `train` and `dpo` share, seen from DPO, which gained train's
precision, compile, gradient checkpointing and FSDP through it: the DPO loop in the scaffold without Ray (bf16,
gradient checkpointing, compile against fp32), then the stage on a real local Ray (FSDP against DDP, a killed
FSDP worker, bf16 + gradient checkpointing through the experiment file)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import kill_a_worker_during, small_experiment
from test_dpo import dpo_curve, external_start

from slam_ray.config import load_experiment, recipe_names, with_values
from slam_ray.pipeline import stage_function
from slam_ray.stage_io import stage_dir, stage_key, stage_payload

# ---------------------------------------------------------------------------------------------------------------
# settings and stage keys


# The keys of the shipped recipes' stages before dpo.precision/compile/gradient_checkpointing/strategy existed.
GOLDEN_KEYS = {
    "quickstart": {"synth": "19165e1a205f", "extract": "1c68b0ed2d63", "pack": "7771d5c35596", "train": "0a51acd25762",
                   "dpo": "278a9d9708bf", "eval": "2db7b7d261c0"},
    "slam": {"extract": "f03cf66ee464", "pack": "b24711859fd3", "train": "1762179eb716", "dpo": "119477ae4f52",
             "eval": "86dbdf5683c7"},
    "slam_scaled": {"extract": "96f6e3cd14d3", "pack": "abdce3d0a236", "train": "3fd39c006f08", "dpo": "bdfa0ae9e544",
                    "eval": "cd2b1b53659a"},
}


def test_dpo_takes_trains_settings_unless_set_and_recipes_keep_their_keys(tmp_path):
    from slam_ray.trainer import TrainerSettings

    assert set(recipe_names()) == set(GOLDEN_KEYS)
    for name, keys in GOLDEN_KEYS.items():
        exp = load_experiment(name, [f"workdir={tmp_path}"])
        assert {stage: stage_key(exp, stage) for stage in keys} == keys, name
    slam = load_experiment("slam", [f"workdir={tmp_path}"])
    assert TrainerSettings.of(slam, "dpo") == TrainerSettings("bf16", False, False, "ddp")  # train's, as pre-training
    own = with_values(slam, {"dpo.precision": "fp32", "dpo.strategy": "fsdp"}, "test")
    assert TrainerSettings.of(own, "dpo") == TrainerSettings("fp32", False, False, "fsdp")
    assert TrainerSettings.of(own, "train") == TrainerSettings("bf16", False, False, "ddp")
    assert stage_key(own, "dpo") != stage_key(slam, "dpo")  # a value set on dpo is keyed
    # without the train stage's key (dpo.init), what DPO takes from train is keyed directly
    external = small_experiment(tmp_path, stages=["dpo"], dpo={"init": "some/model"})
    assert "precision" not in stage_payload(external, "dpo")["dpo"]
    bf16 = with_values(external, {"train.precision": "bf16"}, "test")
    assert stage_key(bf16, "dpo") != stage_key(external, "dpo")
    assert stage_key(with_values(external, {"train.log_every": 3}, "test"), "dpo") == stage_key(external, "dpo")


# ---------------------------------------------------------------------------------------------------------------
# the DPO loop in the scaffold, without Ray (one rank, no process group)


def dpo_run(steps: int = 4, **settings) -> tuple[list[float], dict, object]:
    """`steps` DPO steps of a tiny Qwen2 (2 micro-batches each) through `Trainer.run` with these settings:
    (the loss of every micro-batch, the final weights, the prepared model)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from slam_ray.dpo_loss import build_preference_batch, dpo_loss, preference_logps
    from slam_ray.trainer import Budget, MetricsLog, Plan, Trainer, TrainerSettings, Worker, prepare_model

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    policy = Qwen2ForCausalLM(config)
    reference = Qwen2ForCausalLM(config).eval().requires_grad_(False)
    reference.load_state_dict(policy.state_dict())
    rng = np.random.default_rng(0)
    seq = lambda n: rng.integers(2, 50, size=n).tolist()  # noqa: E731
    batches = [build_preference_batch([seq(6) for _ in range(4)], [seq(int(rng.integers(4, 9))) for _ in range(4)],
                                      [seq(int(rng.integers(4, 9))) for _ in range(4)], 64) for _ in range(2 * steps)]
    chosen = TrainerSettings(**settings)
    device = torch.device("cpu")
    model = prepare_model(policy, chosen, device)
    losses: list[float] = []

    def micro_loss(index: int):
        pol_c, pol_r = preference_logps(t.model, batches[index])
        with torch.no_grad():
            ref_c, ref_r = preference_logps(reference, batches[index])
        loss, stats = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=0.5)
        losses.append(loss.item())
        return loss, stats

    t = Trainer(Worker(0, 1, device, MetricsLog(None)), chosen, model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                Plan(steps, 0), lambda s, plan: 1.0, Budget(None), grad_accum=2, max_grad_norm=1.0, prefix="dpo")
    t.run(micro_loss, lambda s: 1, log_every=1, describe=lambda m: f"loss {m['loss']:.4f}")
    assert t.step == steps
    return losses, {k: v.detach().clone() for k, v in policy.state_dict().items()}, model


def test_dpo_in_bf16_gives_the_fp32_loss_to_bf16_precision():
    """dpo.precision bf16: the forwards run under bf16 autocast (the losses are not fp32's bit for bit), the
    loss curve is fp32's to bf16's precision and the weights stay fp32."""
    import torch

    fp32, weights32, _ = dpo_run(precision="fp32")
    bf16, weights16, _ = dpo_run(precision="bf16")
    assert fp32[-1] < fp32[0]  # it learns
    assert bf16 != fp32
    np.testing.assert_allclose(bf16, fp32, rtol=3e-2, atol=1e-2)
    assert all(v.dtype == torch.float32 for v in weights16.values())


def test_dpo_with_gradient_checkpointing_gives_the_same_losses_and_weights():
    import torch

    plain, weights, _ = dpo_run()
    checkpointed, weights_ckpt, model = dpo_run(gradient_checkpointing=True)
    assert model.is_activation_checkpointing
    np.testing.assert_allclose(checkpointed, plain, rtol=1e-5)
    for name, value in weights.items():
        torch.testing.assert_close(weights_ckpt[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_dpo_compiled_gives_the_same_losses_and_weights():
    """Inductor on CPU (a C compiler; tens of seconds for the tiny model, rows of varying length recompile once)."""
    import torch

    plain, weights, _ = dpo_run(steps=3)
    compiled, weights_c, model = dpo_run(steps=3, compile=True)
    assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
    np.testing.assert_allclose(compiled, plain, rtol=1e-4, atol=1e-5)
    for name, value in weights.items():
        torch.testing.assert_close(weights_c[name], value, rtol=1e-3, atol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# the DPO stage on a real local Ray


@pytest.mark.ray
@pytest.mark.slow
def test_dpo_fsdp_matches_ddp_and_resumes_after_a_killed_worker(tmp_path, ray_local):
    """dpo.strategy fsdp (FSDP2 over 2 CPU workers, gloo; the frozen reference sharded too): the same loss curve as
    DDP, a final checkpoint with DDP's weights that plain transformers loads, and after SIGKILLing a worker
    mid-run, a resume from the gathered checkpoint that ends on the same step with the same curve."""
    import torch
    from transformers import AutoModelForCausalLM

    base = {"batch_size": 2, "num_workers": 2, "grad_accum": 2, "max_steps": 60, "log_every": 2, "lr": 2e-3,
            "checkpoint_every": 5}
    runs = {}
    for name in ("ddp", "fsdp", "killed"):
        exp = external_start(tmp_path / name, 100, **base, strategy="ddp" if name == "ddp" else "fsdp")
        runs[name] = with_values(exp, {"ray.worker_cpus": 0.5, "train.max_failures": 2}, "test")
    for name in ("ddp", "fsdp"):
        stage_function("dpo")(runs[name])
    ddp, fsdp = dpo_curve(runs["ddp"]), dpo_curve(runs["fsdp"])
    assert sorted(ddp) == sorted(fsdp) == list(range(2, 61, 2))
    assert np.mean([ddp[s] for s in range(52, 61, 2)]) < np.mean([ddp[s] for s in range(2, 11, 2)])  # it learns
    np.testing.assert_allclose([fsdp[s] for s in sorted(fsdp)], [ddp[s] for s in sorted(ddp)], rtol=1e-3, atol=1e-5)
    weights = {name: AutoModelForCausalLM.from_pretrained(stage_dir(runs[name], "dpo").path / "checkpoint").state_dict()
               for name in ("ddp", "fsdp")}
    assert weights["fsdp"].keys() == weights["ddp"].keys()
    for key, value in weights["ddp"].items():
        torch.testing.assert_close(weights["fsdp"][key], value, rtol=1e-3, atol=1e-4)

    killed = runs["killed"]
    victim, errors = kill_a_worker_during(lambda: stage_function("dpo")(killed),
                                          lambda: 12 <= max(dpo_curve(killed), default=0) < 44)
    assert victim is not None, "the run finished before a worker could be killed"
    assert not errors, errors
    assert stage_dir(killed, "dpo").read_manifest()["counts"]["steps"] == 60
    got = dpo_curve(killed)
    assert sorted(got) == sorted(fsdp)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [fsdp[s] for s in sorted(fsdp)], rtol=1e-4)


@pytest.mark.ray
@pytest.mark.slow
def test_dpo_takes_bf16_and_gradient_checkpointing_from_train(tmp_path, ray_local):
    """train.precision bf16 + train.gradient_checkpointing reach DPO (its fields left None): the stage's loss curve
    is fp32's to bf16's precision without being identical, and dpo.precision fp32 overrides train's bf16."""
    base = {"batch_size": 4, "num_workers": 1, "grad_accum": 2, "max_steps": 10, "log_every": 2, "lr": 2e-3}
    fp32 = external_start(tmp_path / "fp32", 60, **base)
    bf16 = with_values(external_start(tmp_path / "bf16", 60, **base),
                       {"train.precision": "bf16", "train.gradient_checkpointing": True}, "test")
    back = with_values(external_start(tmp_path / "back", 60, **base),
                       {"train.precision": "bf16", "dpo.precision": "fp32"}, "test")
    curves = {}
    for name, exp in (("fp32", fp32), ("bf16", bf16), ("back", back)):
        manifest = stage_function("dpo")(exp).read_manifest()
        assert manifest["counts"]["steps"] == 10
        curves[name] = dpo_curve(exp)
    steps = sorted(curves["fp32"])
    assert steps == list(range(2, 11, 2))
    assert [curves["bf16"][s] for s in steps] != [curves["fp32"][s] for s in steps]
    np.testing.assert_allclose([curves["bf16"][s] for s in steps], [curves["fp32"][s] for s in steps], rtol=3e-2, atol=1e-2)
    np.testing.assert_allclose([curves["back"][s] for s in steps], [curves["fp32"][s] for s in steps], rtol=1e-4)
