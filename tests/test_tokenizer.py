from __future__ import annotations

import numpy as np
import pytest

from slam_ray.audio import decode_audio
from slam_ray.config import TokenizerConfig
from slam_ray.errors import SlamError
from slam_ray.tokenizer import LogMelFeatures, UnitTokenizer, fit_kmeans


def test_logmel_frames_follow_mhubert_25hz_convention(fixtures):
    """352 and 398 frames: the frame counts slamkit's 25 Hz units of the same files sum to."""
    feats = LogMelFeatures(frame_rate=25, n_mels=80)
    f1 = feats(decode_audio(fixtures / "audio1.flac"))
    f2 = feats(decode_audio(fixtures / "audio2.flac"))
    assert f1.shape == (352, 80) and f2.shape == (398, 80)
    assert np.isfinite(f1).all()


def test_too_short_audio_is_an_error():
    with pytest.raises(ValueError, match="shorter than one frame"):
        LogMelFeatures()(np.zeros(100, np.float32))


def test_fit_assign_save_load(fixtures, tmp_path):
    cfg = TokenizerConfig(n_units=16, fit_frames=1000, seed=0)
    feats = LogMelFeatures()
    audio = [decode_audio(fixtures / f"audio{i}.flac") for i in (1, 2)]
    centroids, mean, std = fit_kmeans([feats(a) for a in audio], cfg)
    assert centroids.shape == (16, 80)
    tok = UnitTokenizer(cfg, centroids, mean, std)
    enc = tok.encode(audio[0])
    assert enc["n_frames"] == 352
    assert int(enc["durations"].sum()) == 352
    assert enc["units"].max() < 16
    assert (np.diff(enc["units"].astype(int)) != 0).all()  # de-duplicated
    # nearest-centroid assignment agrees with a brute-force distance computation
    x = (feats(audio[0]) - mean) / std
    brute = ((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (tok.assign(feats(audio[0])) == brute).all()
    tok.save(tmp_path / "tok")
    again = UnitTokenizer.load(tmp_path / "tok").encode(audio[0])
    assert np.array_equal(again["units"], enc["units"])


def test_units_of_a_file_do_not_depend_on_other_files(fixtures, tmp_path):
    cfg = TokenizerConfig(n_units=8, fit_frames=1000)
    feats = LogMelFeatures()
    a1 = decode_audio(fixtures / "audio1.flac")
    tok = UnitTokenizer(cfg, *fit_kmeans([feats(a1)], cfg))
    alone = tok.encode(a1)["units"]
    tok.encode(decode_audio(fixtures / "audio2.flac"))
    assert np.array_equal(tok.encode(a1)["units"], alone)


def test_pretrained_centroids(tmp_path):
    np.save(tmp_path / "c.npy", np.random.default_rng(0).normal(size=(10, 80)).astype(np.float32))
    tok = UnitTokenizer.from_centroids(TokenizerConfig(n_units=10, centroids=str(tmp_path / "c.npy")))
    assert tok.centroids.shape == (10, 80)
    with pytest.raises(SlamError, match="holds 10 centroids"):
        UnitTokenizer.from_centroids(TokenizerConfig(n_units=12, centroids=str(tmp_path / "c.npy")))
    with pytest.raises(SlamError, match="not an existing .npy"):
        UnitTokenizer.from_centroids(TokenizerConfig(n_units=12, centroids=str(tmp_path / "missing.npy")))


def test_not_enough_frames_for_units():
    with pytest.raises(SlamError, match="frames to fit"):
        fit_kmeans([np.zeros((5, 4), np.float32)], TokenizerConfig(n_units=16, fit_frames=1000))
