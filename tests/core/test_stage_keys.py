"""Stage keys see inputs given by path: each kind of input edited in place makes a new key (and a new key
downstream), an untouched one keeps it, an absent one is keyed as absent; and a stage really runs again after
its input file is edited."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import small_experiment

from slam_ray.core.fingerprint import snapshot
from slam_ray.core.stage_io import stage_dir, stage_key, stage_payload
from slam_ray.lm.packed import PackedWindows


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _later(path: Path) -> None:
    """Move a file's mtime a second on: an edit minutes after the last run, without sleeping in the test."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def _keys(exp, stages: tuple[str, ...]) -> dict[str, str]:
    return {s: stage_key(exp, s) for s in stages}


def _assert_edit_changes(exp, stages: tuple[str, ...], edit) -> None:
    """Keys are stable while nothing changes, and every listed stage's key changes after `edit()`."""
    before = _keys(exp, stages)
    assert _keys(exp, stages) == before  # unchanged input: identical keys
    edit()
    after = _keys(exp, stages)
    assert all(after[s] != before[s] for s in stages), (before, after)


def test_task_yaml_edited_in_place_changes_the_eval_key(tmp_path):
    task = tmp_path / "mine.yaml"
    task.write_text("description: my pairs\nreader: manifest\n")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": "a", "positive": "x.wav", "negative": "y.wav"}) + "\n")
    exp = small_experiment(tmp_path / "w", eval={"tasks": [{"task": str(task), "path": str(pairs)}]})
    _assert_edit_changes(exp, ("eval",), lambda: task.write_text("description: my pairs\nreader: manifest\n"
                                                                  "breakdown: [subset]\n"))
    # the dataset manifest the task reads is an input too (same size: the content tells)
    _assert_edit_changes(exp, ("eval",), lambda: pairs.write_text(pairs.read_text().replace('"a"', '"b"')))


def test_a_piper_voice_file_used_only_for_preferences_edited_in_place_changes_the_synth_key(tmp_path):
    """synth.preferences.voices of their own (piper .onnx files): a retrained voice is a new key, as one of
    synth.voices is (it was not seen: the stale preference audio was reused)."""
    voice = tmp_path / "pref_voice.onnx"
    voice.write_bytes(b"weights v1")
    swag = tmp_path / "swag.jsonl"
    swag.write_text(json.dumps({"context": "a", "endings": ["b", "c"], "label": 0}) + "\n")
    exp = small_experiment(tmp_path / "w", stages=["synth"],
                           synth={"backend": "piper", "voices": ["en_US-lessac-medium"],
                                  "preferences": {"path": str(swag), "voices": [str(voice)]}})
    _assert_edit_changes(exp, ("synth",), lambda: voice.write_bytes(b"weights v2"))
    named = small_experiment(tmp_path / "w", stages=["synth"], synth={"backend": "piper", "voices": ["en_US-lessac-medium"],
                                                                      "preferences": {"path": str(swag)}})
    assert "preferences.voices" not in stage_payload(named, "synth")["synth"].get("fingerprints", {})


def test_pack_jsonl_edited_in_place_changes_pack_and_everything_after(tmp_path):
    units = tmp_path / "features.jsonl"
    units.write_text(json.dumps({"file_name": "a.wav", "units": [1, 2, 3]}) + "\n")
    exp = small_experiment(tmp_path / "w", stages=["pack", "train", "eval"], pack={"inputs": [str(units)]},
                           eval={"tasks": ["word_order"], "checkpoints": ["final"]})
    # same length: only the content differs
    _assert_edit_changes(exp, ("pack", "train", "eval"),
                         lambda: units.write_text(units.read_text().replace("[1, 2, 3]", "[1, 2, 4]")))


def test_extract_folder_and_manifest_edited_in_place_change_extract_and_after(tmp_path):
    audio = _folder(tmp_path / "audio", {"a/1.flac": b"one", "b/2.flac": b"two"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "audio/a/1.flac"}) + "\n")
    exp = small_experiment(tmp_path / "w", extract={"inputs": [str(audio), {"name": "listed", "path": str(manifest)}]})
    # a nested file rewritten (the folder's own mtime does not change)
    _assert_edit_changes(exp, ("extract", "pack", "train"), lambda: (audio / "b" / "2.flac").write_bytes(b"two!"))
    _assert_edit_changes(exp, ("extract", "pack"), lambda: (audio / "a" / "3.flac").write_bytes(b"new file"))
    _assert_edit_changes(exp, ("extract", "pack"),
                         lambda: manifest.write_text(manifest.read_text().replace("1.flac", "3.flac")))
    glob_exp = small_experiment(tmp_path / "w", extract={"inputs": [str(audio / "**" / "*.flac")]})
    _assert_edit_changes(glob_exp, ("extract",), lambda: (audio / "b" / "4.flac").write_bytes(b"four"))


def test_a_named_extract_input_keys_pack_by_extract(tmp_path):
    """`pack.inputs: [{name: speech, path: "@extract"}]` (a name for `pack.mix`) reads extract's units as the
    plain "@extract" does: pack's key must follow extract's (it did not, and new units reused a stale pack)."""
    for inputs in (["@extract"], [{"name": "speech", "path": "@extract"}]):
        exp = small_experiment(tmp_path / "w", pack={"inputs": inputs})
        changed = small_experiment(tmp_path / "w", pack={"inputs": inputs}, extract={"tokenizer": {"n_units": 32}})
        assert stage_key(exp, "extract") != stage_key(changed, "extract")
        assert stage_key(exp, "pack") != stage_key(changed, "pack"), inputs


def test_a_symlinked_subfolder_is_fingerprinted_as_the_readers_follow_it(tmp_path):
    """A dataset assembled from links (`salmon/bg_alone -> /mnt/ds/bg_alone`): files replaced or added behind the
    link make a new eval key (the link's files were left out of the listing: 0 files, the stale result reused);
    a link back up the tree is not walked twice."""
    from slam_ray.core.fingerprint import fingerprint

    mounted = _folder(tmp_path / "mnt" / "bg_alone", {"0_pos.wav": b"one", "0_neg.wav": b"two"})
    salmon = tmp_path / "salmon"
    salmon.mkdir()
    (salmon / "bg_alone").symlink_to(mounted, target_is_directory=True)
    (salmon / "bg_alone" / "loop").symlink_to(salmon, target_is_directory=True)  # a cycle
    assert fingerprint(str(salmon))["files"] == 2
    exp = small_experiment(tmp_path / "w", eval={"tasks": [{"task": "salmon", "path": str(salmon),
                                                            "subsets": ["bg_alone"]}]})
    _assert_edit_changes(exp, ("eval",), lambda: (mounted / "0_neg.wav").write_bytes(b"TWO"))
    _assert_edit_changes(exp, ("eval",), lambda: (mounted / "1_pos.wav").write_bytes(b"three"))


def test_centroids_and_model_folders_edited_in_place_change_their_keys(tmp_path):
    centroids = tmp_path / "km.npy"
    np.save(centroids, np.zeros((4, 3), dtype=np.float32))
    exp = small_experiment(tmp_path / "w", extract={"tokenizer": {"centroids": str(centroids), "n_units": 4}})
    _assert_edit_changes(exp, ("extract", "pack"), lambda: np.save(centroids, np.ones((4, 3), dtype=np.float32)))

    model = _folder(tmp_path / "base", {"config.json": b"{}", "model.safetensors": b"w" * 100})
    exp = small_experiment(tmp_path / "w", train={"model": {"base": str(model)}})

    def rewrite_weights() -> None:  # same size, written later
        (model / "model.safetensors").write_bytes(b"v" * 100)
        _later(model / "model.safetensors")

    _assert_edit_changes(exp, ("train", "eval"), rewrite_weights)

    init = _folder(tmp_path / "init", {"config.json": b"{}", "model.safetensors": b"w" * 10})
    exp = small_experiment(tmp_path / "w", stages=["dpo", "eval"], dpo={"init": str(init), "max_steps": 2})
    _assert_edit_changes(exp, ("dpo", "eval"), lambda: (init / "model.safetensors").write_bytes(b"w" * 11))


def test_eval_checkpoint_folder_and_synth_corpus_edited_in_place_change_their_keys(tmp_path):
    ckpt = _folder(tmp_path / "ckpt", {"config.json": b"{}", "model.safetensors": b"w" * 10})
    exp = small_experiment(tmp_path / "w", stages=["eval"], eval={"tasks": ["word_order"], "checkpoints": [str(ckpt)]})
    _assert_edit_changes(exp, ("eval",), lambda: (ckpt / "model.safetensors").write_bytes(b"x" * 12))

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat\nthe dog ran\n")
    exp = small_experiment(tmp_path / "w", synth={"corpus": {"source": "text", "path": str(corpus)}})
    _assert_edit_changes(exp, ("synth", "extract", "pack"),
                         lambda: corpus.write_text(corpus.read_text().replace("cat", "cow")))


def test_dpo_jsonl_edited_in_place_changes_the_dpo_key(tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": [1], "chosen": [2], "rejected": [3]}) + "\n")
    exp = small_experiment(tmp_path / "w", stages=["dpo"], dpo={"init": "some/model", "inputs": [str(prefs)],
                                                                "max_steps": 2})
    _assert_edit_changes(exp, ("dpo",), lambda: prefs.write_text(prefs.read_text().replace("[3]", "[4]")))


def test_absent_inputs_are_keyed_as_absent(tmp_path):
    """`config show` and a recipe whose data/ is not there yet still get keys, saying what is absent; an HF id
    is not a local path, so it is keyed by its name alone."""
    exp = small_experiment(tmp_path / "w", extract={"inputs": ["data/nowhere"], "tokenizer": {"centroids": "km.npy"}},
                           train={"model": {"base": "Qwen/Qwen2.5-0.5B"}})
    extract = stage_payload(exp, "extract")["extract"]["fingerprints"]
    assert extract == {"inputs": [{"path": "data/nowhere", "absent": True}],
                       "tokenizer.centroids": {"path": "km.npy", "absent": True}}
    assert stage_payload(exp, "train")["train"]["fingerprints"] == {
        "model.base": {"path": "Qwen/Qwen2.5-0.5B", "absent": True}}
    before = stage_key(exp, "extract")
    _folder(tmp_path / "data" / "nowhere", {"x.wav": b"x"})  # the data arrives: a new key
    here = Path.cwd()
    os.chdir(tmp_path)
    try:
        assert stage_key(exp, "extract") != before
    finally:
        os.chdir(here)


def test_a_snapshot_fingerprints_each_input_once(tmp_path):
    """Within one command (a snapshot) an input is read once, so every key of the command agrees; the next
    command sees the edit."""
    units = tmp_path / "features.jsonl"
    units.write_text(json.dumps({"units": [1, 2, 3]}) + "\n")
    exp = small_experiment(tmp_path / "w", pack={"inputs": [str(units)]})
    with snapshot():
        before = stage_key(exp, "pack")
        units.write_text(json.dumps({"units": [1, 2, 4]}) + "\n")
        assert stage_key(exp, "pack") == before
    assert stage_key(exp, "pack") != before


def test_eval_units_cache_sees_audio_rewritten_in_place(tmp_path, monkeypatch):
    """The cache of a dataset's units (keyed by its file list) encodes a file again once it is rewritten. The
    encoder here is a stand-in (units = the file's bytes): what is under test is the cache, not the tokenizer."""
    from slam_ray.parallel import audio_units as evaluation
    def encode(exp, rows, *args, **kwargs):
        return [{"path": r["path"], "seg_start": 0.0, "units": list(Path(r["path"]).read_bytes()), "durations": [1]}
                for r in rows], []

    monkeypatch.setattr(evaluation, "encode_files", encode)
    monkeypatch.setattr(evaluation, "init_ray", lambda exp: None)
    monkeypatch.setattr(evaluation, "tokenizer_dir", lambda exp: "")
    wav = tmp_path / "a.wav"
    wav.write_bytes(b"\x01\x02")
    exp = small_experiment(tmp_path / "w")
    assert evaluation.audio_units(exp, [str(wav)])[0] == {str(wav): [1, 2]}
    wav.write_bytes(b"\x03\x04")
    _later(wav)  # written later than the first encoding (a test is faster than the clock's granularity)
    assert evaluation.audio_units(exp, [str(wav)])[0] == {str(wav): [3, 4]}


@pytest.mark.slow
def test_pack_runs_again_after_its_jsonl_is_edited_in_place(tmp_path):
    """The real stage: a second `pack` reuses its output; after the JSONL gains utterances in place, `pack`
    runs again and its windows hold them."""
    from slam_ray.stages.pack import pack

    units = tmp_path / "features.jsonl"
    rows = [{"file_name": f"u{i}.wav", "units": list(range(i % 7, i % 7 + 20))} for i in range(40)]
    units.write_text("".join(json.dumps(r) + "\n" for r in rows))
    exp = small_experiment(tmp_path / "w", stages=["pack"], pack={"inputs": [str(units)], "context_len": 16,
                                                                  "val_fraction": 0.1})
    first = pack(exp)
    assert pack(exp).root == first.root  # reused: nothing changed
    with open(units, "a") as f:  # edited in place: 40 more utterances
        f.writelines(json.dumps({**r, "file_name": "more-" + r["file_name"]}) + "\n" for r in rows)
    second = pack(exp)
    assert second.root != first.root and second.is_complete() and first.is_complete()
    assert stage_dir(exp, "pack").root == second.root
    assert second.read_manifest()["counts"]["utterances"] == 80 and first.read_manifest()["counts"]["utterances"] == 40
    windows = lambda out: sum(len(PackedWindows(out.path, s)) for s in ("train", "val"))  # noqa: E731
    assert windows(second) > windows(first)


def test_an_alignment_beside_a_single_audio_file_or_glob_match_is_keyed(tmp_path):
    """A `<name>.json` added (or edited) beside an audio file given alone or through a glob makes a new extract key
    (a folder's listing already covers its files); inputs without one keep their keys."""
    import json
    import shutil

    from helpers import FIXTURES, small_experiment

    from slam_ray.core.stage_io import stage_key

    shutil.copy(FIXTURES / "audio1.flac", tmp_path / "one.flac")
    single = small_experiment(tmp_path / "w", stages=["extract"], extract={"inputs": [str(tmp_path / "one.flac")]})
    globbed = small_experiment(tmp_path / "w", stages=["extract"], extract={"inputs": [str(tmp_path / "*.flac")]})
    before = stage_key(single, "extract"), stage_key(globbed, "extract")
    (tmp_path / "one.json").write_text(json.dumps([[" one", 0.1, 0.4]]))
    with_words = stage_key(single, "extract"), stage_key(globbed, "extract")
    assert with_words[0] != before[0] and with_words[1] != before[1]
    (tmp_path / "one.json").write_text(json.dumps([[" one", 0.1, 0.5]]))
    assert (stage_key(single, "extract"), stage_key(globbed, "extract")) != with_words


def test_a_home_relative_input_is_fingerprinted_not_taken_as_absent(tmp_path, monkeypatch):
    """An eval dataset at `~/data/...` (the eval readers expand `~`) keys the eval stage by its files: an edit
    changes the key (it used to be fingerprinted as absent, so edits went unseen)."""
    from slam_ray.core.fingerprint import fingerprint

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = _folder(tmp_path / "home" / "data" / "ssc", {"1_correct.wav": b"a", "1_incorrect.wav": b"b"})
    got = fingerprint("~/data/ssc")
    assert "absent" not in got and got["path"] == "~/data/ssc"  # the path as written, the content measured
    exp = small_experiment(tmp_path / "w", eval={"tasks": [{"task": "ssc", "path": "~/data/ssc"}]})
    _assert_edit_changes(exp, ("eval",), lambda: (folder / "1_correct.wav").write_bytes(b"another"))


def test_a_gpu_extract_in_bf16_and_its_cpu_rerun_do_not_share_an_output(tmp_path):
    """HuBERT runs tokenizer.dtype on a GPU only (fp32 on CPU): a bf16 GPU extract killed and rerun with
    num_gpus_per_actor 0 would have finished its shards in fp32 in the same folder (the GPU count is operational).
    With fp32 both compute the same units: the GPU count stays out of the key."""
    def key(gpus: float, dtype: str) -> str:
        exp = small_experiment(tmp_path / "w", extract={"num_gpus_per_actor": gpus, "tokenizer": {
            "kind": "hubert", "model": "slprl/mhubert-base-25hz", "layer": 11, "dtype": dtype}})
        return stage_key(exp, "extract")

    assert key(0.5, "bfloat16") != key(0.0, "bfloat16")
    assert key(0.5, "float32") == key(0.0, "float32") == key(1.0, "float32")
    assert key(0.5, "bfloat16") == key(1.0, "bfloat16")


def test_dpo_triples_are_keyed_by_what_they_are_made_of_not_by_how_dpo_trains(tmp_path):
    """The spoken triples cache (WORKDIR/dpo_triples/<key>): a DPO from another checkpoint, on another schedule or
    in another precision reuses the triples (a sweep over DPO settings spoke them again in every trial); other
    pairs, voices or tokenizer make new ones."""
    from slam_ray.config import with_values
    from slam_ray.core.stage_io import config_hash
    from slam_ray.stages.dpo import triples_payload

    exp = small_experiment(tmp_path / "w", stages=["synth", "extract", "pack", "train", "dpo"], dpo={"max_steps": 40})
    key = config_hash(triples_payload(exp))
    same = {"dpo.init": str(tmp_path / "elsewhere"), "dpo.schedule": "cosine", "dpo.precision": "bf16",
            "dpo.strategy": "fsdp", "dpo.lr": 1e-5, "dpo.max_steps": 7, "train.optimizer.lr": 1e-5}
    for field, value in same.items():
        assert config_hash(triples_payload(with_values(exp, {field: value}, "test"))) == key, field
    for field, value in {"dpo.n_pairs": 7, "synth.voices": ["en-gb"], "extract.tokenizer.n_units": 17}.items():
        assert config_hash(triples_payload(with_values(exp, {field: value}, "test"))) != key, field
