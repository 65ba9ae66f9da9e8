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
    from slam_ray.core.storage import is_remote, open_input

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


SEGMENTERS = ("vad", "energy")
VAD_FRAME = 512  # silero-vad's frame at 16 kHz: 32 ms
VAD_SPEECH = 0.35  # below this speech probability a frame is a pause (silero's own "end of speech" threshold)


def _quietest(audio: np.ndarray, sr: int, lo: int, hi: int | None = None) -> int:
    """The sample index at the centre of the lowest-energy 20 ms frame of `audio[lo:hi]`."""
    hi = len(audio) if hi is None else hi
    hop = max(1, sr // 50)
    if hi - lo < hop:
        return (lo + hi) // 2
    frames = audio[lo : lo + (hi - lo) // hop * hop].reshape(-1, hop)
    return lo + int(np.argmin((frames**2).mean(1))) * hop + hop // 2


@functools.lru_cache(maxsize=1)
def _vad_model():
    """silero-vad's ONNX model, shipped in its wheel (no download), one per process."""
    import torch

    threads = torch.get_num_threads()
    from importlib.resources import files

    from silero_vad.utils_vad import OnnxWrapper  # the package's import sets torch to one thread: put it back

    torch.set_num_threads(threads)
    return OnnxWrapper(str(files("silero_vad.data") / "silero_vad.onnx"), force_onnx_cpu=True)


def speech_probabilities(audio16k: np.ndarray) -> np.ndarray:
    """silero-vad's speech probability of every 32 ms frame of 16 kHz audio (the last frame zero-padded)."""
    import torch

    with torch.no_grad():
        return _vad_model().audio_forward(torch.from_numpy(np.ascontiguousarray(audio16k)), TARGET_SAMPLE_RATE)[0].numpy()


def _pause_cut(audio: np.ndarray, sr: int, lo: int) -> int:
    """A cut in `audio[lo:]` where nobody speaks: the quietest 20 ms of its longest pause by silero-vad (frames
    below VAD_SPEECH), or of the whole stretch when it holds no pause at all."""
    probs = speech_probabilities(resample(audio[lo:], sr, TARGET_SAMPLE_RATE))
    pause = np.concatenate([[False], probs < VAD_SPEECH, [False]])
    edges = np.flatnonzero(pause[1:] != pause[:-1]).reshape(-1, 2)  # [first, after-last) frame of each pause
    if not len(edges):
        return _quietest(audio, sr, lo)
    first, after = edges[np.argmax(edges[:, 1] - edges[:, 0])]
    to_sr = sr / TARGET_SAMPLE_RATE * VAD_FRAME
    return _quietest(audio, sr, lo + int(first * to_sr), min(len(audio), lo + int(after * to_sr)))


def decode_segments(path: str | Path, max_seconds: float | None, sample_rate: int = TARGET_SAMPLE_RATE,
                    segmenter: str = "vad") -> Iterator[tuple[float, float, np.ndarray]]:
    """(start_s, end_s, mono float32 samples at `sample_rate`) of a file, in order. A file longer than
    `max_seconds` is read block by block (memory bounded by one window whatever its length) and cut in each
    window's last quarter: with `segmenter="vad"` inside the longest pause silero-vad finds there, with
    "energy" at its quietest 20 ms. A last piece under 0.5 s joins the segment before it."""
    if segmenter not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {segmenter!r}; choose one of {SEGMENTERS}")
    cut_at = _pause_cut if segmenter == "vad" else _quietest
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
            cut = len(buf) if at_end else cut_at(buf, sr, window * 3 // 4)
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


def write_float_wav(path: str | Path, audio: np.ndarray, sample_rate: int = TARGET_SAMPLE_RATE) -> None:
    """32-bit float WAV (folders created): the samples exactly, for audio this package made and reads back."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio.astype(np.float32, copy=False), sample_rate, format="WAV", subtype="FLOAT")


def write_flac(path: str | Path | io.BytesIO, audio: np.ndarray, sample_rate: int = TARGET_SAMPLE_RATE) -> None:
    """16-bit FLAC to a path (folders created) or an in-memory buffer."""
    if not isinstance(path, io.BytesIO):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        path = str(path)
    sf.write(path, np.clip(audio, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
