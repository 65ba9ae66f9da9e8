"""The encoding actor's memory on a long file: segment by segment, it does not grow with the file."""

from __future__ import annotations

import json

import numpy as np
import pytest

PEAK_MEMORY_SCRIPT = """
import json, re, sys
from pathlib import Path
import numpy as np
import pandas as pd
from slam_ray.speech.audio import speech_probabilities
from slam_ray.parallel.encode import EncodeActor

def rss_mb(field):
    return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024

tokenizer_dir, path, max_seconds = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
actor = EncodeActor(tokenizer_dir, decode={"max_segment_seconds": max_seconds})
speech_probabilities(np.zeros(16000, np.float32))  # silero-vad loaded before measuring, like the model
Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak (VmHWM) to the current RSS
before = rss_mb("VmRSS")
# the CPU path: the encoding actor decodes its own file, segment by segment, encoding ~200 s of audio at a time
out = actor(pd.DataFrame([{"id": "long", "path": path}]))
rows, errors, frames = len(out), out.error.notna().sum().item(), int(out.n_frames.sum())
peak = rss_mb("VmHWM")
print(json.dumps({"peak_growth_mb": peak - before, "peak_mb": peak, "rows": rows, "errors": errors, "frames": frames}))
"""


@pytest.mark.slow
def test_a_30_minute_file_is_encoded_in_bounded_memory(fixtures, tmp_path):
    """Read block by block and cut into <= 60 s segments, a 30-minute file costs the encoding actor a few MB of
    memory beyond the model; decoded whole it costs hundreds. Each measured in a fresh process (its peak RSS),
    without Ray: the actor class is called as Ray Data calls it (the stage over the same file is
    tests/stages/test_extract.py's)."""
    import subprocess
    import sys

    from helpers import long_speech

    from slam_ray.config import TokenizerConfig
    from slam_ray.speech.tokenizer import UnitTokenizer

    long_speech(fixtures, tmp_path / "lecture.flac", 30 * 60)
    long_speech(fixtures, tmp_path / "talk.flac", 10 * 60)
    rng = np.random.default_rng(0)
    tok = UnitTokenizer(TokenizerConfig(n_units=16), rng.normal(size=(16, 80)).astype(np.float32),
                        np.zeros(80, np.float32), np.ones(80, np.float32))
    tok.save(tmp_path / "tok")
    peaks = {}
    for name, minutes, max_seconds in (("talk", 10, 60), ("lecture", 30, 60), ("lecture", 30, None)):
        run = subprocess.run([sys.executable, "-c", PEAK_MEMORY_SCRIPT, str(tmp_path / "tok"), str(tmp_path / f"{name}.flac"),
                              json.dumps(max_seconds)], capture_output=True, text=True, check=True)
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert result["errors"] == 0 and abs(result["frames"] - minutes * 60 * 25) <= 30
        peaks[minutes, max_seconds] = result["peak_growth_mb"]
        print(f"{minutes}-minute file, max_segment_seconds={max_seconds}: {result['rows']} rows, "
              f"peak RSS {result['peak_mb']:.0f} MB (growth while encoding {result['peak_growth_mb']:.0f} MB)")
    # segmented, memory does not grow with the file: 3x the audio, about the same peak
    assert abs(peaks[30, 60] - peaks[10, 60]) < 40
    # decoded whole, it does (float32 samples alone are 115 MB for 30 minutes): the measurement can see it
    assert peaks[30, None] > 4 * peaks[30, 60]
