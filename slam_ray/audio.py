"""The one audio loader: decode with soundfile (libsndfile), mix to mono, resample with torchaudio."""

from __future__ import annotations

import functools
import io
from collections.abc import Iterator
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


def _readable(source: str | Path | bytes):
    """What soundfile opens: a local path, encoded bytes, or an object in s3:// / gs:// storage."""
    from slam_ray.storage import is_remote, open_input

    if isinstance(source, bytes):
        return io.BytesIO(source)
    return open_input(str(source)) if is_remote(str(source)) else str(source)


def _open(source: str | Path | bytes) -> sf.SoundFile:
    try:
        return sf.SoundFile(_readable(source))
    except Exception as e:  # libsndfile raises several types for truncated/unknown files
        raise AudioError(f"cannot decode audio: {e}") from e


def _read_all(f: sf.SoundFile, sample_rate: int) -> np.ndarray:
    """The rest of an open file as float32 mono samples at `sample_rate`."""
    try:
        data = f.read(dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"cannot decode audio: {e}") from e
    if data.shape[0] == 0:
        raise AudioError("audio has no samples")
    return resample(_mono(data), f.samplerate, sample_rate).astype(np.float32, copy=False)


def decode_audio(source: str | Path | bytes, sample_rate: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    """Float32 mono samples at `sample_rate` from a path, an s3:// / gs:// URI or encoded bytes; AudioError if
    unusable."""
    with _open(source) as f:
        return _read_all(f, sample_rate)


def _mono(data: np.ndarray) -> np.ndarray:
    audio = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(audio).all():
        raise AudioError("audio contains NaN or infinite samples")
    return np.ascontiguousarray(audio, dtype=np.float32)


def _quietest(audio: np.ndarray, sr: int, lo: int) -> int:
    """The sample index at the centre of the lowest-energy 20 ms frame of `audio[lo:]`."""
    hop = max(1, sr // 50)
    tail = audio[lo : lo + (len(audio) - lo) // hop * hop].reshape(-1, hop)
    return lo + int(np.argmin((tail**2).mean(1))) * hop + hop // 2


def decode_segments(path: str | Path, max_seconds: float | None,
                    sample_rate: int = TARGET_SAMPLE_RATE) -> Iterator[tuple[float, float, np.ndarray]]:
    """(start_s, end_s, mono float32 samples at `sample_rate`) of a file, in order. A file longer than
    `max_seconds` is read block by block (memory bounded by one window whatever its length) and cut at the
    quietest 20 ms of each window's last quarter; a last piece under 0.5 s joins the segment before it."""
    with _open(path) as f:
        sr = f.samplerate
        if max_seconds is None or f.frames <= max_seconds * sr:  # the common case: one segment
            audio = _read_all(f, sample_rate)
            yield 0.0, len(audio) / sample_rate, audio
            return
        window, min_tail = int(max_seconds * sr), sr // 2
        carry = np.zeros(0, np.float32)
        start, held = 0, None  # `held` waits until we know the piece after it is not a tiny tail
        while True:
            want = window - len(carry)
            try:
                data = f.read(want, dtype="float32", always_2d=True)
            except Exception as e:  # a file truncated or corrupt mid-way
                raise AudioError(f"cannot decode audio at {start / sr:.1f} s: {e}") from e
            block = _mono(data)
            buf = np.concatenate([carry, block])
            at_end = len(block) < want
            cut = len(buf) if at_end else _quietest(buf, sr, window * 3 // 4)
            if held is not None and at_end and len(buf) < min_tail:
                held = (held[0], held[1] + len(buf), np.concatenate([held[2], buf]))
                buf, cut = buf[:0], 0
            if held is not None:
                yield held[0] / sr, held[1] / sr, resample(held[2], sr, sample_rate)
                held = None
            if cut:
                held = (start, start + cut, buf[:cut])
            start, carry = start + cut, buf[cut:]
            if at_end:
                break
        if held is not None:
            yield held[0] / sr, held[1] / sr, resample(held[2], sr, sample_rate)


def write_flac(path: str | Path | io.BytesIO, audio: np.ndarray, sample_rate: int = TARGET_SAMPLE_RATE) -> None:
    """16-bit FLAC to a path (folders created) or an in-memory buffer."""
    if not isinstance(path, io.BytesIO):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        path = str(path)
    sf.write(path, np.clip(audio, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
