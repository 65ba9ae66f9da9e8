"""Search-space YAML: parsing, validation against the experiment schema (before any trial), Tune conversion."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slam_ray.config import load_experiment, with_values
from slam_ray.core.stage_io import stage_key
from slam_ray.errors import ConfigError
from slam_ray.sweeps.search_space import SearchSpace, check_field_path, load_space, validate_space

SHIPPED = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "search_spaces").glob("*.yaml"))


def space_file(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_the_issue_spaces_ship():
    assert {"optimizer", "schedule", "data_mix", "model_init", "context", "dpo_budget"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_space_is_valid_for_its_recipe(name):
    space = load_space(name)
    assert space.description
    recipe = "slam" if name in ("model_init", "context") else "quickstart"
    overrides = space.overrides()
    if name == "dpo_budget":
        overrides.append("stages=[synth,extract,pack,train,dpo,eval]")
    if name == "data_mix":  # the quickstart has one dataset; name three so the mix can address them
        overrides.append('extract.inputs=[{name: librispeech, path: "@synth"}]')
    exp = load_experiment(recipe, overrides)
    validate_space(space, exp)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("train.optimizer.lrr", "train.optimizer has no field 'lrr'. Fields there: name, lr"),
        ("trian.optimizer.lr", "the experiment has no field 'trian'"),
        ("train.optimizer.lr.x", "train.optimizer.lr is a value, not a section"),
        ("train.optimizer", "is a whole section; sweep one of its fields, e.g. train.optimizer.name"),
        ("pack.mix.stories.x", "address one entry at most"),
    ],
)
def test_a_field_that_does_not_exist_is_named(key, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        check_field_path(key)


def test_mapping_entries_and_nested_fields_are_fields():
    for key in ("pack.mix.stories", "pack.epochs.librispeech", "extract.tokenizer.n_units", "train.model.init"):
        check_field_path(key)


def test_fields_of_an_optional_section_are_swept_into_the_model_that_trains(tmp_path):
    """pack.interleave and synth.preferences may be None: their fields are still fields (the interleaving λ/η
    were refused as "pack.interleave is a value"), the section itself can be swept whole (null or a section), and
    each trial's value reaches the experiment it packs with."""
    for key in ("pack.interleave.lam", "pack.interleave.eta", "pack.interleave", "synth.preferences.n_pairs"):
        check_field_path(key)
    with pytest.raises(ConfigError, match="pack.interleave has no field 'lamda'"):
        check_field_path("pack.interleave.lamda")
    exp = load_experiment("quickstart_interleaved")
    space = load_space(space_file(tmp_path, {"params": {"pack.interleave.lam": {"grid": [2.0, 20.0]},
                                                         "pack.interleave.eta": {"uniform": [0.2, 0.6]}}}))
    validate_space(space, exp)
    trials = [with_values(exp, {"pack.interleave.lam": lam, "pack.interleave.eta": 0.5}, "trial") for lam in (2.0, 20.0)]
    assert [(t.pack.interleave.lam, t.pack.interleave.eta) for t in trials] == [(2.0, 0.5), (20.0, 0.5)]
    assert trials[0].pack.interleave.tokenizer == exp.pack.interleave.tokenizer  # the rest of the section kept
    assert len({stage_key(t, "pack") for t in trials}) == 2  # each packs its own spans


def test_values_are_validated_with_the_field_named(tmp_path):
    exp = load_experiment("quickstart")
    bad_lr = load_space(space_file(tmp_path, {"params": {"train.optimizer.lr": {"grid": [1e-3, -1]}}}))
    with pytest.raises(ConfigError, match=r"train\.optimizer\.lr.*greater than 0"):
        validate_space(bad_lr, exp)
    bad_name = load_space(space_file(tmp_path, {"params": {"train.optimizer.name": {"choice": ["adamw", "sgd"]}}}))
    with pytest.raises(ConfigError, match=r"train\.optimizer\.name"):
        validate_space(bad_name, exp)
    # a range is checked at both ends: warmup_ratio must stay < 1
    bad_range = load_space(space_file(tmp_path, {"params": {"train.schedule.warmup_ratio": {"uniform": [0.0, 1.5]}}}))
    with pytest.raises(ConfigError, match="warmup_ratio"):
        validate_space(bad_range, exp)
    # and inside: a continuous range on an integer field passed with its whole ends, then every sample (133.7) failed
    for kind in ("uniform", "loguniform"):
        fractional = load_space(space_file(tmp_path, {"params": {"train.model.hidden_size": {kind: [64, 256]}}}))
        with pytest.raises(ConfigError, match=r"hidden_size.*integer"):
            validate_space(fractional, exp)
    validate_space(load_space(space_file(tmp_path, {"params": {"train.model.hidden_size": {"randint": [64, 257]}}})), exp)


def test_dependent_fields_are_validated_together(tmp_path):
    exp = load_experiment("quickstart")
    alone = load_space(space_file(tmp_path, {"params": {"train.model.init": {"grid": ["random", "twist"]}}}))
    with pytest.raises(ConfigError, match="init 'twist' needs `base`"):
        validate_space(alone, exp)
    together = load_space(space_file(tmp_path, {"params": {"train.model.init": {"grid": ["random", "twist"]},
                                                            "train.model.base": {"grid": ["/some/local/lm"]}}}))
    validate_space(together, exp)


def test_malformed_spaces_say_what_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="give exactly one of grid, choice"):
        load_space(space_file(tmp_path, {"params": {"train.optimizer.lr": {"grid": [1], "choice": [2]}}}))
    with pytest.raises(ConfigError, match="low < high"):
        load_space(space_file(tmp_path, {"params": {"train.optimizer.lr": {"loguniform": [1e-2, 1e-3]}}}))
    with pytest.raises(ConfigError, match="unknown sweep field"):
        load_space(space_file(tmp_path, {"params": {"train.optimizer.lr": {"grid": [1]}}, "sweep": {"sheduler": "asha"}}))
    with pytest.raises(ConfigError, match="params"):
        load_space(space_file(tmp_path, {"description": "nothing swept"}))


def test_a_space_that_changes_no_stage_of_the_experiment_is_refused(tmp_path):
    space = load_space(space_file(tmp_path, {"params": {"dpo.beta": {"grid": [0.1, 0.5]}}}))
    without_dpo = load_experiment("quickstart", ["stages=[synth,extract,pack,train,eval]"])
    with pytest.raises(ConfigError, match="every trial would be the same"):
        validate_space(space, without_dpo)
    validate_space(space, load_experiment("quickstart"))  # the quickstart runs dpo: fine


def test_optuna_refuses_grid_axes(tmp_path):
    space = load_space(space_file(tmp_path, {"params": {"train.optimizer.lr": {"grid": [1e-3, 3e-3]}},
                                             "sweep": {"search": "optuna"}}))
    with pytest.raises(ConfigError, match="use `choice`"):
        validate_space(space, load_experiment("quickstart", space.overrides()))


def test_tune_domains_and_sweep_defaults(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer

    space = SearchSpace.model_validate({
        "name": "s", "sweep": {"scheduler": "asha", "num_samples": 3},
        "params": {"a.b": {"grid": [1, 2]}, "c.d": {"choice": ["x"]}, "e.f": {"loguniform": [1e-4, 1e-2]},
                   "g.h": {"uniform": [0, 1]}, "i.j": {"randint": [1, 4]}}})
    tune_space = space.to_tune()
    assert tune_space["a.b"] == {"grid_search": [1, 2]}
    assert isinstance(tune_space["c.d"], Categorical)
    assert isinstance(tune_space["e.f"], Float) and isinstance(tune_space["g.h"], Float)
    assert isinstance(tune_space["i.j"], Integer) and tune_space["i.j"].upper == 4
    # the space's sweep block sits between the experiment file and the user's --set
    exp = load_experiment("quickstart", [*space.overrides(), "sweep.num_samples=5"])
    assert exp.sweep.scheduler == "asha" and exp.sweep.num_samples == 5


def test_search_and_scheduler_objects_follow_the_sweep_section():
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    from slam_ray.sweeps.sweep import _scheduler, _search_alg

    exp = load_experiment("quickstart", ["sweep.scheduler=asha", "sweep.grace_percent=30"])
    asha = _scheduler(exp)
    assert isinstance(asha, ASHAScheduler) and asha._time_attr == "progress" and asha.metric == "val/loss"
    assert not asha._stop_last_trials  # a trial at 100% must still be evaluated
    median = _scheduler(load_experiment("quickstart", ["sweep.scheduler=median"]))
    assert isinstance(median, MedianStoppingRule)
    # too few trials to compare and one waiting: Tune's rule pauses the trial, which (no Tune checkpoint) would
    # start again from scratch; slam_ray's lets it run
    from types import SimpleNamespace

    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    class Stub:  # a trial as the rule reads it: its status, and a dict key
        def __init__(self, status: str) -> None:
            self.status = status

    controller = SimpleNamespace(get_live_trials=lambda: [Stub(Trial.PENDING)])
    running = Stub(Trial.RUNNING)
    plain = MedianStoppingRule(time_attr="progress", metric="val/loss", mode="min", grace_period=20)
    assert plain._on_insufficient_samples(controller, running, 30.0) == TrialScheduler.PAUSE
    assert median._on_insufficient_samples(controller, running, 30.0) == TrialScheduler.CONTINUE
    assert _scheduler(load_experiment("quickstart")) is None
    assert isinstance(_search_alg(exp), BasicVariantGenerator)

    # Optuna learns from the final metric and ignores the validation reports that lack it
    optuna_exp = load_experiment("quickstart", ["sweep.search=optuna", "sweep.metric=eval/word_order/accuracy"])
    searcher = _search_alg(optuna_exp)
    assert isinstance(searcher, OptunaSearch)
    space = SearchSpace.model_validate({"name": "s", "params": {"train.optimizer.lr": {"loguniform": [1e-4, 1e-2]}}})
    searcher.set_search_properties(None, None, space.to_tune())
    config = searcher.suggest("t1")
    assert 1e-4 <= config["train.optimizer.lr"] <= 1e-2
    searcher.on_trial_result("t1", {"progress": 20.0, "val/loss": 3.1, "training_iteration": 1})  # no KeyError
    searcher.on_trial_complete("t1", {"eval/word_order/accuracy": 0.8, "training_iteration": 2})
    trials = searcher._ot_study.trials
    assert len(trials) == 1 and trials[0].value == 0.8


def _trial_configs(space: SearchSpace, exp):
    """The experiments a sweep's trials run, in Tune's order, without Ray: Tune's variant generator yields
    `generate_variants` of the param space once per sample."""
    from ray.tune.search.variant_generator import generate_variants

    from slam_ray.sweeps.search_space import trial_experiment, tune_param_space

    param_space, num_samples = tune_param_space(space, exp)
    return [trial_experiment(exp, spec) for _ in range(num_samples) for _, spec in generate_variants(param_space)]


def test_grid_repeats_get_their_own_seeds_stage_keys_and_runs():
    from slam_ray.core.stage_io import stage_key
    from slam_ray.sweeps.search_space import trial_count

    space = load_space("optimizer")
    exp = load_experiment("quickstart", [*space.overrides(), "sweep.num_samples=3"])
    validate_space(space, exp)
    trials = _trial_configs(space, exp)
    assert len(trials) == trial_count(space, exp) == 9 * 3  # the count an interrupted sweep is checked against
    # the whole grid runs before the next repeat starts; repeat r adds r to the training and DPO seeds
    assert [t.train.seed for t in trials] == [0] * 9 + [1] * 9 + [2] * 9
    assert [t.dpo.seed for t in trials] == [exp.dpo.seed + r for r in (0, 1, 2) for _ in range(9)]
    # so every trial trains, tunes and is evaluated on its own (its own stage outputs and MLflow runs) ...
    for stage in ("train", "dpo", "eval"):
        assert len({stage_key(t, stage) for t in trials}) == 27, stage
    # ... on the same units, split and evaluation pairs
    assert len({stage_key(t, "pack") for t in trials}) == 1
    assert {t.eval.seed for t in trials} == {exp.eval.seed}


def test_one_repeat_and_random_search_leave_the_seeds_alone(tmp_path):
    space = load_space("optimizer")
    assert {t.train.seed for t in _trial_configs(space, load_experiment("quickstart", space.overrides()))} == {0}
    lr = load_space(space_file(tmp_path, {"params": {"train.optimizer.lr": {"loguniform": [1e-4, 1e-2]}},
                                          "sweep": {"search": "random", "num_samples": 4}}))
    trials = _trial_configs(lr, load_experiment("quickstart", lr.overrides()))
    assert len(trials) == 4 and {t.train.seed for t in trials} == {0}


def test_repeats_and_a_swept_seed_are_refused_together(tmp_path):
    space = load_space(space_file(tmp_path, {"params": {"train.seed": {"grid": [0, 1]}}, "sweep": {"num_samples": 2}}))
    with pytest.raises(ConfigError, match="repeats would collide"):
        validate_space(space, load_experiment("quickstart", space.overrides()))


def test_the_quickstarts_first_sweep_fits_the_two_cores_it_targets(monkeypatch, capsys):
    """`slam-ray sweep quickstart --space optimizer` as documented: one trial (its driver + its trainer, or its
    DPO worker) fits a 2-CPU Ray, and nothing is said about concurrency."""
    from slam_ray.errors import SlamError
    from slam_ray.sweeps.sweep import check_trial_fits

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    space = load_space("optimizer")
    exp = load_experiment("quickstart", space.overrides())
    assert "dpo" in exp.stages
    check_trial_fits(exp, {"CPU": 2.0})
    assert capsys.readouterr().out == ""
    # a trainer asking for both cores leaves no room for the trial's driver: refused, with a value that fits
    with pytest.raises(SlamError, match=r"one trial needs 2\.1 CPUs") as refused:
        check_trial_fits(load_experiment("quickstart", [*space.overrides(), "ray.worker_cpus=2"]), {"CPU": 2.0})
    suggested = str(refused.value).rsplit("--set ", 1)[1]
    check_trial_fits(load_experiment("quickstart", [*space.overrides(), suggested]), {"CPU": 2.0})
    # two concurrent trials of two workers each on 4 CPUs: said to run one at a time
    two = load_experiment("quickstart", [*space.overrides(), "train.num_workers=2", "ray.worker_cpus=1",
                                         "sweep.max_concurrent_trials=2"])
    check_trial_fits(two, {"CPU": 4.0})
    assert "1 of sweep.max_concurrent_trials 2 fit" in capsys.readouterr().out
    # DPO's workers count too, at train's resources each: 3 DPO workers of 0.9 CPUs after one training worker
    # need 2.8 CPUs (counted as one of 0.9 before, the trial was let in and its DPO waited forever)
    wide_dpo = load_experiment("quickstart", [*space.overrides(), "dpo.num_workers=3", "ray.worker_cpus=0.9"])
    with pytest.raises(SlamError, match=r"one trial needs 2\.8 CPUs .*3 Ray Train workers") as refused:
        check_trial_fits(wide_dpo, {"CPU": 2.0})
    suggested = str(refused.value).rsplit("--set ", 1)[1]
    assert suggested == "ray.worker_cpus=0.6"
    check_trial_fits(load_experiment("quickstart", [*space.overrides(), "dpo.num_workers=3", suggested]), {"CPU": 2.0})


def test_isoflop_trials_share_the_fixed_fields_and_each_has_its_own_budget_and_size():
    """The `fixed:` block reaches every trial (stages without dpo/eval, no step cap) and the grid gives 3 budgets x 4
    sizes; a trial's FLOP budget then sets its steps: the larger model reads fewer tokens for the same budget."""
    from slam_ray.stages.train import budget_steps
    from slam_ray.sweeps.search_space import trial_experiment

    space = load_space("isoflop")
    exp = load_experiment("quickstart", space.overrides())
    validate_space(space, exp)
    assert exp.stages == ["synth", "extract", "pack", "train"] and exp.train.max_steps is None
    assert exp.train.model.num_layers == 2
    trials = [trial_experiment(exp, {"train.max_flops": c, "train.model.hidden_size": h})
              for c in space.params["train.max_flops"].grid for h in space.params["train.model.hidden_size"].grid]
    assert len({(t.train.max_flops, t.train.model.hidden_size) for t in trials}) == 12
    # each trial's own model, as train builds and counts it: at one FLOP budget its steps fall as it grows, and
    # each trial spends its budget (6 N D, to one step's worth)
    from slam_ray.lm.model import build_model, count_parameters

    tokens_per_step = exp.train.batch_size * exp.pack.context_len
    for budget in sorted({t.train.max_flops for t in trials}):
        row = [t for t in trials if t.train.max_flops == budget]
        sizes = [count_parameters(build_model(t.train.model, t.vocab_size)) for t in row]
        steps = [budget_steps(t.train, tokens_per_step, n) for t, n in zip(row, sizes, strict=True)]
        assert sizes == sorted(sizes) and len(set(sizes)) == 4  # the grid's hidden sizes, smallest first
        assert steps == sorted(steps, reverse=True) and steps[0] > 3 * steps[-1] > 0
        for n, k in zip(sizes, steps, strict=True):
            assert 6 * n * tokens_per_step * (k - 1) < budget <= 6 * n * tokens_per_step * k


def test_a_space_without_fixed_fields_overrides_only_the_sweep_section(tmp_path):
    space = load_space(space_file(tmp_path, {"params": {"train.optimizer.lr": {"grid": [1e-3]}},
                                             "sweep": {"metric": "val/loss"}}))
    assert space.overrides() == ['sweep.metric="val/loss"']


def test_a_sweep_metric_no_trial_reports_is_refused_with_the_fix():
    """Tune's strict metric check is off (trials report eval metrics only at their end), so a name no trial
    reports went unseen: Optuna pruned every trial (a random search), a scheduler stopped none, the report had no
    best trial. The default metric needs word_order among the eval tasks."""
    from slam_ray.sweeps.search_space import check_sweep_metrics

    check_sweep_metrics(load_experiment("quickstart"))  # eval/word_order/accuracy, word_order evaluated
    check_sweep_metrics(load_experiment("quickstart", ["sweep.metric=eval/agreement/init_accuracy"]))
    with pytest.raises(ConfigError, match=r"eval\.checkpoints \['init'\] has no 'final'.*add final"):
        check_sweep_metrics(load_experiment("quickstart", ["eval.checkpoints=[init]"]))
    with pytest.raises(ConfigError, match=r"eval\.tasks has no 'word_order' \(it has lexical\).*sweep\.metric=eval/lexical"):
        check_sweep_metrics(load_experiment("quickstart", ["eval.tasks=[lexical]"]))
    with pytest.raises(ConfigError, match="runs no eval stage; e.g. --set sweep.metric=val/loss"):
        check_sweep_metrics(load_experiment("quickstart", ["stages=[synth,extract,pack,train]"]))
    check_sweep_metrics(load_experiment("quickstart", ["stages=[synth,extract,pack,train]", "sweep.metric=val/loss",
                                                       "sweep.mode=min"]))
    # a loss with the default mode max: the search chased the worst trials and the report called the worst best
    with pytest.raises(ConfigError, match=r"sweep\.mode is max but sweep\.metric 'val/loss' is a loss.*sweep\.mode=min"):
        check_sweep_metrics(load_experiment("quickstart", ["sweep.metric=val/loss"]))
    with pytest.raises(ConfigError, match=r"sweep\.stop_mode=min"):
        check_sweep_metrics(load_experiment("quickstart", ["sweep.scheduler=asha", "sweep.stop_mode=max"]))
    with pytest.raises(ConfigError, match="'val_loss' is not a figure a trial reports"):
        check_sweep_metrics(load_experiment("quickstart", ["sweep.metric=val_loss"]))
    with pytest.raises(ConfigError, match="stop_metric 'eval/lexical/accuracy' is not reported while a trial trains"):
        check_sweep_metrics(load_experiment("quickstart", ["sweep.scheduler=asha", "sweep.stop_metric=eval/lexical/accuracy"]))
