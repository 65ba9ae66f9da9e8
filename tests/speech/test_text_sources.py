"""Text sources of `synth`: plain text, JSONL, Parquet and a local HF datasets folder; cutting and dedup."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from slam_ray.config import CorpusConfig
from slam_ray.errors import SlamError
from slam_ray.speech.text_sources import cut, load_texts, split_sentences

STORY = ("Once upon a time, there was a little dog named Max. Max liked to run! "
         "One day he found a big red ball in the park. \"Is this mine?\" he asked.")


def test_sentences_and_max_chars():
    assert split_sentences(STORY) == ["Once upon a time, there was a little dog named Max.", "Max liked to run!",
                                      "One day he found a big red ball in the park.", "\"Is this mine?\"", "he asked."]
    assert cut(STORY, per_sentence=False, max_chars=None) == [STORY]
    packed = cut(STORY, per_sentence=False, max_chars=80)
    assert all(len(p) <= 80 for p in packed) and " ".join(packed) == STORY
    assert packed[0] == "Once upon a time, there was a little dog named Max. Max liked to run!"  # whole sentences
    long = "word " * 50
    pieces = cut(long, per_sentence=True, max_chars=30)
    assert all(len(p) <= 30 for p in pieces) and " ".join(pieces) == long.strip()  # cut between words
    assert cut("  spaced \n  out  ", per_sentence=False, max_chars=None) == ["spaced out"]
    assert cut("   ", per_sentence=True, max_chars=None) == []


def test_plain_text_lines_and_paragraphs_with_dedup(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the dog runs.\n\nthe cat sleeps. the dog runs.\nthe dog runs.\n\n\nA last one.\n")
    lines, counts = load_texts(CorpusConfig(source="text", path=str(path)))
    assert lines == ["the dog runs.", "the cat sleeps. the dog runs.", "A last one."]
    assert counts["duplicates"] == 1
    paragraphs, _ = load_texts(CorpusConfig(source="text", path=str(path), unit="paragraph"))
    assert paragraphs == ["the dog runs.", "the cat sleeps. the dog runs. the dog runs.", "A last one."]
    sentences, counts = load_texts(CorpusConfig(source="text", path=str(path), unit="paragraph", split="sentence"))
    assert sentences == ["the dog runs.", "the cat sleeps.", "A last one."] and counts["duplicates"] == 2
    kept, _ = load_texts(CorpusConfig(source="text", path=str(path), dedup=False, n_sentences=3))
    assert kept == ["the dog runs.", "the cat sleeps. the dog runs.", "the dog runs."]
    short, counts = load_texts(CorpusConfig(source="text", path=str(path), min_chars=14))
    assert short == ["the cat sleeps. the dog runs."] and counts["too_short"] == 3


def test_jsonl_and_parquet_text_columns(tmp_path):
    rows = [{"story": STORY, "id": 1}, {"story": "Short one.", "id": 2}, {"story": None, "id": 3}]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "s.parquet")
    for source in ("jsonl", "parquet"):
        texts, _ = load_texts(CorpusConfig(source=source, path=str(tmp_path / f"s.{source}"), text_field="story",
                                           split="sentence"))
        assert texts == split_sentences(STORY) + ["Short one."], source
        with pytest.raises(SlamError, match="text_field"):
            load_texts(CorpusConfig(source=source, path=str(tmp_path / f"s.{source}")))
    with pytest.raises(SlamError, match="column 'id' holds int"):
        load_texts(CorpusConfig(source="parquet", path=str(tmp_path / "s.parquet"), text_field="id"))


def test_local_hf_datasets_folder(tmp_path):
    import datasets

    train = datasets.Dataset.from_dict({"text": [STORY, "Another story. It is short."], "n": [1, 2]})
    datasets.DatasetDict({"train": train, "validation": train.select([1])}).save_to_disk(str(tmp_path / "dd"))
    train.save_to_disk(str(tmp_path / "one"))
    texts, counts = load_texts(CorpusConfig(source="hf", path=str(tmp_path / "dd"), max_chars=60))
    assert counts["items"] == 2 and all(len(t) <= 60 for t in texts) and texts[-1] == "Another story. It is short."
    val, _ = load_texts(CorpusConfig(source="hf", path=str(tmp_path / "dd"), hf_split="validation"))
    assert val == ["Another story. It is short."]
    whole, _ = load_texts(CorpusConfig(source="hf", path=str(tmp_path / "one")))
    assert whole == [STORY, "Another story. It is short."]
    with pytest.raises(SlamError, match="hf_split"):
        load_texts(CorpusConfig(source="hf", path=str(tmp_path / "dd"), hf_split="test"))
    with pytest.raises(SlamError, match="save_to_disk"):
        load_texts(CorpusConfig(source="hf", path=str(tmp_path)))


def test_grammar_stays_the_default_and_bad_paths_name_the_field(tmp_path):
    texts, _ = load_texts(CorpusConfig(n_sentences=50))
    assert len(texts) == 50 and len(set(texts)) == 50
    with pytest.raises(ValueError, match="synth.corpus.path"):
        CorpusConfig(source="text")
    with pytest.raises(SlamError, match="synth.corpus.path"):
        load_texts(CorpusConfig(source="jsonl", path=str(tmp_path / "missing.jsonl")))
