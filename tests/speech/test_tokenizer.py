from __future__ import annotations

import numpy as np
import pytest

from slam_ray.config import TokenizerConfig
from slam_ray.errors import SlamError
from slam_ray.speech.audio import decode_audio
from slam_ray.speech.features import LogMelFeatures
from slam_ray.speech.tokenizer import UnitTokenizer, fit_kmeans


def test_fit_assign_save_load(fixtures, tmp_path):
    cfg = TokenizerConfig(n_units=16, fit_frames=1000, seed=0)
    feats = LogMelFeatures()
    audio = [decode_audio(fixtures / f"audio{i}.flac") for i in (1, 2)]
    centroids, mean, std = fit_kmeans([feats(a).numpy() for a in audio], cfg)
    assert centroids.shape == (16, 80)
    tok = UnitTokenizer(cfg, centroids, mean, std)
    enc = tok.encode(audio[0])
    assert enc["n_frames"] == 352
    assert int(enc["durations"].sum()) == 352
    assert enc["units"].max() < 16
    assert (np.diff(enc["units"].astype(int)) != 0).all()  # de-duplicated
    # nearest-centroid assignment agrees with a brute-force distance computation
    x = (feats(audio[0]).numpy() - mean) / std
    brute = ((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (tok.assign(feats(audio[0])) == brute).all()
    tok.save(tmp_path / "tok")
    again = UnitTokenizer.load(tmp_path / "tok").encode(audio[0])
    assert np.array_equal(again["units"], enc["units"])


def test_units_of_a_file_do_not_depend_on_other_files(fixtures, tmp_path):
    cfg = TokenizerConfig(n_units=8, fit_frames=1000)
    feats = LogMelFeatures()
    a1 = decode_audio(fixtures / "audio1.flac")
    tok = UnitTokenizer(cfg, *fit_kmeans([feats(a1).numpy()], cfg))
    alone = tok.encode(a1)["units"]
    tok.encode(decode_audio(fixtures / "audio2.flac"))
    assert np.array_equal(tok.encode(a1)["units"], alone)


def test_pretrained_centroids_npy_and_safetensors(tmp_path):
    from safetensors.numpy import save_file

    centroids = np.random.default_rng(0).normal(size=(10, 80)).astype(np.float32)
    np.save(tmp_path / "c.npy", centroids)
    save_file({"centroids": centroids}, str(tmp_path / "c.safetensors"))
    for name in ("c.npy", "c.safetensors"):
        tok = UnitTokenizer.from_centroids(TokenizerConfig(n_units=10, centroids=str(tmp_path / name)))
        assert np.array_equal(tok.centroids, centroids)
    with pytest.raises(SlamError, match=r"shape \(10, 80\) but extract.tokenizer.n_units=12"):
        UnitTokenizer.from_centroids(TokenizerConfig(n_units=12, centroids=str(tmp_path / "c.npy")))
    with pytest.raises(SlamError, match="not an existing file"):
        UnitTokenizer.from_centroids(TokenizerConfig(n_units=12, centroids=str(tmp_path / "missing.npy")))
    (tmp_path / "c.txt").write_text("1 2 3")
    with pytest.raises(SlamError, match="unknown format"):
        UnitTokenizer.from_centroids(TokenizerConfig(n_units=10, centroids=str(tmp_path / "c.txt")))


def test_slamkit_sklearn_kmeans_bin_needs_trust_pickle(tmp_path, fixtures):
    """slamkit/fairseq ship k-means as a joblib-pickled sklearn model (`km.bin`): loaded only when trusted, and
    then it assigns every frame to the same centroid sklearn's own `predict` does."""
    import joblib
    from sklearn.cluster import MiniBatchKMeans

    feats = LogMelFeatures()(decode_audio(fixtures / "audio1.flac")).numpy()
    kmeans = MiniBatchKMeans(n_clusters=12, random_state=0, n_init=3).fit(feats)
    joblib.dump(kmeans, tmp_path / "km.bin")
    with pytest.raises(SlamError, match="pickle.*trust_pickle=true"):
        UnitTokenizer.from_centroids(TokenizerConfig(n_units=12, centroids=str(tmp_path / "km.bin")))
    tok = UnitTokenizer.from_centroids(TokenizerConfig(n_units=12, centroids=str(tmp_path / "km.bin"), trust_pickle=True))
    assert np.array_equal(tok.assign(feats), kmeans.predict(feats))
    joblib.dump({"not": "kmeans"}, tmp_path / "other.bin")
    with pytest.raises(SlamError, match="not a fitted sklearn k-means"):
        UnitTokenizer.from_centroids(TokenizerConfig(n_units=12, centroids=str(tmp_path / "other.bin"), trust_pickle=True))


def test_not_enough_frames_for_units():
    with pytest.raises(SlamError, match="frames to fit"):
        fit_kmeans([np.zeros((5, 4), np.float32)], TokenizerConfig(n_units=16, fit_frames=1000))


def test_kmeans_finds_separated_clusters_and_is_no_worse_than_sklearn():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    means = rng.normal(0, 10, size=(8, 16)).astype(np.float32)
    frames = np.concatenate([m + rng.normal(0, 0.5, size=(500, 16)) for m in means]).astype(np.float32)
    cfg = TokenizerConfig(n_units=8, fit_frames=4000, seed=0)
    centroids, mean, std = fit_kmeans([frames], cfg)
    found = centroids * std + mean  # back to the raw feature space
    assert all(np.linalg.norm(found - m, axis=1).min() < 0.3 for m in means)  # one centroid on every blob
    again, _, _ = fit_kmeans([frames], cfg)
    assert np.array_equal(again, centroids)  # seeded: the same sample gives the same centroids
    # on overlapping data: inertia within 2% of scikit-learn's k-means (10 restarts)
    blobs = rng.normal(size=(3000, 8)).astype(np.float32)
    cfg = TokenizerConfig(n_units=16, fit_frames=3000, seed=0)
    centroids, mean, std = fit_kmeans([blobs], cfg)
    x = (blobs - mean) / std
    ours = ((x[:, None] - centroids[None]) ** 2).sum(-1).min(1).sum()
    assert ours <= 1.02 * KMeans(16, n_init=10, random_state=0).fit(x).inertia_


def test_decoding_tasks_feed_encoding_actors_one_row_per_segment(fixtures, tmp_path):
    """The extraction pipeline's two steps without Ray: `decode_rows` (the CPU tasks) streams a long file as
    segments, marking the count on the last; a file that breaks part-way closes with an error row counting the
    segments before it; `EncodeActor` gives every decoded segment the units of that segment encoded alone."""
    import pandas as pd
    import soundfile as sf
    from helpers import long_speech

    from slam_ray.parallel.encode import EncodeActor, decode_rows
    from slam_ray.speech.audio import decode_segments

    long_speech(fixtures, tmp_path / "long.flac", 70.0)
    noisy = np.random.default_rng(0).normal(0, 0.1, 16_000 * 50).astype(np.float32)
    noisy[16_000 * 40] = np.nan  # past the first 20 s window: one good segment, then the failure
    sf.write(tmp_path / "nan.wav", noisy, 16_000, subtype="FLOAT")
    (tmp_path / "junk.flac").write_bytes(b"not audio")
    rows = pd.DataFrame([{"id": "long", "path": str(tmp_path / "long.flac"), "text": "t", "speaker": "s"},
                         {"id": "short", "path": str(fixtures / "audio1.flac")},
                         {"id": "nan", "path": str(tmp_path / "nan.wav")},
                         {"id": "junk", "path": str(tmp_path / "junk.flac")}])
    parts = list(decode_rows(rows, max_segment_seconds=20))
    decoded = pd.concat(parts, ignore_index=True)
    assert all(len(p) == 1 for p in parts)  # streamed one segment at a time: memory bounded by a segment or two
    by_file = {uid: g for uid, g in decoded.groupby("input_id", sort=False)}
    expected = list(decode_segments(tmp_path / "long.flac", 20))
    long = by_file["long"]
    assert list(long.id) == [f"long@{k:04d}" for k in range(len(expected))] and len(expected) >= 4
    assert list(long.n_segments) == [0] * (len(expected) - 1) + [len(expected)]
    assert (long.text == "t").all() and long.error.isna().all()
    assert list(by_file["short"].id) == ["short"] and list(by_file["short"].n_segments) == [1]
    nan = by_file["nan"]
    assert nan.error.isna().tolist() == [True, False] and "NaN" in nan.error.iloc[1]
    assert list(nan.n_segments) == [0, 2]  # the error row closes the file: 1 segment before it + itself
    assert list(by_file["junk"].n_segments) == [1] and "cannot decode" in by_file["junk"].error.iloc[0]

    rng = np.random.default_rng(0)
    tok = UnitTokenizer(TokenizerConfig(n_units=16), rng.normal(size=(16, 80)).astype(np.float32),
                        np.zeros(80, np.float32), np.ones(80, np.float32))
    tok.save(tmp_path / "tok")
    encoded = EncodeActor(str(tmp_path / "tok"), flush_seconds=30)(decoded)
    assert "audio" not in encoded.columns and len(encoded) == len(decoded)
    good = encoded[encoded.error.isna()]
    assert list(good.id)[: len(expected)] == list(long.id)
    for (start, end, audio), row in zip(expected, good.itertuples(), strict=False):
        assert (row.seg_start, row.seg_end) == (start, end)
        assert list(row.units) == tok.encode(audio)["units"].tolist()  # batched == alone
    assert list(encoded.error.notna()) == list(decoded.error.notna())  # errors pass through, nothing else fails
    # on CPUs the actor decodes its own rows: the same rows, units and errors as the two steps
    itself = EncodeActor(str(tmp_path / "tok"), flush_seconds=30, decode={"max_segment_seconds": 20})(rows)
    pd.testing.assert_frame_equal(itself, encoded)
