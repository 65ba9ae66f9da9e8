"""The one audio loader: decode with soundfile (libsndfile), mix to mono, resample with torchaudio."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import soundfile as sf

TARGET_SAMPLE_RATE = 16_000


class AudioError(ValueError):
    """A file that cannot be used as speech; the message is the reason recorded in errors.jsonl."""


@functools.lru_cache(maxsize=8)
def _resampler(orig_sr: int, target_sr: int):
    import torchaudio

    return torchaudio.transforms.Resample(orig_sr, target_sr)  # builds its sinc kernel once, not per call


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    if orig_sr == target_sr:
        return audio
    import torch

    with torch.no_grad():
        return _resampler(orig_sr, target_sr)(torch.from_numpy(audio)).numpy()


def decode_audio(source: str | Path | bytes, sample_rate: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    """Float32 mono samples at `sample_rate` from a path or encoded bytes; AudioError if unusable."""
    try:
        data, sr = sf.read(io.BytesIO(source) if isinstance(source, bytes) else str(source), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile raises several types for truncated/unknown files
        raise AudioError(f"cannot decode audio: {e}") from e
    if data.shape[0] == 0:
        raise AudioError("audio has no samples")
    audio = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(audio).all():
        raise AudioError("audio contains NaN or infinite samples")
    return resample(np.ascontiguousarray(audio), sr, sample_rate).astype(np.float32, copy=False)


def write_flac(path: str | Path, audio: np.ndarray, sample_rate: int = TARGET_SAMPLE_RATE) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(audio, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
