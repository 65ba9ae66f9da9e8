from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from helpers import long_speech

from slam_ray.speech.audio import AudioError, decode_audio, write_flac


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


@pytest.mark.parametrize(("name", "sr", "subtype", "channels"), [
    ("u8.wav", 16_000, "PCM_U8", 1), ("s24.flac", 16_000, "PCM_24", 1), ("narrowband.wav", 8_000, "PCM_16", 1),
    ("cd.flac", 44_100, "PCM_16", 2), ("float.wav", 22_050, "FLOAT", 1), ("speech.ogg", 16_000, "VORBIS", 1),
    ("speech.mp3", 16_000, "MPEG_LAYER_III", 1),
])
def test_odd_but_valid_files_are_converted(fixtures, tmp_path, name, sr, subtype, channels):
    """8-bit, 24-bit, 8 kHz, 44.1 kHz stereo, float, Ogg Vorbis and MP3 all come back as 16 kHz mono speech."""
    from slam_ray.speech.audio import resample

    speech = decode_audio(fixtures / "audio1.flac")
    native = resample(speech, 16_000, sr)
    data = np.stack([native] * channels, 1) if channels > 1 else native
    sf.write(tmp_path / name, data, sr, subtype=subtype)
    audio = decode_audio(tmp_path / name)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - len(speech)) < 16_000 * 0.1  # codecs may pad a few frames
    n = min(len(audio), len(speech))
    if subtype not in ("VORBIS", "MPEG_LAYER_III"):  # lossless up to quantisation and band limit: the same waveform
        assert np.corrcoef(audio[:n], speech[:n])[0, 1] > 0.9


@pytest.mark.parametrize("segmenter", ["vad", "energy"])
def test_long_files_are_cut_at_quiet_points_into_contiguous_segments(fixtures, tmp_path, segmenter):
    from slam_ray.speech.audio import VAD_SPEECH, decode_segments, speech_probabilities

    whole = long_speech(fixtures, tmp_path / "long.flac", 130.0)
    segments = list(decode_segments(tmp_path / "long.flac", max_seconds=30, segmenter=segmenter))
    assert len(segments) == 5
    assert segments[0][0] == 0.0 and segments[-1][1] == pytest.approx(130.0)
    for (_, end, _), (start, _, _) in zip(segments, segments[1:], strict=False):
        assert end == start  # contiguous: nothing lost, nothing twice
    for start, end, audio in segments:
        assert 30 * 0.75 - 0.02 <= end - start <= 30 or end == 130.0
        assert len(audio) == round((end - start) * 16_000)
    # at 16 kHz there is no resampling: the segments are the file, sample for sample
    assert np.array_equal(np.concatenate([a for _, _, a in segments]), whole)
    # each cut lies in a quiet stretch: the 20 ms around it are quieter than 95% of the 20 ms frames of the
    # window's last quarter, where the cut was searched for
    for _, end, _ in segments[:-1]:
        cut = round(end * 16_000)
        searched = whole[cut - 16_000 * 7 : cut + 16_000 * 1][: 8 * 50 * 320].reshape(-1, 320)
        assert (whole[cut - 160 : cut + 160] ** 2).mean() <= np.quantile((searched**2).mean(1), 0.05)
        if segmenter == "vad":  # and silero-vad hears no speech in the 32 ms frame around it
            assert speech_probabilities(whole[cut - 256 : cut + 256])[0] < VAD_SPEECH
    # a file shorter than the limit is one segment; a tail under 0.5 s joins the segment before it
    assert len(list(decode_segments(tmp_path / "long.flac", max_seconds=200))) == 1
    long_speech(fixtures, tmp_path / "tail.flac", 60.2)
    tail = list(decode_segments(tmp_path / "tail.flac", max_seconds=30, segmenter=segmenter))
    assert tail[-1][1] == pytest.approx(60.2) and tail[-1][1] - tail[-1][0] >= 0.5


def test_nan_in_the_middle_of_a_long_file_is_an_error(tmp_path):
    from slam_ray.speech.audio import decode_segments

    audio = np.random.default_rng(0).normal(0, 0.1, 16_000 * 50).astype(np.float32)
    audio[16_000 * 40] = np.nan
    sf.write(tmp_path / "nan.wav", audio, 16_000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        list(decode_segments(tmp_path / "nan.wav", max_seconds=20))
