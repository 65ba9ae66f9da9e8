from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from slam_ray.audio import AudioError, decode_audio, write_flac


def test_decodes_the_fixture_flacs(fixtures):
    a1 = decode_audio(fixtures / "audio1.flac")
    a2 = decode_audio(fixtures / "audio2.flac")
    assert (a1.dtype, a1.ndim, len(a1)) == (np.float32, 1, 225_360)
    assert len(a2) == 255_120
    assert 0.01 < np.abs(a1).max() <= 1.0


def test_stereo_is_mixed_and_resampled(tmp_path):
    t = np.arange(44_100) / 44_100
    left, right = np.sin(2 * np.pi * 440 * t), np.zeros_like(t)
    sf.write(tmp_path / "s.wav", np.stack([left, right], 1).astype(np.float32), 44_100)
    audio = decode_audio(tmp_path / "s.wav")
    assert len(audio) == 16_000
    assert np.abs(audio).max() == pytest.approx(0.5, abs=0.02)


def test_flac_round_trip(tmp_path):
    audio = (0.3 * np.sin(np.linspace(0, 200, 8000))).astype(np.float32)
    write_flac(tmp_path / "x.flac", audio)
    back = decode_audio(tmp_path / "x.flac")
    assert np.abs(back - audio).max() < 1e-3


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "cannot decode"), (b"RIFF\x00\x00\x00\x00WAVEjunk", "cannot decode"), (b"hello, not audio" * 10, "cannot decode")],
)
def test_broken_files_raise_audio_error(tmp_path, content, reason):
    (tmp_path / "bad.wav").write_bytes(content)
    with pytest.raises(AudioError, match=reason):
        decode_audio(tmp_path / "bad.wav")


def test_zero_length_audio(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros((0,), np.float32), 16_000)
    with pytest.raises(AudioError, match="no samples"):
        decode_audio(tmp_path / "empty.wav")
