"""The storage layer on S3-compatible object storage (a real moto server on 127.0.0.1): stage folders through a
bucket, extraction inputs in a bucket, their fingerprints. Training checkpoints in a bucket, and no credential in
what MLflow records, are checked by the two-node job (tests/test_cluster_jobs.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import S3_SECRET as SECRET
from helpers import small_experiment

from slam_ray.config import to_yaml
from slam_ray.core.stage_io import stage_dir

pytestmark = [pytest.mark.ray, pytest.mark.own_ray, pytest.mark.slow]  # own_ray: tests/lanes.py

def test_storage_layer_round_trips_files_and_folders_through_a_bucket(tmp_path, s3_server, monkeypatch):
    """The layer every stage writes through: a stage folder written locally and published, then read on
    "another machine" (a fresh cache) file by file and folder by folder; only missing files are fetched."""
    from slam_ray.core import storage
    from slam_ray.core.stage_io import StageDir

    url, port, env = s3_server
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import boto3

    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="work")
    root = f"s3://work/exp/extract/abc?endpoint_override=127.0.0.1:{port}&scheme=http"
    assert storage.join(root, "units", "p.parquet") == (f"s3://work/exp/extract/abc/units/p.parquet"
                                                         f"?endpoint_override=127.0.0.1:{port}&scheme=http")
    monkeypatch.setenv("SLAM_RAY_CACHE", str(tmp_path / "node_a"))
    out = StageDir("extract", "abc", root)
    assert out.remote and out.path.is_relative_to(tmp_path / "node_a") and out.read_manifest() is None
    (out.path / "tokenizer").mkdir(parents=True)
    (out.path / "tokenizer" / "centroids.npy").write_bytes(b"\x00" * 1000)
    (out.path / "tokenizer" / "tokenizer.json").write_text("{}")
    (out.path / "tokenizer" / ".half.tmp").write_text("a temporary file is never published")
    out.publish("tokenizer")
    out.write_manifest({"status": "complete"})
    storage.write_bytes(out.location("audio", "a.flac"), b"written by an actor")

    monkeypatch.setenv("SLAM_RAY_CACHE", str(tmp_path / "node_b"))  # another node: nothing local yet
    there = StageDir("extract", "abc", root)
    assert not there.path.exists() and there.is_complete()
    folder = there.local("tokenizer")
    assert folder.is_relative_to(tmp_path / "node_b") and sorted(p.name for p in folder.iterdir()) == [
        "centroids.npy", "tokenizer.json"]
    assert (folder / "centroids.npy").read_bytes() == b"\x00" * 1000
    assert there.local("audio", "a.flac").read_bytes() == b"written by an actor"
    assert storage.read_text(there.location("missing.json")) is None and not storage.exists(there.location("nope"))
    assert not there.local("nothing", "here").exists()
    there.write_manifest({"status": "failed!!"})  # as long as "complete": a file is published whatever its size
    assert StageDir("extract", "abc", root).read_manifest() == {"status": "failed!!"}
    stamp = (folder / "tokenizer.json").stat().st_mtime_ns
    storage.write_bytes(there.location("tokenizer", "extra.bin"), b"new")
    there.local("tokenizer")  # completes the copy, leaves the files it has
    assert (folder / "extra.bin").read_bytes() == b"new" and (folder / "tokenizer.json").stat().st_mtime_ns == stamp
    # a local location is used in place: nothing is copied
    assert storage.localize(str(tmp_path / "x")) == tmp_path / "x" and storage.model_source("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"

    # An upload interrupted half-way (Ctrl+C; `ray job stop` raises SystemExit) leaves no object: pyarrow commits
    # the stream it closes on the way out, and a truncated shard passed for a finished one (sizes then never
    # match: fetched over the good local copy) and an empty manifest crashed every later run.
    (there.path / "units").mkdir()
    (there.path / "units" / "part-00000.parquet").write_bytes(b"u" * 100_000)
    real_copy = shutil.copyfileobj

    def interrupted(src, dst, length=0):  # noqa: ANN001
        dst.write(src.read(1000))
        raise KeyboardInterrupt

    monkeypatch.setattr(storage.shutil, "copyfileobj", interrupted)
    for publish in (lambda: there.publish("units"), lambda: there.write_manifest({"status": "running"})):
        with pytest.raises(KeyboardInterrupt):
            publish()
    monkeypatch.setattr(storage.shutil, "copyfileobj", real_copy)
    assert not storage.exists(there.location("units", "part-00000.parquet"))
    assert storage.read_text(there.location("manifest.json")) is None  # gone, not empty: the stage is not started
    there.publish("units")
    with storage.open_input(there.location("units", "part-00000.parquet")) as f:
        assert f.read() == b"u" * 100_000


def test_extract_reads_folders_and_manifests_from_s3(tmp_path, s3_server, fixtures, monkeypatch, capsys):
    """`extract.inputs` in a bucket: a folder (recursively) and a JSONL manifest with paths relative to it.
    Every good object yields the units of the same file read from disk; a corrupt object and a manifest entry
    pointing at nothing are error lines; a prefix holding no audio is a config error naming the entry."""
    import boto3

    from slam_ray.cli import EXIT_USAGE, main
    from slam_ray.speech.audio import decode_audio
    from slam_ray.speech.tokenizer import UnitTokenizer
    from slam_ray.speech.units import read_unit_shards

    url, port, env = s3_server
    s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=SECRET, region_name="us-east-1")
    s3.create_bucket(Bucket="speech")
    s3.upload_file(str(fixtures / "audio1.flac"), "speech", "corpus/a/audio1.flac")
    s3.upload_file(str(fixtures / "audio2.flac"), "speech", "corpus/b/audio2.flac")
    s3.put_object(Bucket="speech", Key="corpus/bad.flac", Body=b"not audio at all")
    s3.put_object(Bucket="speech", Key="corpus/notes.txt", Body=b"not an audio suffix: skipped")
    manifest = [{"id": "again", "path": "../corpus/a/audio1.flac", "text": "the same file", "speaker": "s1"},
                {"id": "gone", "path": "../corpus/missing.flac"}]
    s3.put_object(Bucket="speech", Key="lists/more.jsonl", Body="\n".join(json.dumps(m) for m in manifest).encode())
    query = f"?endpoint_override=127.0.0.1:{port}&scheme=http"
    exp = small_experiment(tmp_path / "work", stages=["extract"],
                           extract={"inputs": [f"s3://speech/corpus{query}", f"s3://speech/lists/more.jsonl{query}"],
                                    "tokenizer": {"n_units": 16, "fit_frames": 1000}})
    (tmp_path / "s3.yaml").write_text(to_yaml(exp))

    def extract(path):
        return subprocess.run([sys.executable, "-m", "slam_ray.cli", "extract", str(path)], cwd=tmp_path,
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=600)

    proc = extract(tmp_path / "s3.yaml")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for name, value in env.items():  # keying an input in a bucket lists it: this process needs the credentials too
        monkeypatch.setenv(name, value)
    out = stage_dir(exp, "extract").path
    rows = {r["id"]: r for r in read_unit_shards(out).to_dict("records")}
    assert sorted(rows) == ["a/audio1", "again", "b/audio2"]
    assert rows["again"]["text"] == "the same file" and rows["a/audio1"]["path"].startswith("s3://speech/corpus/a/")
    errors = {json.loads(line)["id"]: json.loads(line)["error"] for line in (out / "errors.jsonl").read_text().splitlines()}
    assert sorted(errors) == ["bad", "gone"]
    tokenizer = UnitTokenizer.load(out / "tokenizer")
    for uid, local in (("a/audio1", "audio1"), ("again", "audio1"), ("b/audio2", "audio2")):
        expected = tokenizer.encode(decode_audio(fixtures / f"{local}.flac"))
        assert list(rows[uid]["units"]) == expected["units"].tolist()

    empty = small_experiment(tmp_path / "empty", stages=["extract"], extract={"inputs": [f"s3://speech/nothing{query}"]})
    (tmp_path / "empty.yaml").write_text(to_yaml(empty))
    # the same command in this process (it fails listing its inputs, before any Ray): a subprocess's imports saved
    assert main(["extract", str(tmp_path / "empty.yaml")]) == EXIT_USAGE
    shown = capsys.readouterr()
    assert "s3://speech/nothing" in shown.out + shown.err and "holds no audio file" in shown.out + shown.err


def test_bucket_inputs_are_fingerprinted_by_their_listing(tmp_path, s3_server, monkeypatch):
    """An input in a bucket is keyed by its objects' sizes and modification times: an object rewritten in
    place makes a new key, a missing prefix is keyed as absent; folder, glob and single object list alike."""
    import boto3

    from slam_ray.core import storage
    from slam_ray.core.fingerprint import fingerprint

    url, port, env = s3_server
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    s3.create_bucket(Bucket="data")
    s3.put_object(Bucket="data", Key="corpus/a/1.flac", Body=b"one")
    s3.put_object(Bucket="data", Key="corpus/b/2.flac", Body=b"two")
    s3.put_object(Bucket="data", Key="corpus/notes.txt", Body=b"notes")
    uri = lambda path: f"s3://data/{path}?endpoint_override=127.0.0.1:{port}&scheme=http"  # noqa: E731
    assert [r for r, _ in storage.list_files(uri("corpus"))] == ["a/1.flac", "b/2.flac", "notes.txt"]
    assert [r for r, _ in storage.list_files(uri("corpus/**/*.flac"))] == ["a/1.flac", "b/2.flac"]
    assert storage.list_files(uri("corpus/a/1.flac")) == [("1.flac", uri("corpus/a/1.flac"))]
    assert storage.list_files(uri("nothing")) == [] and storage.listing(uri("nothing")) is None

    folder, glob_ = fingerprint(uri("corpus")), fingerprint(uri("corpus/**/*.flac"))
    assert folder["files"] == 3 and folder["bytes"] == 11 and glob_["files"] == 2
    assert fingerprint(uri("corpus")) == folder  # unchanged: the same key
    s3.put_object(Bucket="data", Key="corpus/b/2.flac", Body=b"two, again")  # rewritten in place
    assert fingerprint(uri("corpus")) != folder and fingerprint(uri("corpus/**/*.flac")) != glob_
    assert fingerprint(uri("absent/")) == {"path": uri("absent/"), "absent": True}
