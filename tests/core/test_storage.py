"""The storage layer on S3-compatible object storage (a real moto server on 127.0.0.1), in this process: stage folders
through a bucket, extraction inputs in a bucket, their fingerprints. Extraction from a bucket, training checkpoints in
a bucket, and no credential in what MLflow records are checked by the two-node job (tests/test_cluster_jobs.py)."""

from __future__ import annotations

import shutil

import pytest
from helpers import small_experiment

from slam_ray.config import to_yaml

pytestmark = pytest.mark.slow  # a moto server per test; no Ray


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


def test_a_bucket_prefix_holding_no_audio_is_a_config_error_naming_it(tmp_path, s3_server, monkeypatch, capsys):
    """`slam-ray extract` with an input prefix that holds no audio file fails listing its inputs, before any Ray,
    naming the entry. (Inputs in a bucket that do hold audio, a corrupt object and a manifest entry pointing at
    nothing among them, are extracted by the two-node job in tests/test_cluster_jobs.py.)"""
    import boto3

    from slam_ray.cli import EXIT_USAGE, main

    url, port, env = s3_server
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    s3.create_bucket(Bucket="speech")
    s3.put_object(Bucket="speech", Key="corpus/notes.txt", Body=b"not an audio suffix")
    query = f"?endpoint_override=127.0.0.1:{port}&scheme=http"
    for prefix in ("nothing", "corpus"):  # absent, and present without audio
        empty = small_experiment(tmp_path / prefix, stages=["extract"], extract={"inputs": [f"s3://speech/{prefix}{query}"]})
        (tmp_path / f"{prefix}.yaml").write_text(to_yaml(empty))
        assert main(["extract", str(tmp_path / f"{prefix}.yaml")]) == EXIT_USAGE
        shown = capsys.readouterr()
        assert f"s3://speech/{prefix}" in shown.out + shown.err and "holds no audio file" in shown.out + shown.err


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
