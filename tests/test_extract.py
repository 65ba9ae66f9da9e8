"""Extraction over real speech and broken files, on a real local Ray."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import small_experiment

from slam_ray.errors import SlamError
from slam_ray.extract import extract, resolve_inputs
from slam_ray.stage_io import stage_dir
from slam_ray.units import read_unit_shards

pytestmark = pytest.mark.ray


def corpus_with_broken_files(fixtures, folder):
    folder.mkdir()
    shutil.copy(fixtures / "audio1.flac", folder / "good1.flac")
    shutil.copy(fixtures / "audio2.flac", folder / "good2.flac")
    (folder / "empty.wav").write_bytes(b"")
    (folder / "noise.flac").write_bytes(np.random.default_rng(0).bytes(5000))
    (folder / "text.wav").write_text("this is not audio\n" * 20)
    (folder / "truncated.flac").write_bytes((fixtures / "audio1.flac").read_bytes()[:300])
    (folder / "notes.txt").write_text("ignored: not an audio suffix")
    return {"empty", "noise", "text", "truncated"}


def test_bad_files_are_reported_and_good_files_come_through(fixtures, tmp_path, ray_local):
    bad = corpus_with_broken_files(fixtures, tmp_path / "audio")
    exp = small_experiment(tmp_path / "w", stages=["extract"],
                           extract={"inputs": [str(tmp_path / "audio")], "tokenizer": {"n_units": 16, "fit_frames": 1000}})
    out = extract(exp)
    units = read_unit_shards(out.path)
    assert sorted(units.id) == ["good1", "good2"]
    assert sorted(units.n_frames) == [352, 398]
    assert [int(np.sum(d)) for d in units.sort_values("id").durations] == [352, 398]
    errors = [json.loads(line) for line in out.errors_path.read_text().splitlines()]
    encode_errors = {e["id"] for e in errors if e["phase"] == "encode"}
    assert encode_errors == bad
    assert all(e["error"] for e in errors)
    manifest = json.loads(out.manifest_path.read_text())
    assert manifest["counts"]["encoded"] == 2 and manifest["counts"]["files"] == 6


def test_manifest_inputs_and_duplicate_ids(fixtures, tmp_path):
    manifest = tmp_path / "m.jsonl"
    rows = [{"path": str(fixtures / "audio1.flac"), "id": "a", "text": "hello", "speaker": "s1"},
            {"path": str(fixtures / "audio2.flac"), "id": "b"}]
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    exp = small_experiment(tmp_path / "w", extract={"inputs": [str(manifest)]})
    resolved = resolve_inputs(exp)
    assert [(r["id"], r["text"], r["speaker"]) for r in resolved] == [("a", "hello", "s1"), ("b", "", "")]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    exp = small_experiment(tmp_path / "w", extract={"inputs": [str(manifest), str(tmp_path / "m.csv")]})
    with pytest.raises(SlamError, match="duplicate ids"):
        resolve_inputs(exp)


def test_missing_input_is_a_clear_error(tmp_path):
    exp = small_experiment(tmp_path / "w", extract={"inputs": [str(tmp_path / "nowhere" / "*.flac")]})
    with pytest.raises(SlamError, match="matches no folder"):
        resolve_inputs(exp)


def test_synth_input_needs_the_synth_stage(tmp_path):
    exp = small_experiment(tmp_path / "w")
    with pytest.raises(SlamError, match="needs the output of `synth`"):
        resolve_inputs(exp)
    assert not stage_dir(exp, "synth").is_complete()


def test_interrupted_extraction_resumes_without_redoing_shards(fixtures, tmp_path, ray_local, monkeypatch):
    """Shards are written per fixed chunk of inputs: after an interruption only the missing chunks are encoded,
    and the result equals a clean run's."""
    import pyarrow.parquet as pq

    import slam_ray.extract as extract_module

    monkeypatch.setattr(extract_module, "SHARD_ROWS", 2)
    folder = tmp_path / "audio"
    corpus_with_broken_files(fixtures, folder)  # 6 inputs -> 3 chunks, one of them with a bad file
    exp = small_experiment(tmp_path / "w", stages=["extract"],
                           extract={"inputs": [str(folder)], "tokenizer": {"n_units": 16, "fit_frames": 1000}})
    out = extract(exp)
    shards = sorted((out.path / "units").glob("part-*.parquet"))
    assert len(shards) == 3
    clean = {p.name: pq.read_table(p) for p in shards}
    clean_errors = out.errors_path.read_text()

    # Simulate a crash after the first chunk: the manifest says running, later shards are missing.
    manifest = json.loads(out.manifest_path.read_text())
    out.write_manifest({**manifest, "status": "running"})
    kept = shards[0].stat().st_mtime_ns
    for p in shards[1:]:
        p.unlink()
    out = extract(exp)
    assert shards[0].stat().st_mtime_ns == kept  # not redone
    manifest = json.loads(out.manifest_path.read_text())
    assert manifest["counts"]["shards_resumed"] == 1
    again = {p.name: pq.read_table(p) for p in sorted((out.path / "units").glob("part-*.parquet"))}
    assert again.keys() == clean.keys()
    for name, table in clean.items():
        assert again[name].equals(table), name
    assert out.errors_path.read_text() == clean_errors  # the same error lines, none duplicated


def test_named_inputs_tag_their_dataset(fixtures, tmp_path, ray_local):
    """Each unit row records the dataset its input was named by, which pack.mix weights."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(fixtures / "audio1.flac", tmp_path / "a" / "one.flac")
    shutil.copy(fixtures / "audio2.flac", tmp_path / "b" / "two.flac")
    exp = small_experiment(tmp_path / "w", stages=["extract"],
                           extract={"inputs": [{"name": "books", "path": str(tmp_path / "a")}, str(tmp_path / "b")],
                                    "tokenizer": {"n_units": 16, "fit_frames": 1000}})
    units = read_unit_shards(extract(exp).path)
    assert dict(zip(units.id, units.dataset, strict=True)) == {"one": "books", "two": "b"}
