from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slam_ray.config import Experiment, load_experiment, parse_override, recipe_names
from slam_ray.core.storage import workdir_path
from slam_ray.core.tracking import tracking_uri
from slam_ray.errors import ConfigError


def write(tmp_path: Path, data: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_recipes_validate():
    assert {"quickstart", "slam", "slam_scaled"} <= set(recipe_names())
    for name in recipe_names():
        exp = load_experiment(name)
        assert exp.name == name


def test_quickstart_interleaved_differs_from_the_quickstart_in_its_data_only_and_has_its_vocabulary():
    """The interleaving ablation at equal tokens: the same speech, tokenizer, model and step budget as the quickstart
    (so the same tokens per step and in all), only the pack (interleaved, the grammar's BPE) and the eval tasks
    (cross-modal ones added; no DPO) differ; its merged vocabulary is the grammar BPE's 512 + 200 units + 3."""
    from slam_ray.core.tracking import flatten
    from slam_ray.lm.vocabulary import GRAMMAR_TOKENIZER_SIZE, grammar_tokenizer, vocabulary_of

    speech, mixed = load_experiment("quickstart"), load_experiment("quickstart_interleaved")
    a, b = flatten(speech.model_dump(mode="json")), flatten(mixed.model_dump(mode="json"))
    differ = {k.split(".")[0] + "." + k.split(".")[1] if "." in k else k for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert {k for k in differ if not k.startswith(("dpo.", "name"))} == {"stages", "pack.interleave", "eval.tasks"}
    vocab = vocabulary_of(mixed)
    assert vocab.size == GRAMMAR_TOKENIZER_SIZE + 200 + 3 and vocab.text_size == len(grammar_tokenizer())
    assert grammar_tokenizer().get_vocab() == grammar_tokenizer().get_vocab()  # trained the same every time


def test_slam_interleaved_is_slam_with_interleaved_data_at_the_same_tokens_per_step_and_budget():
    """Slamming §4.3: the `slam` model, budget and tokens per step; interleaved data (slamkit's sampler), a text-only
    dataset and about equal shares of interleaved / speech-only / text tokens; slamkit's inter-scale lr."""
    from slam_ray.core.tracking import flatten

    slam, mixed = load_experiment("slam"), load_experiment("slam_interleaved")
    tokens = lambda e: e.train.batch_size * e.train.grad_accum * e.pack.context_len * e.train.num_workers  # noqa: E731
    assert tokens(mixed) == tokens(slam) == 81_920
    assert (mixed.train.max_minutes, mixed.train.max_steps, mixed.train.model) == (
        slam.train.max_minutes, slam.train.max_steps, slam.train.model)
    a, b = flatten(slam.model_dump(mode="json")), flatten(mixed.model_dump(mode="json"))
    differ = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
    allowed = ("name", "stages", "extract.inputs", "pack.", "train.optimizer.lr", "train.batch_size",
               "train.grad_accum", "eval.tasks", "eval.generation", "dpo.")  # no generate: not built for interleaved
    assert all(k.startswith(allowed) for k in differ), sorted(k for k in differ if not k.startswith(allowed))
    interleaved = sum(mixed.pack.mix[d] for d in mixed.pack.interleave.datasets)
    assert all(abs(share - 1 / 3) < 0.01 for share in (interleaved, mixed.pack.mix["librilight"], mixed.pack.mix["text"]))


def test_defaults_and_derived_locations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = Experiment(name="demo")
    assert workdir_path(exp) == tmp_path / "slam_runs" / "demo"
    assert tracking_uri(exp) == f"sqlite:///{tmp_path / 'slam_runs' / 'demo' / 'mlflow.db'}"
    assert exp.tracking_experiment == "demo"
    assert exp.extract.inputs == ["@synth"]
    assert exp.ray.address is None and exp.ray.num_cpus is None


def test_overrides_are_typed():
    exp = load_experiment("quickstart", ["train.optimizer.lr=3e-4", "train.max_steps=12", "eval.tasks=[lexical]",
                                         "ray.num_cpus=1.5", "train.model.init=random", "workdir=/tmp/x"])
    assert exp.train.optimizer.lr == pytest.approx(3e-4)
    assert exp.train.max_steps == 12
    assert exp.eval.tasks == ["lexical"]
    assert exp.ray.num_cpus == 1.5
    assert exp.workdir == "/tmp/x"


def test_parse_override_yaml_values():
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="malformed"):
        parse_override("train..lr=1")


@pytest.mark.parametrize(
    ("override", "field"),
    [("train.optimizr.lr=1", "train.optimizr"), ("bogus=1", "bogus"), ("train.batch_size=abc", "train.batch_size"),
     ("synth.backend=festival", "synth.backend"), ("train.schedule.warmup_ratio=2", "train.schedule.warmup_ratio"),
     ("extract.tokenizer.kind=hubert", "extract.tokenizer")],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_experiment("quickstart", [override])
    assert f"- {field}" in str(err.value)


def test_unknown_key_in_file(tmp_path):
    path = write(tmp_path, {"name": "x", "train": {"lr": 1e-3}})
    with pytest.raises(ConfigError, match=r"train\.lr: unknown key"):
        load_experiment(str(path))


def test_override_into_a_value_is_refused():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_experiment("quickstart", ["name.x=1"])


def test_text_generation_without_interleaving_is_refused_naming_the_fix():
    generate = 'eval.tasks=["lexical", {"task": "generate", "path": "prompts"}]'
    with pytest.raises(ConfigError, match="modality: text needs an interleaved model .*use modality: speech"):
        load_experiment("quickstart", [generate, "eval.generation.modality=text"])
    assert load_experiment("quickstart_interleaved", [generate, "eval.generation.modality=text"])
    assert load_experiment("quickstart", ["eval.generation.modality=text"])  # no generate task: nothing to refuse


def test_missing_experiment_lists_recipes():
    with pytest.raises(ConfigError, match="quickstart"):
        load_experiment("no_such_recipe")


def test_budget_required():
    with pytest.raises(ConfigError, match="max_steps, max_tokens, max_flops or max_minutes"):
        load_experiment("quickstart", ["train.max_minutes=null", "train.max_steps=null"])


def test_a_min_lr_above_the_lr_is_refused():
    """A decay from lr to a min_lr above it raises the lr over the run (a swept lr below the recipe's min_lr)."""
    from slam_ray.lm.optim import lr_factor

    sched = load_experiment("quickstart").train.schedule
    assert lr_factor(999, 1000, 10, sched, 1e-6) > lr_factor(10, 1000, 10, sched, 1e-6)  # what it would do
    with pytest.raises(ConfigError, match=r"train.*min_lr 1e-05 is above optimizer.lr 1e-06.*set min_lr <= lr"):
        load_experiment("quickstart", ["train.optimizer.lr=1e-6"])
    load_experiment("quickstart", ["train.optimizer.lr=1e-5"])  # equal: a constant lr


def test_a_grammar_text_dataset_cannot_train_on_the_sentences_eval_holds_out():
    """Eval and DPO draw their pairs from the grammar sentences under synth.corpus.held_out_percent; a grammar text
    dataset holding out fewer would pack the rest of them as training text."""
    from slam_ray.evals.grammar import generate_sentences, is_held_out

    text = ['pack.text=[{name: words, corpus: {source: grammar, n_sentences: 500, held_out_percent: 5}}]',
            "pack.interleave={tokenizer: '@grammar'}"]
    trained = generate_sentences(500, 0, 5)
    assert any(is_held_out(s, 10) for s in trained)  # what a 5% text set would have trained on of a 10% eval set
    with pytest.raises(ConfigError, match=r"pack.text\[0\].corpus.held_out_percent 5 is below "
                                          r"synth.corpus.held_out_percent 10.*set it to 10"):
        load_experiment("quickstart", ["synth.corpus.held_out_percent=10", *text])
    load_experiment("quickstart", ["synth.corpus.held_out_percent=5", *text])


def test_name_defaults_to_file_stem(tmp_path):
    exp = load_experiment(str(write(tmp_path, {"stages": ["synth"]}, "my-exp.yaml")))
    assert exp.name == "my-exp"


def test_an_input_is_named_by_its_folder_or_file_stem_without_a_uris_query():
    """The default dataset name keys pack.mix and MLflow metrics (`count/mix.<name>.share`): an S3 URI's endpoint
    query once made it `corpus?endpoint_override=127.0.0`, which MLflow rejects (the two-node job crashed at pack)."""
    from slam_ray.config import name_entries

    query = "?endpoint_override=127.0.0.1:9000&scheme=http"
    entries = ["@synth", "/data/libri/", "/data/extra/*.flac", "lists/more.jsonl", f"s3://speech/corpus{query}",
               f"s3://speech/lists/more.jsonl{query}", f"s3://speech/audio/**/*.flac{query}", "s3://b/plain/"]
    assert [name for name, _ in name_entries(entries, {"@synth": "synth"})] == [
        "synth", "libri", "extra", "more", "corpus", "more", "audio", "plain"]
    assert [path for _, path in name_entries(entries, {"@synth": "synth"})] == entries  # the paths as given


def test_slam_recipe_matches_the_paper():
    """docs/recipe.md's table of the final recipe (the paper's), value by value."""
    exp = load_experiment("slam")
    tok = exp.extract.tokenizer
    assert (tok.kind, tok.model, tok.layer, tok.n_units, tok.dedup, tok.frame_rate) == (
        "hubert", "slprl/mhubert-base-25hz", 11, 500, True, 25)
    assert exp.vocab_size == 502
    m = exp.train.model
    assert (m.init, m.base, m.dropout, m.rope_theta) == ("twist", "Qwen/Qwen2.5-0.5B", 0.0, 10_000)
    assert exp.pack.context_len == 1024
    opt, sched = exp.train.optimizer, exp.train.schedule
    assert (opt.name, opt.lr, opt.betas, opt.weight_decay) == ("adamw", 1e-3, (0.9, 0.999), 0.0)
    assert (sched.name, sched.warmup_ratio, sched.min_lr) == ("cosine", 0.01, 5e-5)
    t = exp.train
    # the paper's 8 x 16 = 128 examples of varying length per step hold ~79k tokens (1.4 B / 17,625 steps); as
    # full windows of 1,024 that is 8 x 10 = 80 windows, 81,920 tokens (docs/recipe.md)
    assert (t.batch_size, t.grad_accum) == (8, 10) and t.document_mask
    tokens_per_step = t.batch_size * t.grad_accum * exp.pack.context_len
    assert tokens_per_step == 81_920 and tokens_per_step * t.max_steps == pytest.approx(1.4e9, rel=0.05)
    assert (t.max_grad_norm, t.precision, t.max_steps, t.max_minutes) == (0.5, "bf16", 17625, 23.5 * 60)
    d = exp.dpo
    assert (d.beta, d.lr, d.batch_size, d.grad_accum, d.schedule, d.max_grad_norm, d.max_steps, d.max_minutes) == (
        0.1, 5e-5, 4, 16, "inverse_sqrt", 0.5, 813, 30)
    g = exp.eval.generation
    assert (g.temperature, g.top_k, g.max_new_tokens, g.repetition_penalty) == (0.8, 25, 150, 1.1)
    assert exp.eval.convention == "mean"


def test_slam_model_has_the_papers_parameter_count():
    """Qwen2.5-0.5B's architecture with the 502-id vocabulary and a tied head: 358,347,904 parameters."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from slam_ray.config import ModelConfig
    from slam_ray.lm.model import _set_overrides

    qwen25_05b = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                             num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151_936)
    _set_overrides(qwen25_05b, ModelConfig(init="random"), load_experiment("slam").vocab_size)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(qwen25_05b)
    assert sum(p.numel() for p in model.parameters()) == 358_347_904


def test_scaled_recipe_doubles_the_batch():
    slam, scaled = load_experiment("slam"), load_experiment("slam_scaled")
    per_step = lambda e: e.train.batch_size * e.train.grad_accum * e.train.num_workers  # noqa: E731
    assert per_step(scaled) == 2 * per_step(slam)
    assert scaled.train.max_minutes > slam.train.max_minutes
    assert scaled.dpo.epochs == 2
