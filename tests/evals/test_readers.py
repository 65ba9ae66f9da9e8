"""Task definitions and the readers of the official benchmark layouts, on miniature copies spoken by espeak-ng."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from slam_ray.config.tasks import DATASET_READERS, load_task, task_names
from slam_ray.errors import SlamError
from slam_ray.evals.readers import READERS, frequency_band, read_comparisons


@pytest.fixture(scope="module")
def layouts(benchmark_layouts):
    return benchmark_layouts


def stem(path: str) -> str:
    return Path(path).stem


def test_every_shipped_task_loads():
    names = task_names()
    assert {"swuggy", "sblimp", "ssc", "tsc", "salmon", "manifest", "lexical", "generate"} <= set(names)
    for name in names:
        spec = load_task(name)
        assert spec.name == name and spec.description


def test_the_task_schema_names_exactly_the_readers_that_exist():
    # config/tasks.py validates `reader:` against names it holds itself (config imports no evals module)
    assert set(DATASET_READERS) == set(READERS)


def test_zerospeech_lexical_pairs_word_and_nonword_of_one_id_and_voice(layouts):
    df = read_comparisons(load_task("swuggy"), str(layouts["zerospeech"]), {})
    assert len(df) == 8  # 4 ids x 2 voices
    for row in df.itertuples():
        pos, (neg,) = stem(row.positive), [stem(n) for n in row.negatives]
        assert pos.startswith("w") and neg.startswith("n")
        assert pos[1:] == neg[1:] == f"{row.item}_{row.voice}"  # same id, same voice
    bands = dict(zip(df["item"], df["frequency_band"], strict=False))
    assert bands == {"0": ">100", "1": "21-100", "2": "1-5", "3": "oov"}
    # the split folder itself is accepted too, and `limit` keeps whole items (both voices)
    small = read_comparisons(load_task("swuggy"), str(layouts["zerospeech"] / "lexical" / "dev"), {}, limit=2)
    assert sorted(small["item"]) == ["0", "0", "1", "1"]


def test_zerospeech_syntactic_pairs_and_types(layouts):
    df = read_comparisons(load_task("sblimp"), str(layouts["zerospeech"]), {})
    assert len(df) == 6
    assert all(stem(r.positive).endswith("_1") and stem(r.negatives[0]) == stem(r.positive)[:-1] + "0"
               for r in df.itertuples())
    assert sorted(set(df["type"])) == ["agreement", "word_order"]


def test_storycloze_positive_is_the_correct_file(layouts):
    df = read_comparisons(load_task("ssc"), str(layouts["ssc"]), {})
    assert list(df["item"]) == ["0", "1", "2"]
    assert all(stem(r.positive).endswith("_correct") and stem(r.negatives[0]).endswith("_incorrect")
               for r in df.itertuples())


def test_salmon_sample_zero_is_the_positive(layouts):
    df = read_comparisons(load_task("salmon"), str(layouts["salmon"]), {"subsets": ["gender_consistency",
                                                                                     "speaker_consistency"]})
    assert len(df) == 6 and set(df["subset"]) == {"gender_consistency", "speaker_consistency"}
    assert all(stem(r.positive).endswith("_0") and stem(r.negatives[0]).endswith("_1") for r in df.itertuples())
    with pytest.raises(SlamError, match="bg_alignment"):  # all 8 subsets by default: the missing one is named
        read_comparisons(load_task("salmon"), str(layouts["salmon"]), {})


def test_manifest_pairs_and_groups_with_relative_paths(layouts):
    df = read_comparisons(load_task("manifest"), str(layouts["manifest"]), {})
    assert [len(n) for n in df["negatives"]] == [1, 2]
    assert all(Path(p).is_file() for p in [*df["positive"], *df["negatives"].explode()])


@pytest.mark.parametrize("bad", [{"positive": "p.wav", "negatives": []}, {"positive": "p.wav", "negatives": "n.wav"},
                                 {"positive": ["p.wav"], "negative": "n.wav"}, {"positive": "p.wav", "negatives": [1]}])
def test_a_manifest_line_without_a_negative_path_is_named(tmp_path, bad):
    """An empty `negatives` once reached scoring's min([]) and lost every task of the run; a string was split into
    its characters."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "positive": "p.wav", "negative": "n.wav"}) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(SlamError, match=r"m\.jsonl:2: `positive` must be a path and `negatives` a non-empty list"):
        read_comparisons(load_task("manifest"), str(manifest), {})


def test_missing_datasets_give_clear_errors(tmp_path, layouts):
    with pytest.raises(SlamError, match="does not exist. Download the dataset"):
        read_comparisons(load_task("sblimp"), str(tmp_path / "nowhere"), {})
    (tmp_path / "syntactic" / "dev").mkdir(parents=True)
    with pytest.raises(SlamError, match="gold.csv is missing"):
        read_comparisons(load_task("sblimp"), str(tmp_path), {})
    with pytest.raises(SlamError, match="no `<number>_<tag>.wav`"):
        read_comparisons(load_task("tsc"), str(tmp_path), {})
    with pytest.raises(SlamError, match="unknown eval task"):
        load_task("sbllimp")


def test_frequency_bands_are_the_zerospeech_toolkits():
    """zerospeech2021's lexical evaluation: pandas.cut(frequency, [0, 1, 5, 20, 100, inf], labels=[oov, 1-5, 6-20,
    21-100, >100], right=False) — so 5 is in `6-20`, 20 in `21-100`, 100 in `>100`; no frequency, no band."""
    frequencies = [0, 1, 4, 5, 19, 20, 99, 100, 101, 4.5]
    toolkit = pd.cut(pd.Series(frequencies), [0, 1, 5, 20, 100, float("inf")],
                     labels=["oov", "1-5", "6-20", "21-100", ">100"], right=False)
    assert [frequency_band(f) for f in frequencies] == [str(b) for b in toolkit]
    assert [frequency_band(f) for f in (0, 5, 20, 100)] == ["oov", "6-20", "21-100", ">100"]
    assert frequency_band(float("nan")) is None


def test_a_task_option_its_reader_does_not_read_is_refused_with_what_to_use():
    """`limit` on a grammar task still scored n_pairs, on `generate` still spoke n_prompts; `split` and `subsets`
    on a reader without them did nothing: refused at load, naming the entry and what does that job."""
    from slam_ray.config import load_experiment
    from slam_ray.errors import ConfigError

    for tasks, message in (("[{task: lexical, limit: 50}]", r"tasks\[0\]: `limit` does nothing for task 'lexical'.*n_pairs"),
                           ("[lexical, {task: generate, path: /p, limit: 10}]", r"tasks\[1\]: `limit`.*n_prompts"),
                           ("[{task: ssc, path: /a, split: test}]", "`split` does nothing for task 'ssc'"),
                           ("[{task: swuggy, path: /a, subsets: [x]}]", "only SALMon has subsets")):
        with pytest.raises(ConfigError, match=message):
            load_experiment("quickstart", [f"eval.tasks={tasks}"])
    exp = load_experiment("quickstart", ["eval.tasks=[{task: swuggy, path: /a, split: dev, limit: 5}, "
                                         "{task: salmon, path: /b, subsets: [bg_alignment], limit: 3}]"])
    assert [(e.split, e.limit) for e in exp.eval.task_entries()] == [("dev", 5), (None, 3)]


def test_config_names_the_task_field_and_the_fix():
    from slam_ray.config import load_experiment
    from slam_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"task 'ssc' reads a dataset; give it as \{task: ssc, path:"):
        load_experiment("quickstart", ["eval.tasks=[lexical, ssc]"])
    with pytest.raises(ConfigError, match="two tasks are named 'ssc'"):
        load_experiment("quickstart", ["eval.tasks=[{task: ssc, path: /a}, {task: ssc, path: /b}]"])
    exp = load_experiment("quickstart", ["eval.tasks=[lexical, {task: ssc, path: /a, name: ssc_dev}]"])
    assert [e.key for e in exp.eval.task_entries()] == ["lexical", "ssc_dev"]


def test_salmon_hugging_face_parquet(tmp_path, layouts):
    """The HF release's shape: one parquet per subset, audio columns as {bytes, path} structs."""
    import pandas as pd

    folder = tmp_path / "salmon_hf" / "gender_consistency"
    folder.mkdir(parents=True)
    src = layouts["salmon"] / "gender_consistency"
    records = [{"task": "gender_consistency", "ind": i,
                "positive_audio": {"bytes": (src / f"sample_{i}_0.wav").read_bytes(), "path": None},
                "negative_audio": {"bytes": (src / f"sample_{i}_1.wav").read_bytes(), "path": None}} for i in range(3)]
    pd.DataFrame(records).to_parquet(folder / "train-00000-of-00001.parquet")
    df = read_comparisons(load_task("salmon"), str(tmp_path / "salmon_hf"), {"subsets": ["gender_consistency"]})
    assert len(df) == 3
    for i, row in enumerate(df.itertuples()):
        assert Path(row.positive).read_bytes() == (src / f"sample_{i}_0.wav").read_bytes()
        assert Path(row.negatives[0]).read_bytes() == (src / f"sample_{i}_1.wav").read_bytes()
    pd.DataFrame([{"audio": b"x"}]).to_parquet(folder / "train-00000-of-00001.parquet")
    with pytest.raises(SlamError, match="positive_audio"):
        read_comparisons(load_task("salmon"), str(tmp_path / "salmon_hf"), {"subsets": ["gender_consistency"]})
