"""Training on a real local Ray: DDP over 2 CPU workers, and a wall-clock budget that sizes the schedule."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import actors_of, kill_a_worker_during, logged_steps, small_experiment

from slam_ray.core.stage_io import stage_dir
from slam_ray.core.tracking import driver_writer, tracking_uri
from slam_ray.lm.packed import PackedWindows, save_windows
from slam_ray.stages.train import train

# local_ray: none of these uses the shared pipeline; make test runs them in its second lane (tests/lanes.py)
pytestmark = [pytest.mark.ray, pytest.mark.local_ray, pytest.mark.slow]


def fake_pack_output(exp, n_windows: int = 64):
    """Packed windows written where `train` looks for them (the pack stage itself is tested elsewhere)."""
    out = stage_dir(exp, "pack")
    out.path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    vocab = exp.vocab_size
    # a learnable stream: a repeating pattern of unit tokens
    pattern = rng.integers(2, vocab, size=17)
    stream = np.resize(pattern, n_windows * exp.pack.context_len).astype(np.uint16)
    save_windows(out.path, stream.reshape(n_windows, -1), stream[: 4 * exp.pack.context_len].reshape(4, -1))
    out.write_manifest({"status": "complete", "stage": "pack", "key": out.key})


def loss_curve(exp) -> dict[int, float]:
    """train/loss per step; after a resume a step may be logged twice: the later value wins."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(exp))
    runs = mlflow.search_runs(experiment_names=[exp.name], filter_string="tags.`slam_ray.stage` = 'train'")
    if runs.empty:
        return {}
    history = mlflow.MlflowClient().get_metric_history(runs.run_id.iloc[0], "train/loss")
    return {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}


@pytest.mark.slow
def test_compiled_checkpointed_model_with_time_based_checkpoints(tmp_path, ray_local):
    """train.compile + train.gradient_checkpointing through the stage, resumable checkpoints every few seconds
    of training: the run learns, reports its periodic checkpoints, and its final checkpoint loads with plain
    transformers (no torch.compile prefixes in the weights)."""
    from transformers import AutoModelForCausalLM

    exp = small_experiment(tmp_path / "w", train={"max_steps": 30, "max_minutes": None, "log_every": 5, "compile": True,
                                                  "gradient_checkpointing": True, "checkpoint_every_minutes": 0.02})
    fake_pack_output(exp)
    out = train(exp)
    curve = loss_curve(exp)
    assert curve[30] < curve[5]
    periodic = [p for p in (out.path / "ray" / "train").glob("checkpoint_*") if (p / "trainer_state.pt").is_file()]
    assert periodic, "no time-based checkpoint was reported"
    model = AutoModelForCausalLM.from_pretrained(out.path / "checkpoint")
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())
    counts = out.read_manifest()["counts"]  # the worker's model was compiled and recomputed its activations
    assert counts["compiled"] == 1 and counts["activation_checkpointing"] == 1


def test_one_worker_ddp_and_fsdp_agree_under_document_masks_and_both_resume_after_a_killed_worker(tmp_path, ray_local):
    """Data parallelism is exact, with `train.document_mask` on windows of several utterances each: 2 DDP workers x
    2 micro-batches of 2 windows see the same global batches as 1 worker x 8 windows (the loss is the mean over the
    whole step's targets, all ranks), so the loss curves agree and both workers' tokens are counted; the final
    validation loss the worker reported is the reloaded checkpoint's under document masking (not the plain one's).
    The one-worker run has its worker SIGKILLed mid-run: Ray Train restarts it, it resumes from the last checkpoint
    (weights, optimizer, schedule, data position) and still ends on the DDP run's curve to 1e-4.
    train.strategy fsdp (FSDP2 over 2 CPU workers x 4 windows, gloo), its worker SIGKILLed mid-run too: it resumes
    from the sharded run's checkpoint (gathered weights and optimizer state), ends on the same step with DDP's curve
    and a final checkpoint that plain transformers loads with DDP's weights (to 1e-3: FSDP's reductions run in
    another order), as DPO's FSDP test checks. Rank 0 of every run writes its curve through the driver's MLflow
    writer. (Each run costs ~15 s of Ray Train start-up here: four runs, not five.)"""
    import torch
    from transformers import AutoModelForCausalLM

    from slam_ray.stages.train import window_inputs

    base = {"max_steps": 40, "max_minutes": None, "log_every": 2, "num_workers": 2, "batch_size": 4,
            "checkpoint_every": 10, "max_failures": 2, "document_mask": True}
    runs = {"one": small_experiment(tmp_path / "one", train={**base, "num_workers": 1, "batch_size": 8}),
            # the reference run is never killed: no resumable checkpoints, no progress validations (neither touches
            # the curve, which the other two must still match)
            "ddp": small_experiment(tmp_path / "ddp", ray={"worker_cpus": 0.5},
                                    train={**base, "strategy": "ddp", "batch_size": 2, "grad_accum": 2,
                                           "checkpoint_every": None, "val_reports": 0})}
    runs["fsdp"] = small_experiment(tmp_path / "fsdp", ray={"worker_cpus": 0.5}, train={**base, "strategy": "fsdp"})
    for name in ("one", "ddp", "fsdp"):
        utterance_pack_output(runs[name], n_utterances=1500)
    assert len(PackedWindows(stage_dir(runs["one"], "pack").path, "train")) >= 40 * 8  # the run stays in epoch 1
    train(runs["ddp"])
    for name in ("one", "fsdp"):
        victim, errors = kill_a_worker_during(lambda name=name: train(runs[name]),
                                              lambda name=name: 14 <= max(loss_curve(runs[name]), default=0) < 34)
        assert victim is not None, f"the {name} run finished before its worker could be killed"
        assert not errors, errors
        # it resumed from a checkpoint (>= step 10), not from scratch: the steps before the first are logged once
        # (a restart from step 0 ends on the same seeded curve, so the curve alone would not tell)
        assert logged_steps(runs[name], "train", "train/loss")[2] == 1
        assert json.loads(stage_dir(runs[name], "train").manifest_path.read_text())["counts"]["steps"] == 40
    one, ddp, fsdp = (loss_curve(runs[name]) for name in ("one", "ddp", "fsdp"))
    assert sorted(one) == sorted(ddp) == sorted(fsdp) == list(range(2, 41, 2))
    # the workers wrote those curves through this driver's MLflow writer (they import no MLflow of their own)
    writer = ray_local.get_actor(driver_writer(), namespace="slam_ray")
    assert {tracking_uri(exp) for exp in runs.values()} <= set(ray_local.get(writer.uris.remote()))
    assert ddp[40] < ddp[2]
    counts = json.loads(stage_dir(runs["ddp"], "train").manifest_path.read_text())["counts"]
    assert counts["steps"] == 40
    assert counts["tokens"] == 40 * 2 * 2 * 2 * runs["ddp"].pack.context_len  # both workers' batches count
    np.testing.assert_allclose([ddp[s] for s in sorted(ddp)], [one[s] for s in sorted(one)], rtol=1e-4)
    np.testing.assert_allclose([fsdp[s] for s in sorted(fsdp)], [ddp[s] for s in sorted(ddp)], rtol=1e-3)
    weights = {name: AutoModelForCausalLM.from_pretrained(stage_dir(runs[name], "train").path / "checkpoint").state_dict()
               for name in ("ddp", "fsdp")}
    assert weights["fsdp"].keys() == weights["ddp"].keys()
    for key, value in weights["ddp"].items():
        torch.testing.assert_close(weights["fsdp"][key], value, rtol=1e-3, atol=1e-4)

    manifest = json.loads(stage_dir(runs["one"], "train").manifest_path.read_text())
    model = AutoModelForCausalLM.from_pretrained(stage_dir(runs["one"], "train").path / "checkpoint").eval()
    val = PackedWindows(stage_dir(runs["one"], "pack").path, "val")
    with torch.no_grad():
        masked = model(**window_inputs(val, np.arange(len(val)), document_mask=True)).loss.item()
        plain = model(**window_inputs(val, np.arange(len(val)), document_mask=False)).loss.item()
    assert masked == pytest.approx(manifest["metrics"]["val/loss_final"], rel=1e-5)
    assert abs(plain - masked) > 1e-3


def test_time_budget_sizes_the_schedule_and_a_twist_run_stops_at_it_with_the_trained_model_saved(tmp_path, ray_local):
    """TWIST from a text LM whose RoPE theta is 1e6, trained with `rope_theta: 10000` under a 6-second budget and a
    cosine schedule: the schedule is re-planned from measured throughput to fit the budget (warmup peak on a log
    step, min_lr at the end), the run stops at the budget (checked every step) and logs its stopping step even
    between log steps, and its saved checkpoint, reloaded with plain transformers, is the model that trained — its
    validation loss equals the one the worker measured on the trained object. (One run for both: a Ray Train run
    costs ~20 s of start-up here.)"""
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from slam_ray.speech.units import PAD_ID

    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=64,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6})).save_pretrained(tmp_path / "lm")
    budget_s = 6.0
    # val_reports 0: ten validation reports would be a large share of a 6-second budget of 10-ms steps
    exp = small_experiment(tmp_path / "w", train={"max_steps": None, "max_minutes": budget_s / 60, "log_every": 10,
                                                  "val_reports": 0,
                                                  "schedule": {"name": "cosine", "warmup_steps": 10, "min_lr": 1e-5},
                                                  "model": {"init": "twist", "base": str(tmp_path / "lm"),
                                                            "rope_theta": 10_000.0}})
    fake_pack_output(exp)
    manifest = json.loads(train(exp).manifest_path.read_text())
    assert manifest["metrics"]["train/seconds"] < budget_s * 1.5
    mlflow.set_tracking_uri(tracking_uri(exp))
    run = mlflow.search_runs(experiment_names=[exp.name]).iloc[0]
    planned = int(run["params.schedule.total_steps"])  # after the re-plan from measured throughput
    steps = manifest["counts"]["steps"]
    assert manifest["counts"]["compiled"] == 0 and manifest["counts"]["activation_checkpointing"] == 0  # not asked
    # The budget is enforced every step, so a machine that slows after the throughput probe stops a little
    # before the plan (seen here under load: 32 of 36); the plan must still be sized to the budget.
    assert planned > 5 and steps >= 0.8 * planned
    # every 10th step and the stopping step (rarely itself a multiple of 10) are logged
    assert sorted(loss_curve(exp)) == sorted({*range(10, steps + 1, 10), steps})
    lrs = mlflow.MlflowClient().get_metric_history(run.run_id, "train/lr")
    if steps == planned:  # the schedule ran to its end: the lr reached min_lr exactly at the budget
        assert lrs[-1].value == pytest.approx(1e-5, rel=1e-3)
    # warmup ends at step 10, a log step: its lr is the peak (under a ratio warmup, log steps could miss the peak)
    assert max(m.value for m in lrs) == pytest.approx(exp.train.optimizer.lr, rel=1e-3)
    assert all(m.value <= exp.train.optimizer.lr * (1 + 1e-6) for m in lrs)

    model = AutoModelForCausalLM.from_pretrained(stage_dir(exp, "train").path / "checkpoint").eval()
    assert model.config.rope_parameters["rope_theta"] == 10_000.0
    x = torch.from_numpy(PackedWindows(stage_dir(exp, "pack").path, "val")[:].astype(np.int64))
    with torch.no_grad():
        reloaded = model(input_ids=x, labels=x.masked_fill(x == PAD_ID, -100)).loss.item()
    assert reloaded == pytest.approx(manifest["metrics"]["val/loss_final"], rel=1e-5)

    # The driver stopped after the run's final report, before the stage's manifest said complete: the same command
    # again finds the final checkpoint and trains nothing (it restarted from the TWIST init and spent the budget
    # again) — read from the run's folder, with no Ray Train run started for it
    out = stage_dir(exp, "train")
    out.write_manifest({**manifest, "status": "running"})
    listing = (out.path / "checkpoints.json").read_text()
    controllers = sum(a.class_name == "TrainController" for a in actors_of(ray_local))
    again = json.loads(train(exp).manifest_path.read_text())
    assert sum(a.class_name == "TrainController" for a in actors_of(ray_local)) == controllers
    assert again["status"] == "complete" and again["counts"] == manifest["counts"]
    assert again["metrics"]["val/loss_final"] == manifest["metrics"]["val/loss_final"]
    assert (out.path / "checkpoints.json").read_text() == listing  # no second init or final
    assert set(logged_steps(exp, "train", "train/loss").values()) == {1}  # no step trained twice
    rerun = AutoModelForCausalLM.from_pretrained(out.path / "checkpoint")
    assert all(torch.equal(a, b) for a, b in zip(rerun.parameters(), model.parameters(), strict=True))


def utterance_pack_output(exp, n_utterances: int = 300) -> None:
    """A pack output of real utterances (random lengths, a learnable repeating pattern of units), written by the
    pack stage's own writer, so windows hold several documents each."""
    from slam_ray.lm.packed import utterance_stream, write_index, write_shard

    out = stage_dir(exp, "pack")
    out.path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=n_utterances)
    values = np.resize(rng.integers(0, exp.vocab_size - 2, size=13), int(lengths.sum())).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    rows = {}
    for split, order in (("train", np.arange(20, n_utterances)), ("val", np.arange(20))):
        tokens, starts = utterance_stream(values, offsets, order)
        rows[split] = [write_shard(out.path, split, 0, tokens, starts, exp.pack.context_len)]
    write_index(out.path, exp.pack.context_len, rows)
    out.write_manifest({"status": "complete", "stage": "pack", "key": out.key})


def test_training_on_an_interleaved_pack_starts_from_every_text_row_and_masks_the_merged_pad(tmp_path, ray_local):
    """pack.interleave through Ray Train: the model is the TWIST base grown to the merged vocabulary (its step-0
    checkpoint holds every text row of the base), and the validation loss the worker reports is the reloaded
    checkpoint's with the merged `<pad>` masked — not with slam_ray's speech-only pad id 0, which is a text token
    here (the tokenizer's `<|endoftext|>`, its EOS). The worker computes its losses with the fused linear
    cross-entropy (`loss_chunk_tokens`): the reloaded model's own head and loss give the same validation loss."""
    import torch
    from helpers import interleaved_experiment
    from transformers import AutoModelForCausalLM

    from slam_ray.stages.pack import pack
    from slam_ray.stages.train import window_inputs

    exp, _, _ = interleaved_experiment(tmp_path, train={"max_steps": 10, "log_every": 5, "val_reports": 0,
                                                        "document_mask": True, "loss_chunk_tokens": 7})
    pack(exp)
    out = train(exp)
    manifest = json.loads(out.manifest_path.read_text())
    assert manifest["counts"]["steps"] == 10
    index = json.loads((stage_dir(exp, "pack").path / "index.json").read_text())["vocabulary"]
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").get_input_embeddings().weight
    listing = json.loads((out.path / "checkpoints.json").read_text())
    init = AutoModelForCausalLM.from_pretrained(next(c["path"] for c in listing if c["step"] == 0))
    assert init.config.vocab_size == index["size"] and init.config.pad_token_id == index["pad_id"]
    torch.testing.assert_close(init.get_input_embeddings().weight[: base.shape[0]], base, rtol=0, atol=0)

    model = AutoModelForCausalLM.from_pretrained(out.path / "checkpoint").eval()
    val = PackedWindows(stage_dir(exp, "pack").path, "val")
    assert val.pad_id == index["pad_id"] and (val[:] == val.pad_id).any()  # the split ends in padding
    inputs = window_inputs(val, np.arange(len(val)), document_mask=True)
    with torch.no_grad():
        masked = model(**inputs).loss.item()
        wrong = model(**{**inputs, "labels": inputs["labels"].masked_fill(inputs["input_ids"] == 0, -100)}).loss.item()
    assert masked == pytest.approx(manifest["metrics"]["val/loss_final"], rel=1e-5)
    assert abs(wrong - masked) > 1e-4
