"""The trainer scaffold (`slam_ray/parallel/trainer.py`) that `train` and `dpo` share, seen from DPO, which gained train's
precision, compile, gradient checkpointing and FSDP through it: the DPO loop in the scaffold without Ray (bf16,
gradient checkpointing, compile against fp32), then the stage on a real local Ray (FSDP against DDP, a killed
FSDP worker that resumes, bf16 + gradient checkpointing taken from train)."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
from helpers import actors_of, dpo_curve, external_start, kill_a_worker_during, logged_steps, small_experiment

from slam_ray.config import load_experiment, recipe_names, with_values
from slam_ray.core.stage_io import stage_dir, stage_key, stage_payload
from slam_ray.pipeline import stage_function

# ---------------------------------------------------------------------------------------------------------------
# settings and stage keys


# The keys of the shipped recipes' stages before dpo.precision/compile/gradient_checkpointing/strategy existed
# (tests/core/test_stage_keys_golden.py holds today's).
KEYS_BEFORE = {
    "quickstart": {"synth": "19165e1a205f", "extract": "1c68b0ed2d63", "pack": "7771d5c35596", "train": "0a51acd25762",
                   "dpo": "278a9d9708bf", "eval": "2db7b7d261c0"},
    "slam": {"extract": "f03cf66ee464", "pack": "b24711859fd3", "train": "1762179eb716", "dpo": "119477ae4f52",
             "eval": "86dbdf5683c7"},
    "slam_scaled": {"extract": "96f6e3cd14d3", "pack": "abdce3d0a236", "train": "3fd39c006f08", "dpo": "bdfa0ae9e544",
                    "eval": "cd2b1b53659a"},
}


def test_dpo_takes_trains_settings_unless_set_and_only_a_changed_dpo_changes_keys(tmp_path, monkeypatch):
    from slam_ray.core import stage_io
    from slam_ray.parallel.trainer import TrainerSettings

    assert set(KEYS_BEFORE) <= set(recipe_names())  # the recipes of then (quickstart_interleaved came after)
    # KEYS_BEFORE predate the sharded pack (format 2) and the unit shards with words (extract format 2), which
    # changed their stage's key and everything after it on purpose; at format 1 what is left is this change alone
    monkeypatch.setitem(stage_io.STAGE_FORMAT, "pack", 1)
    monkeypatch.setitem(stage_io.STAGE_FORMAT, "extract", 1)
    monkeypatch.setattr(stage_io, "INVERSE_SQRT_VERSION", 1)  # DPO's schedule without warmup, fixed later
    monkeypatch.setattr(stage_io, "PAIRS_VERSION", 3)  # eval pairs' voices drawn per pair, later
    for name, keys in KEYS_BEFORE.items():
        # the recipes as they were then (the slam recipes have since taken the paper's tokens per step and document
        # masks, the quickstart document masks)
        then = ["train.document_mask=false"] + ([] if name == "quickstart" else ["train.grad_accum=16"])
        exp = load_experiment(name, [f"workdir={tmp_path}", *then])
        now = {stage: stage_key(exp, stage) for stage in keys}
        # the quickstart's DPO still trains as before (fp32 DDP): every key kept; the slam recipes' DPO now runs
        # bf16 like their pre-training, so its key changes (an fp32 output is not reused as a bf16 one)
        changed = {stage for stage in keys if now[stage] != keys[stage]}
        assert changed == (set() if name == "quickstart" else {"dpo"}), (name, changed)
    slam = load_experiment("slam", [f"workdir={tmp_path}"])
    # train's, as pre-training; DPO's batches vary in length (its compile is dynamic), train's windows do not
    assert TrainerSettings.of(slam, "dpo") == TrainerSettings("bf16", False, False, "ddp", dynamic_shapes=True)
    own = with_values(slam, {"dpo.precision": "fp32", "dpo.strategy": "fsdp"}, "test")
    assert TrainerSettings.of(own, "dpo") == TrainerSettings("fp32", False, False, "fsdp", dynamic_shapes=True)
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


def dpo_run(steps: int = 4, layers: int = 2, **settings) -> tuple[list[float], dict, object]:
    """`steps` DPO steps of a tiny Qwen2 of `layers` layers (2 micro-batches each) through `Trainer.run` with these settings:
    (the loss of every micro-batch, the final weights, the prepared model)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from slam_ray.lm.dpo_loss import build_preference_batch, dpo_loss, preference_logps
    from slam_ray.parallel.trainer import (
        Budget,
        MetricsLog,
        Plan,
        Trainer,
        TrainerSettings,
        Worker,
        prepare_model,
    )

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=50, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
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

    from slam_ray.parallel.trainer import applied_settings

    plain, weights, _ = dpo_run()
    checkpointed, weights_ckpt, model = dpo_run(gradient_checkpointing=True)
    assert applied_settings(model)["activation_checkpointing"] == 1.0  # what the manifest counts
    np.testing.assert_allclose(checkpointed, plain, rtol=1e-5)
    for name, value in weights.items():
        torch.testing.assert_close(weights_ckpt[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_dpo_compiled_gives_the_same_losses_and_weights():
    """Inductor on CPU (a C compiler; tens of seconds for the tiny model). DPO's settings compile dynamic: its
    batches of several widths (padded to each one's longest row) reuse one graph instead of compiling a static one
    first and a dynamic one at the second width (half the compile time, here and on a GPU)."""
    import torch
    from torch._dynamo.utils import counters

    # one layer: a second identical layer adds compile time (dynamo traces it, inductor lowers it) and no case
    plain, weights, _ = dpo_run(steps=3, layers=1)
    counters.clear()
    compiled, weights_c, model = dpo_run(steps=3, layers=1, compile=True, dynamic_shapes=True)
    assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"], dict(counters)
    np.testing.assert_allclose(compiled, plain, rtol=1e-4, atol=1e-5)
    for name, value in weights.items():
        torch.testing.assert_close(weights_c[name], value, rtol=1e-3, atol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# the time budget's plan and the throughput probe


def _plain_trainer(optimizer: str, steps: int, device: str = "cpu", resumed=None):  # noqa: ANN001
    """A one-rank Trainer of a tiny linear model with `optimizer` (slam_ray's builder) and the micro-batch loss of
    fixed data: (trainer, micro_loss)."""
    import torch

    from slam_ray.config import OptimizerConfig
    from slam_ray.lm.optim import build_optimizer
    from slam_ray.parallel.trainer import Budget, MetricsLog, Plan, Trainer, TrainerSettings, Worker

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1).to(device)
    data = torch.randn(64, 8, generator=torch.Generator().manual_seed(1)).to(device)

    def micro_loss(index: int):
        return model(data[index % 64 : index % 64 + 1]).pow(2).mean(), {}

    opt = build_optimizer(OptimizerConfig(name=optimizer, lr=1e-2), model.parameters())
    t = Trainer(Worker(0, 1, torch.device(device), MetricsLog(None)), TrainerSettings(), model, opt, Plan(steps, 0),
                lambda s, plan: 1.0, Budget(None), grad_accum=1, max_grad_norm=None, resumed=resumed)
    return t, micro_loss


@pytest.mark.parametrize("optimizer", ["adamw", "ademamix"])
def test_the_throughput_probe_leaves_no_trace_in_the_weights_or_the_optimizer(optimizer):
    """A time budget first times a few steps at lr 0; then training must go as if they never ran. AdEMAMix counts
    its steps in the param group (bias corrections, alpha/beta3 warm-up): its first real update was half a fresh
    one's after the probe's steps, until the probe restored the groups too."""
    import torch

    probed, loss_a = _plain_trainer(optimizer, 3)
    before = {k: v.clone() for k, v in probed.model.state_dict().items()}
    assert probed.probe_step_time(loss_a) > 0
    for key, value in probed.model.state_dict().items():
        assert torch.equal(value, before[key]), key  # lr 0: the probe moved nothing
    fresh, loss_b = _plain_trainer(optimizer, 3)
    for t, loss in ((probed, loss_a), (fresh, loss_b)):
        t.run(loss, lambda s: 1, log_every=10, describe=lambda m: "")
    assert [{k: v for k, v in g.items() if k != "params"} for g in probed.optimizer.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in fresh.optimizer.param_groups]
    for key, value in fresh.model.state_dict().items():
        torch.testing.assert_close(probed.model.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_only_reports_made_while_training_reach_tunes_scheduler():
    """A sweep trial's scheduler (ASHA, median) sees the validation reports made while the run trains: not the
    step-0 checkpoint (no progress) and not the final report, whose 100% met an ASHA rung at 100% (or one first
    reached there) and stopped trials that had trained their whole budget before their eval ran."""
    from slam_ray.parallel.trainer import tune_progress

    assert tune_progress({"step": 0, "kind": "init", "params": 10}) is None
    assert tune_progress({"step": 40, "kind": "final", "progress": 100.0, "val/loss": 2.0}) is None
    assert tune_progress({"step": 20, "progress": 50.0, "val/loss": 2.5}) == {"step": 20, "progress": 50.0, "val/loss": 2.5}
    assert tune_progress({"step": 30, "kind": "periodic", "progress": 75.0}) == {"step": 30, "progress": 75.0}


def test_a_failed_metric_write_is_said_not_dropped(capsys):
    """Rank 0's MLflow writes run on a thread: a failed one (the store or its writer gone) used to vanish unless it
    was the very last before a checkpoint. Every failure is counted and said; training goes on, later writes land."""
    from slam_ray.parallel.trainer import MetricsLog

    class FlakyStore:  # a tracker whose store refuses steps 3 and 4
        def __init__(self) -> None:
            self.written: list[int] = []

        def log_metrics(self, values: dict, step: int) -> None:
            if step in (3, 4):
                raise ConnectionError(f"store unreachable at step {step}")
            self.written.append(step)

    store = FlakyStore()
    log = MetricsLog(store)
    for step in range(1, 7):
        log.metrics({"loss": 1.0}, step)
        if step == 5:
            log.flush()
            assert log.failed == 2
    log.close()
    assert store.written == [1, 2, 5, 6] and log.failed == 2
    out = capsys.readouterr().out
    assert "[mlflow] 1 metric write(s) of this run failed, the latest: ConnectionError('store unreachable at step 3')" in out


def test_a_resumed_runs_replan_does_not_count_its_first_steps_warm_up(monkeypatch):
    """A resumed run has no throughput probe: its first step pays one-off costs (compile, a GPU's warm-up) that the
    re-plans averaged over the few steps before the first one, and the schedule shrank (a third of the budget
    left unused). Resumed with 2 s of its budget left and steps of 5 ms, on a clock the steps advance (so the
    figures do not depend on this machine's load): the run whose first step takes 0.4 s more plans the steps
    its time left affords, as the one without it does."""
    import torch

    from slam_ray.parallel import trainer as scaffold
    from slam_ray.parallel.trainer import Budget, MetricsLog, Plan, Trainer, TrainerSettings, Worker

    def resumed_run(warm_up_s: float) -> tuple[Trainer, float]:
        clock = {"now": 1000.0}
        monkeypatch.setattr(scaffold.time, "perf_counter", lambda: clock["now"])
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        calls = []

        def micro_loss(index: int):
            calls.append(index)
            clock["now"] += warm_up_s if len(calls) == 1 else 0.005
            return model(torch.ones(1, 4)).pow(2).mean(), {}

        def trainer(resumed=None) -> Trainer:
            return Trainer(Worker(0, 1, torch.device("cpu"), MetricsLog(None)), TrainerSettings(), model,
                           torch.optim.AdamW(model.parameters(), lr=1e-3), Plan(1000, 0, [310, 700, 900]),
                           lambda s, plan: 1.0 - s / plan.total, Budget(4 / 60), grad_accum=1, max_grad_norm=None,
                           resumed=resumed)

        checkpointed = trainer()
        checkpointed.step = 300  # resumed just before a re-plan
        state = checkpointed.state(checkpointed.optimizer.state_dict())
        state["train_seconds"] = 2.0  # half the 4-s budget spent before the checkpoint
        t = trainer(state)
        left_after_warm_up = 2.0 - warm_up_s
        t.run(micro_loss, lambda s: 1, log_every=10**6, describe=lambda m: "")
        return t, left_after_warm_up

    for warm_up_s in (0.005, 0.4):
        t, left = resumed_run(warm_up_s)
        affordable = 300 + 1 + left / 0.005  # the steps the time left after the first step pays for
        assert t.plan.total == pytest.approx(affordable, abs=3), (warm_up_s, t.plan.total, affordable)
        assert t.step == t.plan.total  # and the run ends on its plan, not cut by the clock


def test_a_wsd_schedule_is_not_replanned_inside_its_decay():
    """A re-plan at 90% of a WSD plan (decay over the last 10%) moved the decay's start behind the current step:
    its lr fell from the flat 1.0 to ~0.5 in one step. Re-plans stop before the decay; anywhere else a re-plan by
    +-10% moves the lr by a few percent at most."""
    from slam_ray.config import ScheduleConfig
    from slam_ray.lm.optim import lr_factor, replan_before
    from slam_ray.parallel.trainer import replan_steps

    for name in ("wsd", "cosine", "linear"):
        sched = ScheduleConfig(name=name, warmup_steps=0)
        total = 1000
        steps = replan_steps(total, 60.0, replan_before(sched))
        assert steps == ([100, 400, 700] if name == "wsd" else [100, 400, 700, 900])
        for step in steps:
            before = lr_factor(step, total, 0, sched, 1e-3)
            for new_total in (int(total * 0.9), int(total * 1.1)):
                assert abs(lr_factor(step, new_total, 0, sched, 1e-3) - before) < 0.1, (name, step, new_total)
    wsd = ScheduleConfig(name="wsd", warmup_steps=0)
    assert lr_factor(900, 1000, 0, wsd, 1e-3) - lr_factor(900, 950, 0, wsd, 1e-3) > 0.4  # what the 90% re-plan did


@pytest.mark.gpu
def test_a_resumed_trainer_continues_the_cuda_generator_where_the_checkpoint_left_it():
    """Dropout on a GPU draws from the CUDA generator: a resumed run continues its sequence (a reseeded one would
    replay the first steps' dropout masks)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    t, _ = _plain_trainer("adamw", 3, "cuda")
    torch.rand(5, device="cuda")  # the generator moved on since the seed
    state = t.state(t.optimizer.state_dict())
    expected = torch.rand(5, device="cuda")
    torch.manual_seed(0)  # what a restarted worker does before building its model
    _plain_trainer("adamw", 3, "cuda", resumed=state)
    torch.testing.assert_close(torch.rand(5, device="cuda"), expected, rtol=0, atol=0)


def _plan_on_rank(rank: int, port: int, skew_s: float, step_s: float, results) -> None:  # noqa: ANN001
    import torch.distributed as dist

    from slam_ray.parallel.trainer import Budget

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        budget = Budget(1.0, start=time.perf_counter() - rank * skew_s)  # rank 1 built its trainer earlier
        own = int(budget.left() / step_s)
        results.put((rank, own, budget.steps_affordable(step_s)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_whose_clocks_started_apart_agree_on_the_time_budgets_plan():
    """Two gloo ranks (processes) whose budgets started 0.5 s apart, as two Ray Train workers build their trainers
    at different moments: steps of 0.4 s that fit in each one's time left differ by a step, and a plan that
    differed let one rank leave the loop while the other all-reduced gradients (a hang). They agree on the
    smaller."""
    import multiprocessing

    from helpers import free_port

    ctx = multiprocessing.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_plan_on_rank, args=(rank, port, 0.5, 0.4, results)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    got = dict(((rank, (own, agreed)) for rank, own, agreed in (results.get(timeout=10) for _ in procs)))
    assert got[0][0] != got[1][0]  # each rank's own count: the disagreement the plan must not inherit
    assert got[0][1] == got[1][1] == min(got[0][0], got[1][0])


# ---------------------------------------------------------------------------------------------------------------
# the DPO stage on a real local Ray


@pytest.mark.ray
@pytest.mark.slow
def test_dpo_fsdp_and_bf16_through_the_stage_and_a_killed_fsdp_worker_resumes(tmp_path, ray_local):
    """On 2 CPU workers (gloo), from the experiment file: dpo.strategy fsdp (FSDP2, the frozen reference sharded
    too), killed mid-run by SIGKILLing a worker, resumes from its gathered checkpoint and ends on the same step
    with the loss curve and final weights of one worker given the same global batches (to 1e-3, as train's FSDP
    against DDP: data parallelism is exact; train's test checks one worker against DDP too, and the DDP wrapper
    is the shared scaffold's); train.precision bf16 and train.gradient_checkpointing reach DPO (its own fields
    left None): a curve that is the fp32 one's to bf16's precision, not bit for bit. (A stage run costs ~1 min of
    Ray Train start-up on a busy 2-core machine, hence one test.)"""
    import torch
    from transformers import AutoModelForCausalLM

    base = {"batch_size": 2, "num_workers": 2, "grad_accum": 2, "max_steps": 80, "log_every": 4, "lr": 2e-3}
    # Only the run that is killed checkpoints (every 8 steps, on log steps: a resumed run's first logged mean covers
    # the steps since the checkpoint); the fp32 reference and bf16 run on one worker with the global batch of two
    # (the triples are all one length, so no padding differs): a worker process less each is ~10 s here
    one = {"dpo.num_workers": 1, "dpo.batch_size": 4}
    extra = {"one": one, "fsdp": {"dpo.strategy": "fsdp", "train.max_failures": 2, "dpo.checkpoint_every": 8},
             "bf16": {"train.precision": "bf16", "train.gradient_checkpointing": True, **one}}
    runs = {name: with_values(external_start(tmp_path / name, 100, **base), {"ray.worker_cpus": 0.5, **values}, "test")
            for name, values in extra.items()}
    handler = signal.getsignal(signal.SIGINT)
    for name in ("one", "bf16"):
        stage_function("dpo")(runs[name])
    # Train's own Ctrl+C handler (it holds the run's controller) does not outlive the run
    assert signal.getsignal(signal.SIGINT) is handler
    victim, errors = kill_a_worker_during(lambda: stage_function("dpo")(runs["fsdp"]),
                                          lambda: 12 <= max(dpo_curve(runs["fsdp"]), default=0) < 60)
    assert victim is not None, "the run finished before a worker could be killed"
    assert not errors, errors
    assert logged_steps(runs["fsdp"], "dpo", "dpo/loss")[4] == 1  # resumed from a checkpoint (>= 8), not step 0
    curves = {name: dpo_curve(exp) for name, exp in runs.items()}
    steps = list(range(4, 81, 4))
    assert all(sorted(curve) == steps for curve in curves.values()), curves
    for name, exp in runs.items():
        counts = stage_dir(exp, "dpo").read_manifest()["counts"]
        assert counts["steps"] == 80
        assert counts["activation_checkpointing"] == (name == "bf16")  # train's setting reached DPO's workers
    one, fsdp, bf16 = ([curves[name][s] for s in steps] for name in ("one", "fsdp", "bf16"))
    assert np.mean(one[-4:]) < np.mean(one[:4])  # it learns
    np.testing.assert_allclose(fsdp, one, rtol=1e-3, atol=1e-5)
    assert bf16 != one
    np.testing.assert_allclose(bf16, one, rtol=1e-2)
    weights = {name: AutoModelForCausalLM.from_pretrained(stage_dir(runs[name], "dpo").path / "checkpoint").state_dict()
               for name in ("one", "fsdp")}
    assert weights["fsdp"].keys() == weights["one"].keys()
    # none of these Train runs (nor any before them in this Ray) started Train's Ray Data manager or, on this one
    # machine (conftest sets what init_ray sets for a local instance), a preemption watcher: ~2 s of CPU each
    started = {a.class_name for a in actors_of(ray_local)}
    assert "RayTrainWorker" in started
    assert not started & {"DatasetManager", "PreemptionWatcher"}, started
    # and no finished run's controller lives on (Train's SIGINT handler kept the main thread's last one alive)
    deadline = time.time() + 30
    while (alive := [a for a in actors_of(ray_local) if a.class_name == "TrainController" and a.state == "ALIVE"]):
        assert time.time() < deadline, alive
        time.sleep(0.5)
    for key, value in weights["one"].items():
        torch.testing.assert_close(weights["fsdp"][key], value, rtol=1e-3, atol=1e-4)


def test_fit_sets_a_fast_controller_poll_that_ray_train_passes_on(monkeypatch):
    """At Ray's 2-s poll a validation report of a fast run waited ~1.9 s (half a 30-step run's wall time): fit()
    sets the poll interval in the calling process, a user's own value wins, and Ray Train passes the variable to
    its controller (and from there to the workers) — checked against Ray's own list, which an upgrade could change."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from slam_ray.parallel.trainer import TRAIN_POLL_INTERVAL_S, poll_reports_fast

    # set, then delete: monkeypatch records the variable only when it exists, and restores it afterwards
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "unset by this test")
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    poll_reports_fast()
    assert get_env_vars_to_propagate()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == str(TRAIN_POLL_INTERVAL_S)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.5")
    poll_reports_fast()
    assert get_env_vars_to_propagate()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "1.5"
