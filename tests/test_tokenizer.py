from __future__ import annotations

import numpy as np
import pytest

from slam_ray.audio import decode_audio
from slam_ray.config import TokenizerConfig
from slam_ray.errors import SlamError
from slam_ray.features import LogMelFeatures
from slam_ray.tokenizer import UnitTokenizer, fit_kmeans


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
