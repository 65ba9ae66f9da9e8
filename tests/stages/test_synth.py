"""`synth` at scale: sharded FLACs + Parquet index through Ray Data, resume, errors, SpokenSwag-style triples."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from helpers import actors_of, kill_and_rerun, save_tiny_vits, small_experiment

from slam_ray.config import Experiment, SynthConfig
from slam_ray.core.stage_io import stage_dir
from slam_ray.errors import SlamError
from slam_ray.lm.preferences import read_slamkit_preferences
from slam_ray.speech.spoken_swag import auto_bleu, build_triples
from slam_ray.stages.synth import plan_items, synth

pytestmark = pytest.mark.ray

LINES = ["the dog runs.", "a cat sleeps in the sun.", "...", "the dog runs.", "birds sing at night.",
         "my friend visits the farmer.", "the old horse walks slowly.", "children laugh outside.",
         "the baker feeds the rabbits.", "?!", "the teacher calls the boys."]


def corpus_experiment(tmp_path, stages=("synth",), extract=None, **synth_values) -> Experiment:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "corpus.txt").write_text("\n".join(LINES) + "\n")
    values = {"corpus": {"source": "text", "path": str(tmp_path / "corpus.txt")}, "shard_size": 3,
              "num_actors": 2, "batch_size": 2, "voices": ["en-us", "en-gb"], **synth_values}
    return small_experiment(tmp_path / "w", stages=list(stages), synth=values, extract=extract or {})


def check_index(out, n: int) -> pd.DataFrame:
    index = pd.read_parquet(out.path / "index.parquet")
    assert len(index) == n and index["id"].is_unique and list(index["id"]) == sorted(index["id"])
    for row in index.itertuples():
        info = sf.info(row.path)
        assert info.samplerate == 16_000 and info.duration == pytest.approx(row.duration, abs=1e-3)
    return index


def test_synth_shards_index_alignments_and_unspeakable_texts(tmp_path, ray_local, espeak):
    exp = corpus_experiment(tmp_path)
    out = synth(exp)
    index = check_index(out, 8)  # 11 lines, one duplicate, two texts the engine cannot speak
    assert set(index["voice"]) == {"en-us", "en-gb"} and set(index["backend"]) == {"espeak"}
    for row in index.itertuples():
        words = json.loads(row.aligned_text)
        # every text word in one entry, in order (espeak joins "in the" into one entry: no event at "the")
        assert "".join(w for w, _, _ in words).split() == row.text.rstrip(".").split()
        assert all(s < e for _, s, e in words) and [s for _, s, _ in words] == sorted(s for _, s, _ in words)
        assert words[-1][2] <= row.duration + 1e-3
    errors = [json.loads(line) for line in out.errors_path.read_text().splitlines()]
    assert sorted(e["text"] for e in errors) == ["...", "?!"]
    assert all("nothing speakable" in e["error"] for e in errors)
    manifest = out.read_manifest()
    assert manifest["counts"]["shards"] == 4 and manifest["counts"]["duplicates"] == 1
    assert manifest["metrics"]["throughput/audio_seconds_per_s"] > 0
    parts = sorted((out.path / "index").glob("part-*.parquet"))
    assert [p.name for p in parts] == [f"part-0000{k}.parquet" for k in range(4)]
    # the index is the parts in order, written one part at a time (the driver never holds the whole corpus's)
    pd.testing.assert_frame_equal(index, pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True))
    assert pq.ParquetFile(out.path / "index.parquet").metadata.num_row_groups == 4

    # so few texts (`synth.local_speak_seconds`) were spoken in the driver; a pool of actors speaks the same
    def speaking_actors() -> int:
        return sum(a.class_name == "MapWorker(MapBatches(SpeakActor))"
                   for a in actors_of(ray_local))

    before = speaking_actors()
    pooled = synth(corpus_experiment(tmp_path / "pool", local_speak_seconds=0))
    assert speaking_actors() > before
    pooled_index = check_index(pooled, 8)
    columns = [c for c in index.columns if c != "path"]  # paths differ by workdir only
    pd.testing.assert_frame_equal(pooled_index[columns], index[columns])
    for a, b in zip(index["path"], pooled_index["path"], strict=True):
        assert (sf.read(a)[0] == sf.read(b)[0]).all()
    assert pooled.errors_path.read_text().count("nothing speakable") == 2


def test_interrupted_synth_speaks_only_missing_shards(tmp_path, ray_local, espeak, monkeypatch):
    import slam_ray.stages.synth

    monkeypatch.setattr(slam_ray.stages.synth, "WAVE_UTTERANCES", 5)  # one shard of 3 per Ray Data pass
    exp = corpus_experiment(tmp_path)
    out = synth(exp)
    clean = pd.read_parquet(out.path / "index.parquet")
    clean_errors = out.errors_path.read_text()
    parts = sorted((out.path / "index").glob("part-*.parquet"))
    kept = {p.name: p.stat().st_mtime_ns for p in parts[:2]}
    # Simulate a crash: status running, the last two shards' index parts gone, one of their FLACs half-written
    out.write_manifest({**out.read_manifest(), "status": "running"})
    for p in parts[2:]:
        p.unlink()
    (out.path / "audio" / "00003" / ".utt0000009.flac.123.tmp").write_bytes(b"half")
    out = synth(exp)
    assert {p.name: p.stat().st_mtime_ns for p in parts[:2]} == kept  # not redone
    assert out.read_manifest()["counts"]["shards_resumed"] == 2
    again = pd.read_parquet(out.path / "index.parquet")
    pd.testing.assert_frame_equal(again, clean)  # the same rows, none twice, the same durations and alignments
    assert out.errors_path.read_text() == clean_errors
    assert not list((out.path / "audio").rglob(".*tmp*"))
    # complete: a rerun is a no-op
    stamp = (out.path / "index.parquet").stat().st_mtime_ns
    synth(exp)
    assert (out.path / "index.parquet").stat().st_mtime_ns == stamp


def test_waves_bound_the_utterances_per_pass(monkeypatch):
    import slam_ray.stages.synth

    monkeypatch.setattr(slam_ray.stages.synth, "WAVE_UTTERANCES", 5)
    shards = {"a": [0] * 3, "b": [0] * 2, "c": [0] * 7, "d": [0]}
    assert slam_ray.stages.synth._waves(list(shards), shards) == [["a", "b"], ["c"], ["d"]]


def test_plan_is_seeded_and_noise_has_its_own_stream(tmp_path):
    texts = [f"sentence number {i}" for i in range(20)]
    exp = small_experiment(tmp_path, synth={"backend": "piper", "voices": ["joe", "x.onnx"], "speed": [90, 110]})
    a, b = plan_items(exp, texts, tmp_path), plan_items(exp, texts, tmp_path)
    assert a == b and len({r["voice"] for r in a}) == 2 and len({r["seed"] for r in a}) == 20
    noisy = plan_items(small_experiment(tmp_path, synth={"backend": "piper", "voices": ["joe", "x.onnx"],
                                                         "speed": [90, 110], "noise": [0.3, 0.6]}), texts, tmp_path)
    assert [(r["voice"], r["speed"]) for r in noisy] == [(r["voice"], r["speed"]) for r in a]
    assert all(0.3 <= r["noise"] <= 0.6 for r in noisy) and all(r["noise"] == 0 for r in a)
    other = plan_items(small_experiment(tmp_path, synth={"seed": 1, "voices": ["a", "b"]}), texts, tmp_path)
    assert [r["voice"] for r in other] != [r["voice"] for r in plan_items(
        small_experiment(tmp_path, synth={"voices": ["a", "b"]}), texts, tmp_path)]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="synth.noise"):
        SynthConfig(noise=(0.1, 0.2))
    with pytest.raises(ValueError, match="num_gpus_per_actor"):
        SynthConfig(num_gpus_per_actor=1)
    with pytest.raises(ValueError, match="synth.write_audio=true"):
        SynthConfig(write_audio=False, preferences={"path": "swag.jsonl"})


def test_a_voice_the_engine_lacks_fails_the_stage_with_the_field(tmp_path, ray_local, espeak):
    with pytest.raises(SlamError, match="every utterance failed.*no voice 'xx-none'.*synth.voices"):
        synth(corpus_experiment(tmp_path, voices=["xx-none"]))


@pytest.mark.gpu
def test_hf_vits_on_gpu_actors(tmp_path, ray_local):
    model = save_tiny_vits(tmp_path / "vits")
    out = synth(corpus_experiment(tmp_path, backend="hf", voices=[model], num_gpus_per_actor=0.5, shard_size=4))
    check_index(out, 8)


def test_hf_vits_through_the_actor_pool(tmp_path, ray_local):
    model = save_tiny_vits(tmp_path / "vits")
    exp = corpus_experiment(tmp_path, backend="hf", voices=[model], speed=[90, 110], noise=[0.3, 0.6],
                            num_actors=1, shard_size=4, local_speak_seconds=0)  # a pool, however few the texts
    out = synth(exp)
    index = check_index(out, 8)
    assert index["aligned_text"].isna().all() and (index["noise"] > 0.29).all()
    errors = [json.loads(line) for line in out.errors_path.read_text().splitlines()]
    assert sorted(e["text"] for e in errors) == ["...", "?!"]  # no character the VITS tokenizer knows
    assert all("knows no character" in e["error"] for e in errors)
    # seeded per item: a second, separate run — few texts, so spoken in the driver — gives the very same audio
    again = synth(corpus_experiment(tmp_path / "again", backend="hf", voices=[model], speed=[90, 110],
                                    noise=[0.3, 0.6], num_actors=1, shard_size=4))
    for a, b in zip(index["path"], pd.read_parquet(again.path / "index.parquet")["path"], strict=True):
        assert (sf.read(a)[0] == sf.read(b)[0]).all()


SWAG = [
    {"context": "A man sits at a piano.", "endings": ["He plays a song.", "He eats the piano.", "He flies away."], "label": 0},
    {"context": "The girl opens the door.", "endings": ["The door sings.", "She walks outside."], "label": 1},
    {"context": "He says it again.", "endings": ["the cat the cat the cat the cat", "He stops."], "label": 0},
    {"context": "A dog barks.", "endings": ["The mail man runs.", "The dog is a tree.", "Rain is a dog."], "label": 0},
]


def test_auto_bleu_and_triples(tmp_path):
    assert auto_bleu("the cat the cat the cat the cat") == 1.0
    assert auto_bleu("He plays a song.") == 0.0 and auto_bleu("one") == 0.0
    assert auto_bleu("a b a b c d") == pytest.approx(2 / 5)  # "a b" twice among 5 bigrams
    path = tmp_path / "swag.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SWAG))
    from slam_ray.config import SwagConfig

    triples, counts = build_triples(SwagConfig(path=str(path)), ["v1", "v2"])
    assert counts == {"rows": 4, "dropped_auto_bleu": 1}
    assert [t["chosen"] for t in triples] == ["He plays a song.", "She walks outside.", "The mail man runs."]
    assert all(t["rejected"] != t["chosen"] for t in triples) and triples[1]["rejected"] == "The door sings."
    assert triples == build_triples(SwagConfig(path=str(path)), ["v1", "v2"])[0]  # seeded
    path.write_text(json.dumps({"context": "x", "endings": ["a", "b"], "label": 2}) + "\n")
    with pytest.raises(SlamError, match="outside the 2 endings"):
        build_triples(SwagConfig(path=str(path)), ["v1"])
    # one id twice would name two triples' files alike (one FLAC, two texts) and put them in two shards
    path.write_text("".join(json.dumps({**r, "id": i}) + "\n" for r, i in zip(SWAG, ["q1", "q2", "q1"], strict=False)))
    with pytest.raises(SlamError, match=r"swag.jsonl:3: id 'q1' is also the id of line 1"):
        build_triples(SwagConfig(path=str(path)), ["v1"])


def test_spoken_swag_to_dpo_readable_unit_triples(tmp_path, ray_local, espeak):
    from slam_ray.parallel.audio_units import export_preference_units
    from slam_ray.stages.extract import extract

    swag = tmp_path / "swag.jsonl"
    swag.write_text("".join(json.dumps(r) + "\n" for r in SWAG))
    exp = corpus_experiment(tmp_path, stages=("synth", "extract"),
                            extract={"tokenizer": {"n_units": 16, "fit_frames": 1000}},
                            preferences={"path": str(swag), "voices": ["en-us", "en-gb", "en-us+f3"]})
    out = synth(exp)
    prefs = [json.loads(line) for line in (out.path / "preferences.jsonl").read_text().splitlines()]
    assert len(prefs) == 3 and out.read_manifest()["counts"]["preference_dropped_auto_bleu"] == 1
    for row in prefs:
        assert {"prompt_path", "chosen_path", "rejected_path", "prompt_text", "chosen_text", "rejected_text"} <= set(row)
        assert all(sf.info(row[f"{p}_path"]).samplerate == 16_000 for p in ("prompt", "chosen", "rejected"))
    assert len(pd.read_parquet(out.path / "index.parquet")) == 8  # triples stay out of the training corpus
    extract(exp)
    n = export_preference_units(exp, tmp_path / "units.jsonl")
    triples = read_slamkit_preferences(tmp_path / "units.jsonl")  # what dpo.inputs reads
    assert n == 3 and len(triples) == 3 and all(t.prompt and t.chosen and t.rejected for t in triples)
    # the same through the CLI
    from slam_ray.cli import main
    from slam_ray.config import to_yaml

    (tmp_path / "exp.yaml").write_text(to_yaml(exp))
    assert main(["export", str(tmp_path / "exp.yaml"), "--format", "preferences", "--out", str(tmp_path / "cli.jsonl")]) == 0
    assert (tmp_path / "cli.jsonl").read_text() == (tmp_path / "units.jsonl").read_text()
    assert stage_dir(exp, "synth").is_complete()


@pytest.mark.slow
def test_killed_synth_reruns_to_the_same_index_as_a_clean_run(tmp_path, espeak, reduced_pipeline, ray_address):
    """SIGKILL `slam-ray synth` (its driver, joined to the session's Ray: its actors end with it) mid-way, run the
    same command again:
    it speaks only the shards without an index part and ends with exactly a clean run's index: the session's
    reduced quickstart's, the same 240 sentences spoken uninterrupted in one shard (how the work was cut into
    shards and batches changes no row)."""
    # one speaking actor (num_actors is operational: the same key): what is killed is the driver, which ends its
    # actors however many, and each is a process start (a TTS engine, torch) in each of the two runs
    killed = small_experiment(tmp_path / "killed", stages=["synth"],
                              synth={**reduced_pipeline.synth.model_dump(), "shard_size": 20, "batch_size": 4, "num_actors": 1})
    assert reduced_pipeline.synth.shard_size >= 240  # one shard: nothing was resumed there
    killed_out = kill_and_rerun(killed, "synth", "index", 12, tmp_path, ray_address=ray_address)
    clean = pd.read_parquet(stage_dir(reduced_pipeline, "synth").path / "index.parquet")
    again = pd.read_parquet(killed_out.path / "index.parquet")
    assert len(again) == 240 and again["id"].is_unique
    columns = [c for c in clean.columns if c != "path"]  # paths differ by workdir only
    pd.testing.assert_frame_equal(again[columns], clean[columns])
    assert not list((killed_out.path / "audio").rglob(".*tmp*"))


def test_write_audio_false_speaks_inside_extract_with_the_units_of_the_files(tmp_path, ray_local, espeak):
    """Fused synthesis: synth only plans, extract's actors speak each utterance straight into units. Encoded
    with the same tokenizer, they are the units of the FLACs synth would have written."""
    from slam_ray.parallel.encode import encode_files
    from slam_ray.pipeline import stage_function
    from slam_ray.stages.extract import resolve_inputs

    written = corpus_experiment(tmp_path / "written", stages=("synth", "extract"))
    fused = corpus_experiment(tmp_path / "fused", stages=("synth", "extract"), write_audio=False)
    for exp in (written, fused):
        for stage in ("synth", "extract"):
            stage_function(stage)(exp)
    plan = pd.read_parquet(stage_dir(fused, "synth").path / "index.parquet")
    assert (plan["path"] == "").all() and plan["duration"].isna().all()
    assert not (stage_dir(fused, "synth").path / "audio").exists()  # no audio on disk

    def shards(exp):
        units = pd.concat(pd.read_parquet(p) for p in sorted((stage_dir(exp, "extract").path / "units").glob("*.parquet")))
        return units.set_index("id")

    a, b = shards(written), shards(fused)
    assert sorted(a.index) == sorted(b.index) and len(a) == 8  # the 8 distinct speakable lines
    assert (b["path"] == "").all()
    for uid in a.index:  # same audio length, so the same frames, spoken in the extract actors
        assert a.loc[uid, "n_frames"] == b.loc[uid, "n_frames"]
        assert a.loc[uid, "audio_seconds"] == pytest.approx(b.loc[uid, "audio_seconds"])
    # the fused rows through the written experiment's tokenizer: exactly the units of the written files
    rows = [r for r in resolve_inputs(fused) if "speak" in r]
    assert len(rows) == len(plan)
    good, bad = encode_files(written, rows, stage_dir(written, "extract").path / "tokenizer", 2, 4)
    assert {r["id"] for r in bad} == set(plan["id"]) - set(a.index)  # the unspeakable ones, reported
    for rec in good:
        assert rec["units"] == list(a.loc[rec["id"], "units"]), rec["id"]

    # eval's pairs and dpo's triples: texts spoken straight into units in one pass (no file), equal to the
    # units of the files SpeakActor writes; an unspeakable text is an error row either way
    from slam_ray.parallel.encode import encode_spoken
    from slam_ray.parallel.tts import speak_items

    tokenizer = stage_dir(written, "extract").path / "tokenizer"

    def items(folder: str) -> list[dict]:
        return [{"id": f"i{k}", "text": text, "voice": "en-gb", "speed": 150.0 + k,
                 "path": str(tmp_path / folder / f"i{k}.flac")} for k, text in enumerate(LINES[:3])]

    spoken, unspoken = speak_items(written, items("filed"), "espeak", 16_000, 2, 2)
    filed, _ = encode_files(written, spoken, tokenizer, 2, 4)
    direct, failed = encode_spoken(written, items("direct"), tokenizer)
    assert {r["id"]: r["units"] for r in direct} == {r["id"]: r["units"] for r in filed} and len(direct) == 2
    assert {r["id"] for r in failed} == {r["id"] for r in unspoken} == {"i2"}
    assert not (tmp_path / "direct").exists()
