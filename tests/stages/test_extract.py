"""Extraction over real speech and broken files, on a real local Ray."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import actors_of, kill_a_worker_during, small_experiment

from slam_ray.core.stage_io import stage_dir
from slam_ray.errors import SlamError
from slam_ray.speech.units import read_unit_shards
from slam_ray.stages.extract import extract, resolve_inputs

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


def a_dozen_broken_files(fixtures, folder) -> set[str]:
    """Twelve kinds of unusable input, each named by what is wrong with it."""
    import os

    import soundfile as sf

    (folder / "empty.wav").write_bytes(b"")
    (folder / "random_bytes.flac").write_bytes(np.random.default_rng(0).bytes(5000))
    (folder / "text.wav").write_text("this is not audio\n" * 20)
    (folder / "header_only.flac").write_bytes((fixtures / "audio1.flac").read_bytes()[:300])
    (folder / "riff_junk.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 4)
    (folder / "garbage.mp3").write_bytes(b"\xff\xfb" + np.random.default_rng(1).bytes(3000))
    sf.write(folder / "zero_length.wav", np.zeros(0, np.float32), 16_000)
    nan = np.random.default_rng(2).normal(0, 0.1, 16_000).astype(np.float32)
    nan[8000] = np.nan
    sf.write(folder / "nan.wav", nan, 16_000, subtype="FLOAT")
    sf.write(folder / "infinite.wav", np.full(16_000, np.inf, np.float32), 16_000, subtype="FLOAT")
    sf.write(folder / "too_short.wav", np.zeros(100, np.float32), 16_000)  # shorter than one frame
    os.symlink(folder / "gone.flac", folder / "dangling_link.flac")
    (folder / "a_folder.wav").mkdir()
    return {"empty", "random_bytes", "text", "header_only", "riff_junk", "garbage", "zero_length", "nan",
            "infinite", "too_short", "dangling_link", "a_folder"}


def test_a_dozen_kinds_of_broken_files_beside_real_speech_piper_and_odd_formats(fixtures, tmp_path, ray_local):
    """Every good file yields units (real speech, piper speech, and odd but valid encodings); every bad file is
    one line of errors.jsonl with its reason; good files in the same batch are unaffected."""
    import soundfile as sf

    from slam_ray.parallel.tts import make_backend
    from slam_ray.speech.audio import decode_audio, resample

    folder = tmp_path / "audio"
    folder.mkdir()
    shutil.copy(fixtures / "audio1.flac", folder / "real1.flac")
    shutil.copy(fixtures / "audio2.flac", folder / "real2.flac")
    piper = make_backend("piper")
    sf.write(folder / "piper.wav", piper.synthesize("A small dog ran across the quiet park.", "joe", 160), 16_000)
    speech = decode_audio(fixtures / "audio2.flac")
    sf.write(folder / "stereo_44k.flac", np.stack([resample(speech, 16_000, 44_100)] * 2, 1), 44_100)
    sf.write(folder / "phone_8k_u8.wav", resample(speech, 16_000, 8_000), 8_000, subtype="PCM_U8")
    sf.write(folder / "studio_24bit.flac", speech, 16_000, subtype="PCM_24")
    sf.write(folder / "podcast.mp3", speech, 16_000, subtype="MPEG_LAYER_III")
    sf.write(folder / "radio.ogg", speech, 16_000, subtype="VORBIS")
    good = {"real1", "real2", "piper", "stereo_44k", "phone_8k_u8", "studio_24bit", "podcast", "radio"}
    bad = a_dozen_broken_files(fixtures, folder)
    exp = small_experiment(tmp_path / "w", stages=["extract"],
                           extract={"inputs": [str(folder)], "batch_size": 32,  # good and bad share one batch
                                    "tokenizer": {"n_units": 16, "fit_frames": 1000}})
    out = extract(exp)
    units = read_unit_shards(out.path)
    assert set(units.id) == good
    frames = dict(zip(units.id, units.n_frames, strict=True))
    assert frames["real1"] == 352 and frames["real2"] == 398
    for name in ("stereo_44k", "phone_8k_u8", "studio_24bit", "podcast", "radio"):
        assert abs(frames[name] - 398) <= 2, name  # converted to 16 kHz mono, same length
    errors = [json.loads(line) for line in out.errors_path.read_text().splitlines()]
    assert sorted(e["id"] for e in errors) == sorted(bad)  # one line per bad file
    reasons = {e["id"]: e["error"] for e in errors}
    assert "NaN" in reasons["nan"] and "infinite" in reasons["infinite"] and "no samples" in reasons["zero_length"]
    assert "shorter than one frame" in reasons["too_short"]
    manifest = json.loads(out.manifest_path.read_text())
    assert manifest["counts"]["encoded"] == len(good) and manifest["counts"]["files"] == len(good) + len(bad)

    # Only bad files (a mount that was not there), with the tokenizer given (nothing to fit first): an error
    # naming the fix, not a complete output of zero units that every rerun would reuse.
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    a_dozen_broken_files(fixtures, only_bad)
    none_good = small_experiment(tmp_path / "w2", stages=["extract"],
                                 extract={"inputs": [str(only_bad)], "batch_size": 32,
                                          "tokenizer": {"n_units": 16, "centroids": str(out.path / "tokenizer" / "centroids.npy")}})
    with pytest.raises(SlamError, match=f"every one of the {len(bad)} input files failed.*readable"):
        extract(none_good)
    assert not stage_dir(none_good, "extract").is_complete()


def test_hubert_extraction_units_do_not_depend_on_batch_mates(fixtures, tmp_path, ray_local):
    """The stage with a tiny mHuBERT-25Hz-shaped model loaded by path: 352 / 398 frames, and each file's units
    equal those of the file encoded alone."""
    from helpers import save_tiny_hubert

    from slam_ray.speech.audio import decode_audio
    from slam_ray.speech.tokenizer import UnitTokenizer

    folder = tmp_path / "audio"
    folder.mkdir()
    for i in range(3):
        shutil.copy(fixtures / "audio1.flac", folder / f"a{i}.flac")
        shutil.copy(fixtures / "audio2.flac", folder / f"b{i}.flac")
    model = save_tiny_hubert(tmp_path / "mhubert", rate=25)
    exp = small_experiment(tmp_path / "w", stages=["extract"],
                           extract={"inputs": [str(folder)], "batch_size": 6,
                                    "tokenizer": {"kind": "hubert", "model": model, "layer": 2, "n_units": 12,
                                                  "fit_frames": 1000}})
    out = extract(exp)
    units = read_unit_shards(out.path).set_index("id")
    assert list(units.n_frames) == [352] * 3 + [398] * 3
    tokenizer = UnitTokenizer.load(out.path / "tokenizer")
    assert tokenizer.cfg.kind == "hubert" and tokenizer.centroids.shape == (12, 32)
    for name, source in (("a1", "audio1"), ("b2", "audio2")):
        alone = tokenizer.encode(decode_audio(fixtures / f"{source}.flac"))
        assert list(units.loc[name, "units"]) == alone["units"].tolist()
        assert list(units.loc[name, "durations"]) == alone["durations"].tolist()


def test_a_small_fit_sample_featurised_in_the_driver_fits_the_tokenizer_the_actors_fit(fixtures, tmp_path, ray_local):
    """`extract.local_fit_seconds`: a fit sample of at most that much audio is featurised in the driver instead of
    a pool of actors — the same features (one thread, as an actor), so the same tokenizer, bit for bit, for HuBERT
    and log-mel, with a broken file in the sample; the driver's thread count is restored."""
    import torch
    from helpers import save_tiny_hubert

    from slam_ray.stages.extract import _fit_in_driver, _fit_sample, fit_tokenizer

    folder = tmp_path / "audio"
    corpus_with_broken_files(fixtures, folder)
    for i in range(4):
        shutil.copy(fixtures / f"audio{1 + i % 2}.flac", folder / f"copy{i}.flac")
    model = save_tiny_hubert(tmp_path / "mhubert", rate=25)
    threads = torch.get_num_threads()
    for tokenizer in ({"kind": "hubert", "model": model, "layer": 2, "n_units": 8, "fit_frames": 1000},
                      {"kind": "logmel", "n_units": 8, "frame_rate": 50, "fit_frames": 1000}):
        fitted = {}
        for where, seconds in (("driver", 300.0), ("actors", 0.0)):
            exp = small_experiment(tmp_path / where, stages=["extract"],
                                   extract={"inputs": [str(folder)], "local_fit_seconds": seconds,
                                            "tokenizer": tokenizer})
            rows = sorted(resolve_inputs(exp), key=lambda r: r["id"])
            assert _fit_in_driver(exp, _fit_sample(exp, rows)) == (where == "driver")
            fitted[where] = fit_tokenizer(exp, rows, tmp_path / where / tokenizer["kind"])
            assert torch.get_num_threads() == threads
        for name in ("centroids", "mean", "std"):
            np.testing.assert_array_equal(getattr(fitted["driver"], name), getattr(fitted["actors"], name))
        assert fitted["driver"].centroids.shape[0] == 8


def test_a_small_encoding_pass_in_the_driver_writes_the_shards_the_actors_write(fixtures, tmp_path, ray_local):
    """`extract.local_encode_seconds`: a corpus of at most that much audio (here ~100 s by file size, broken files
    included) is encoded by one EncodeActor in the driver, not by a pool of actors: no encoding actor starts, and
    the shards, error lines and counts are those of the actors' run byte for byte; the driver's thread count is
    restored. Above the limit, or where a file's length is not known, the actors do the work."""
    import pyarrow.parquet as pq
    import torch

    from slam_ray.parallel.encode import audio_seconds_at_most

    folder = tmp_path / "audio"
    corpus_with_broken_files(fixtures, folder)
    for i in range(4):
        shutil.copy(fixtures / f"audio{1 + i % 2}.flac", folder / f"copy{i}.flac")

    def encoding_actors() -> int:
        return sum(a.class_name == "MapWorker(MapBatches(EncodeActor))"
                   for a in actors_of(ray_local))

    threads, outs = torch.get_num_threads(), {}
    for where, seconds in (("driver", 120.0), ("actors", 0.0)):
        exp = small_experiment(tmp_path / where, stages=["extract"],
                               extract={"inputs": [str(folder)], "local_encode_seconds": seconds, "shard_files": 4,
                                        "tokenizer": {"n_units": 16, "fit_frames": 1000}})
        before = encoding_actors()
        outs[where] = extract(exp)
        assert (encoding_actors() > before) == (where == "actors")
        assert torch.get_num_threads() == threads
    estimate = audio_seconds_at_most(resolve_inputs(exp), 120.0)
    assert estimate is not None and 90 < estimate < 120
    assert audio_seconds_at_most(resolve_inputs(exp), 60.0) is None
    assert audio_seconds_at_most([{"path": "s3://bucket/a.flac"}], 1e9) is None  # remote, no duration: not known
    shards = sorted(p.name for p in (outs["actors"].path / "units").glob("part-*.parquet"))
    assert len(shards) == 3 and shards == sorted(p.name for p in (outs["driver"].path / "units").glob("part-*.parquet"))
    for name in shards:
        assert pq.read_table(outs["driver"].path / "units" / name).equals(
            pq.read_table(outs["actors"].path / "units" / name)), name
    assert outs["driver"].errors_path.read_text() == outs["actors"].errors_path.read_text() != ""
    assert outs["driver"].read_manifest()["counts"] == outs["actors"].read_manifest()["counts"]


def test_export_to_slamkit_features_and_tokens_jsonl_round_trips(fixtures, tmp_path, ray_local, capsys):
    """`slam-ray export`: the units of the stage in slamkit's two JSONL forms (the fixtures' key order), which
    slamkit's tools and our own `pack` read back to the same units."""
    from slam_ray.cli import main
    from slam_ray.config import to_yaml
    from slam_ray.speech.units import read_jsonl
    from slam_ray.stages.pack import _jsonl_pieces, read_shard

    (tmp_path / "audio").mkdir()
    for i in (1, 2):
        shutil.copy(fixtures / f"audio{i}.flac", tmp_path / "audio" / f"audio{i}.flac")
    exp = small_experiment(tmp_path / "w", stages=["extract"],
                           extract={"inputs": [str(tmp_path / "audio")], "tokenizer": {"n_units": 16, "fit_frames": 1000}})
    (tmp_path / "exp.yaml").write_text(to_yaml(exp))
    assert main(["export", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "f.jsonl")]) == 2
    assert "run `slam-ray extract` first" in capsys.readouterr().err
    units = read_unit_shards(extract(exp).path).sort_values("id")
    assert main(["export", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "f.jsonl")]) == 0
    assert main(["export", str(tmp_path / "exp.yaml"), "--format", "tokens", "--out", str(tmp_path / "t.jsonl")]) == 0
    features, tokens = list(read_jsonl(tmp_path / "f.jsonl")), list(read_jsonl(tmp_path / "t.jsonl"))
    slamkit_features = next(read_jsonl(fixtures / "features.jsonl"))
    slamkit_tokens = next(read_jsonl(fixtures / "tokens.jsonl"))
    assert [list(r) for r in features] == [list(slamkit_features)] * 2  # same keys, same order
    assert [list(r) for r in tokens] == [list(slamkit_tokens)] * 2
    assert [sum(r["duration"]) for r in features] == [352, 398]
    for path in ("f.jsonl", "t.jsonl"):
        (piece,) = _jsonl_pieces(str(tmp_path / path), "x", 10**9)  # the whole file: one piece
        back = read_shard(piece)
        assert [list(back.values[a:b]) for a, b in zip(back.offsets, back.offsets[1:], strict=False)] == [
            list(u) for u in units.units]


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


def test_manifest_ids_and_speakers_stay_the_strings_they_are(fixtures, tmp_path):
    """Numeric-looking ids are not numbers: "00123" is not 123, "0012" and "012" are two files, and a CSV column
    with a blank cell does not turn "12" into "12.0" (the blank row gets the generated id)."""
    audio = str(fixtures / "audio1.flac")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"path": audio, "id": "00123", "speaker": "0019"}, {"path": audio, "id": "0012"}, {"path": audio, "id": "012"}]))
    (tmp_path / "m.csv").write_text(f"id,path,speaker\n12,{audio},0019\n,{audio},\n")
    exp = small_experiment(tmp_path / "w", extract={"inputs": [str(tmp_path / "m.jsonl"), str(tmp_path / "m.csv")]})
    resolved = {r["id"]: r["speaker"] for r in resolve_inputs(exp)}
    assert resolved == {"00123": "0019", "0012": "", "012": "", "12": "0019", "m-0000001": ""}


def test_missing_input_is_a_clear_error(tmp_path):
    exp = small_experiment(tmp_path / "w", extract={"inputs": [str(tmp_path / "nowhere" / "*.flac")]})
    with pytest.raises(SlamError, match="matches no folder"):
        resolve_inputs(exp)


def test_synth_input_needs_the_synth_stage(tmp_path):
    exp = small_experiment(tmp_path / "w")
    with pytest.raises(SlamError, match="needs the output of `synth`"):
        resolve_inputs(exp)
    assert not stage_dir(exp, "synth").is_complete()


def test_interrupted_extraction_resumes_without_redoing_shards(fixtures, tmp_path, ray_local):
    """Shards are written per fixed chunk of inputs: after an interruption only the missing chunks are encoded,
    and the result equals a clean run's."""
    import pyarrow.parquet as pq

    folder = tmp_path / "audio"
    corpus_with_broken_files(fixtures, folder)  # 6 inputs -> 3 chunks, one of them with a bad file
    exp = small_experiment(tmp_path / "w", stages=["extract"],
                           extract={"inputs": [str(folder)], "shard_files": 2,
                                    "tokenizer": {"n_units": 16, "fit_frames": 1000}})
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


def test_named_inputs_tag_their_dataset_and_word_alignments_reach_the_units(fixtures, tmp_path, ray_local):
    """Each unit row records the dataset its input was named by, which pack.mix weights, and its words where the
    file has an alignment: a whisper JSON beside the audio, a manifest's `aligned_text` (a long file cut into
    segments gets the words inside each segment, in the segment's time), a file named by a manifest's
    `alignment`; a malformed alignment is an error line and its file's units still come through, without words."""
    from helpers import long_speech

    from slam_ray.speech.alignment import parse_alignment
    from slam_ray.stages.extract import export_slamkit

    for folder in ("a", "b", "c"):
        (tmp_path / folder).mkdir()
    shutil.copy(fixtures / "audio1.flac", tmp_path / "a" / "one.flac")
    whisper_words = [{"word": " hello", "start": 0.5, "end": 0.9, "probability": 0.8},
                     {"word": " world", "start": 1.0, "end": 1.6, "probability": 0.9}]
    (tmp_path / "a" / "one.json").write_text(json.dumps({"text": " hello world", "segments": [
        {"id": 0, "start": 0.0, "end": 2.0, "words": whisper_words}]}))
    shutil.copy(fixtures / "audio2.flac", tmp_path / "b" / "two.flac")
    (tmp_path / "b" / "two.json").write_text(json.dumps([[" late", 2.0, 1.0]]))  # ends before it starts
    shutil.copy(fixtures / "audio2.flac", tmp_path / "c" / "three.flac")
    (tmp_path / "c" / "three_words.json").write_text(json.dumps([[" three", 0.2, 0.6]]))
    long_speech(fixtures, tmp_path / "c" / "long.flac", 45)
    starts = np.arange(0.3, 44.0, 0.45)
    long_words = [[f" w{i}", round(float(s), 3), round(float(s) + 0.3, 3)] for i, s in enumerate(starts)]
    with open(tmp_path / "c" / "list.jsonl", "w") as f:
        f.write(json.dumps({"id": "three", "path": "three.flac", "alignment": "three_words.json"}) + "\n")
        f.write(json.dumps({"id": "long", "path": "long.flac", "aligned_text": long_words}) + "\n")
    exp = small_experiment(tmp_path / "w", stages=["extract"],
                           extract={"inputs": [{"name": "books", "path": str(tmp_path / "a")}, str(tmp_path / "b"),
                                               str(tmp_path / "c" / "list.jsonl")],
                                    "max_segment_seconds": 20, "tokenizer": {"n_units": 16, "fit_frames": 1000}})
    out = extract(exp)
    units = read_unit_shards(out.path).set_index("id")
    assert {i: units.dataset[i] for i in ("one", "two")} == {"one": "books", "two": "b"}

    def words(uid):
        value = units.aligned_text[uid]
        return [tuple(w) for w in json.loads(value)] if isinstance(value, str) else None  # null reads as None or NaN

    assert words("one") == [(" hello", 0.5, 0.9), (" world", 1.0, 1.6)]
    assert words("three") == [(" three", 0.2, 0.6)]
    assert words("two") is None and len(units.units["two"]) > 0  # kept, without words
    errors = [json.loads(line) for line in out.errors_path.read_text().splitlines()]
    assert [(e["id"], e["phase"]) for e in errors] == [("two", "alignment")]
    assert "0 <= start <= end" in errors[0]["error"] and "two.json" in errors[0]["error"]

    # the long file: cut in pauses into segments, each with the words inside it, shifted to its start
    segments = units[units.index.str.startswith("long@")].sort_index()
    assert len(segments) >= 3
    placed: dict[str, int] = {}
    for _, row in segments.iterrows():
        start, end = row.segment["start"], row.segment["end"]
        for w, s, e in parse_alignment(row.aligned_text):
            original = next(x for x in long_words if x[0] == w)
            assert s == pytest.approx(original[1] - start, abs=1e-6) and e <= end - start + 1e-6
            placed[w] = placed.get(w, 0) + 1
    assert set(placed.values()) == {1}  # no word twice
    cuts = [row.segment["start"] for _, row in segments.iterrows()][1:]
    lost = [w for w, s, e in long_words if w not in placed]
    assert len(lost) <= len(cuts)  # only a word the cutter split (at most one per cut) has no segment
    counts = json.loads(out.manifest_path.read_text())["counts"]
    assert counts["encoded"] == counts["files"] == 4 and counts["alignment_errors"] == 1
    assert counts["segments_with_words"] == 2 + len(segments)

    # slamkit's features JSONL carries the words (its interleaving reads `aligned_text` there)
    export_slamkit(exp, "features", tmp_path / "features.jsonl")
    exported = {Path(r["file_name"]).stem: r for r in map(json.loads, (tmp_path / "features.jsonl").read_text().splitlines())}
    assert exported["one"]["aligned_text"] == [[" hello", 0.5, 0.9], [" world", 1.0, 1.6]]
    assert "aligned_text" not in exported["two"]


def test_synth_alignments_reach_the_unit_shards(reduced_pipeline):
    """`@synth`: espeak's word times from synth's index are in every unit row (short files: one segment each)."""
    synth_index = pd.read_parquet(stage_dir(reduced_pipeline, "synth").path / "index.parquet").set_index("id")
    extracted = stage_dir(reduced_pipeline, "extract")
    units = read_unit_shards(extracted.path).set_index("id")
    assert extracted.read_manifest()["counts"]["segments_with_words"] == len(units) > 0
    for uid, row in units.iterrows():
        spoken = json.loads(synth_index.aligned_text[uid])
        got = json.loads(row.aligned_text)
        assert [w[0] for w in got] == [w[0] for w in spoken] and len(got) > 0
        np.testing.assert_allclose([w[1:] for w in got], [w[1:] for w in spoken], atol=1e-6)
    # the driver's rows point at the index instead of holding the words (gigabytes at sTinyStories' scale)
    rows = resolve_inputs(reduced_pipeline)
    assert len(rows) == len(synth_index) and all("synth_index" in r and "aligned_text" not in r for r in rows)


def test_a_shards_synth_alignments_are_read_from_the_index_row_groups_of_its_ids(tmp_path):
    """`@synth` words come from synth's index (a row group per synth shard, sorted by id) when a shard's units are
    written: only the row groups whose id range meets the shard's ids are read, the last two kept; other inputs'
    alignment sources pass through as they are."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from slam_ray.stages.extract import SynthWords, _chunk_sources

    path = tmp_path / "index.parquet"
    words = {f"utt{i:07d}": json.dumps([[f" w{i}", 0.0, 0.5]]) if i % 4 else None for i in range(30)}
    with pq.ParquetWriter(path, pa.schema([("id", pa.string()), ("aligned_text", pa.string())])) as writer:
        for start in range(0, 30, 10):  # three row groups, as synth writes one per shard
            ids = list(words)[start : start + 10]
            writer.write_table(pa.table({"id": ids, "aligned_text": [words[i] for i in ids]}))
            if start == 0:  # and an empty one (no statistics), as an older synth wrote for a shard that all failed
                writer.write_table(pa.table({"id": pa.array([], pa.string()), "aligned_text": pa.array([], pa.string())}))
    assert pq.ParquetFile(path).metadata.row_group(1).num_rows == 0
    sources = {uid: {"synth_index": str(path)} for uid, text in words.items() if text}
    sources["other"] = {"alignment_file": "/data/other.json", "sidecar": True}
    reader = SynthWords(str(path))

    got = _chunk_sources(["utt0000013", "utt0000021", "utt0000024", "other"], sources, reader)  # 24: no words
    assert got == {"utt0000013": {"aligned_text": words["utt0000013"]},
                   "utt0000021": {"aligned_text": words["utt0000021"]}, "other": sources["other"]}
    assert reader.groups_read == [2, 3]  # not the first nor the empty one
    assert _chunk_sources(["utt0000027"], sources, reader) == {"utt0000027": {"aligned_text": words["utt0000027"]}}
    assert reader.groups_read == [2, 3]  # kept
    assert _chunk_sources(["utt0000005"], sources, reader)["utt0000005"] == {"aligned_text": words["utt0000005"]}
    assert reader.groups_read == [2, 3, 0] and sorted(reader.groups) == [0, 3]  # two kept at most
    assert sources["utt0000005"] == {"synth_index": str(path)}  # the driver's map is left as it was


@pytest.mark.slow
def test_a_30_minute_file_is_encoded_as_contiguous_segments(fixtures, tmp_path, ray_local):
    """The stage writes one row per <= 60 s segment of a 30-minute file, contiguous and complete (its memory,
    bounded by that cut, is tests/parallel/test_encode.py's)."""
    from helpers import long_speech

    from slam_ray.config import TokenizerConfig
    from slam_ray.speech.tokenizer import UnitTokenizer

    long_speech(fixtures, tmp_path / "lecture.flac", 30 * 60)
    rng = np.random.default_rng(0)
    tok = UnitTokenizer(TokenizerConfig(n_units=16), rng.normal(size=(16, 80)).astype(np.float32),
                        np.zeros(80, np.float32), np.ones(80, np.float32))
    tok.save(tmp_path / "tok")
    exp = small_experiment(tmp_path / "w", stages=["extract"],
                           extract={"inputs": [str(tmp_path / "lecture.flac")], "max_segment_seconds": 60,
                                    "tokenizer": {"centroids": str(tmp_path / "tok" / "centroids.npy"), "n_units": 16}})
    units = read_unit_shards(extract(exp).path)
    assert len(units) >= 30 and all(i.startswith("lecture@") for i in units.id)
    starts = [s["start"] for s in units.segment]
    ends = [s["end"] for s in units.segment]
    assert starts[0] == 0 and ends[-1] == pytest.approx(1800) and starts[1:] == ends[:-1]
    assert max(e - s for s, e in zip(starts, ends, strict=True)) <= 60


@pytest.mark.slow
def test_killed_extraction_reruns_to_the_same_shards_as_a_clean_run(fixtures, tmp_path, ray_address):
    """SIGKILL `slam-ray extract` (its driver, joined to the session's Ray: its actors end with it) mid-way, run
    the same command again: it encodes only the missing shards and ends with exactly the shards and error lines
    of an uninterrupted run."""
    import pyarrow.parquet as pq
    from helpers import kill_and_rerun, save_tiny_hubert

    folder = tmp_path / "audio"
    corpus_with_broken_files(fixtures, folder)
    for i in range(40):
        shutil.copy(fixtures / f"audio{1 + i % 2}.flac", folder / f"copy{i:02d}.flac")
    model = save_tiny_hubert(tmp_path / "hubert", rate=25)

    def experiment(workdir, **extract_values):
        return small_experiment(workdir, stages=["extract"],
                                extract={"inputs": [str(folder)], "shard_files": 4, "batch_size": 2,
                                         "tokenizer": {"kind": "hubert", "model": model, "layer": 3, "n_units": 12,
                                                       "fit_frames": 1000}, **extract_values})

    # the reference run, in this process, encoded in the driver (local_encode_seconds: an operational field, the same
    # key; the driver's pass writes the shards a pool writes, test_a_small_encoding_pass_in_the_driver_...): the
    # killed run below is the one whose pool of actors matters
    clean_out = extract(experiment(tmp_path / "clean", local_encode_seconds=10**6))
    shard_names = sorted(p.name for p in (clean_out.path / "units").glob("part-*.parquet"))
    assert len(shard_names) == 12  # 46 inputs, 4 per shard

    # a pool of one actor (num_actors is operational too): what is killed is the driver, which ends its actors
    # however many; each actor is a process that imports torch and transformers (~6 s of CPU here), in each run
    killed_out = kill_and_rerun(experiment(tmp_path / "killed", num_actors=1), "extract", "units", 12, tmp_path,
                                ray_address=ray_address)
    assert sorted(p.name for p in (killed_out.path / "units").glob("part-*.parquet")) == shard_names
    for name in shard_names:
        assert pq.read_table(killed_out.path / "units" / name).equals(pq.read_table(clean_out.path / "units" / name)), name
    assert killed_out.errors_path.read_text() == clean_out.errors_path.read_text()  # same lines, none twice


def test_a_killed_encoding_actor_loses_and_duplicates_no_file(fixtures, tmp_path, ray_local):
    """SIGKILL an encoding actor mid-run: Ray restarts it and retries its batches, and every file still comes
    out exactly once, with the units an uninterrupted encoding gives it."""
    from slam_ray.speech.audio import decode_audio, write_flac
    from slam_ray.speech.tokenizer import UnitTokenizer

    folder = tmp_path / "audio"
    folder.mkdir()
    speech = [decode_audio(fixtures / f"audio{i}.flac") for i in (1, 2)]
    rng = np.random.default_rng(0)
    for i in range(96):
        source, length = speech[i % 2], int(rng.uniform(4.0, 12.0) * 16_000)
        start = int(rng.integers(0, len(source) - length))
        write_flac(folder / f"utt{i:03d}.flac", source[start : start + length])
    (folder / "broken.flac").write_bytes(b"junk")
    exp = small_experiment(tmp_path / "w", stages=["extract"],
                           extract={"inputs": [str(folder)], "num_actors": 2, "batch_size": 2, "shard_files": 8,
                                    "local_encode_seconds": 0,  # a pool, whatever the corpus's size
                                    "tokenizer": {"n_units": 16, "fit_frames": 1000}})
    shards = stage_dir(exp, "extract").path / "units"
    victim, errors = kill_a_worker_during(lambda: extract(exp), lambda: any(shards.glob("part-*.parquet")),
                                          actor_class="MapWorker(MapBatches(EncodeActor))")
    assert victim is not None, "the extraction finished before an encoding actor could be killed"
    assert not errors, errors
    out = stage_dir(exp, "extract")
    units = read_unit_shards(out.path)
    assert len(units) == 96 and sorted(units.id) == [f"utt{i:03d}" for i in range(96)]  # each exactly once
    assert [json.loads(line)["id"] for line in out.errors_path.read_text().splitlines()] == ["broken"]
    tokenizer = UnitTokenizer.load(out.path / "tokenizer")
    for row in units.itertuples():
        assert list(row.units) == tokenizer.encode(decode_audio(folder / f"{row.id}.flac"))["units"].tolist()
