"""Parallel speech synthesis: a Ray Data actor per TTS engine (slam_ray/speech/tts_backends.py), shared by `synth` and
by `eval` / `dpo` for their spoken pairs and triples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slam_ray.speech.tts_backends import (
    BACKENDS,
    PiperBackend,
    Speech,
    TTSBackend,
    make_backend,
    spoken_seconds,
)

__all__ = ["BACKENDS", "PiperBackend", "Speech", "SpeakActor", "TTSBackend", "make_backend", "speak_items"]


class SpeakActor:
    """Ray Data actor: one TTS engine per actor; speaks each row's `text` (with its `voice`, `speed` and, where
    given, `noise` and `seed`) into the FLAC at its `path`, and returns the row with `backend`, `duration`,
    `aligned_text` (JSON of [[word, start_s, end_s], ...], or None where the backend has no alignments) and
    `error` (None, or why this text could not be spoken: one bad text never loses its batch).

    With `reuse_files`, a FLAC that already exists is kept (its duration read back, no alignment); files are
    written under a temporary name and renamed, so a killed actor never leaves a truncated file behind.
    """

    def __init__(self, backend: str, sample_rate: int, reuse_files: bool = True, alignments: bool = True) -> None:
        import torch

        from slam_ray.parallel.actors import limit_threads

        limit_threads()
        device = "cuda" if backend == "hf" and torch.cuda.is_available() else "cpu"
        self.backend = make_backend(backend, sample_rate, device)
        self.sample_rate, self.reuse_files, self.alignments = sample_rate, reuse_files, alignments

    def _speak(self, row: dict) -> tuple[float, str | None]:
        import io

        import soundfile as sf

        from slam_ray.core.storage import exists, is_remote, open_input, write_bytes
        from slam_ray.speech.audio import write_flac

        path = row["path"]  # a local path or an object in the workdir's bucket
        if self.reuse_files and exists(path):
            return float(sf.info(open_input(path) if is_remote(path) else path).duration), None
        noise, seed = float(row.get("noise") or 0.0), int(row.get("seed") or 0)
        speech = self.backend.synthesize([row["text"]], row["voice"], row["speed"], noise, seed)[0]
        buffer = io.BytesIO()
        write_flac(buffer, speech.audio, self.sample_rate)
        write_bytes(path, buffer.getvalue())  # never half-written: a killed actor leaves at most a temporary file
        words = json.dumps(speech.words, ensure_ascii=False) if self.alignments and speech.words is not None else None
        return len(speech.audio) / self.sample_rate, words

    def __call__(self, batch):  # pandas DataFrame in and out
        import pandas as pd

        from slam_ray.parallel.actors import error_row

        out = []
        for row in batch.to_dict("records"):
            try:
                duration, words = self._speak(row)
                out.append({**row, "backend": self.backend.name, "duration": duration, "aligned_text": words,
                            "error": None})
            except Exception as e:  # one unspeakable text must not lose the batch
                out.append({**error_row(row, e), "backend": self.backend.name, "duration": 0.0, "aligned_text": None})
        return pd.DataFrame(out)


_ENGINES: dict[tuple[str, int], TTSBackend] = {}


def speak_planned(spec: dict) -> np.ndarray:
    """16 kHz audio of an utterance synth only planned (`synth.write_audio: false`), spoken in the calling actor.
    It goes through a 16-bit FLAC in memory, as synth would have written it, so its units are those of the file."""
    import io

    from slam_ray.speech.audio import decode_audio, write_flac

    key = (spec["backend"], int(spec["sample_rate"]))
    if key not in _ENGINES:  # one engine per process, reused for every row
        _ENGINES[key] = make_backend(*key)
    speech = _ENGINES[key].synthesize([spec["text"]], spec["voice"], spec["speed"], spec["noise"], spec["seed"])[0]
    buffer = io.BytesIO()
    write_flac(buffer, speech.audio, key[1])
    return decode_audio(buffer.getvalue())


def row_segments(row: dict, max_segment_seconds: float | None, segmenter: str = "vad"):
    """(start, end, 16 kHz audio) of an input row: decoded from its file (in segments cut by `segmenter`, see
    slam_ray.speech.audio.decode_segments), or spoken from its plan."""
    from slam_ray.speech.audio import TARGET_SAMPLE_RATE, decode_segments

    spec = row.get("speak")
    if isinstance(spec, str) and spec:  # NaN where a batch mixes planned rows with files
        audio = speak_planned(json.loads(spec))
        yield 0.0, len(audio) / TARGET_SAMPLE_RATE, audio
    else:
        yield from decode_segments(row["path"], max_segment_seconds, segmenter=segmenter)


def check_backend(backend: str, sample_rate: int) -> None:
    """Fail fast on the driver with a clear message (e.g. espeak-ng not installed) before any actor starts."""
    if backend == "hf":
        return  # loading a model on the driver would cost its memory twice; actors report a bad one per row
    make_backend(backend, sample_rate)


def iter_spoken(exp, items: list[dict], backend: str, sample_rate: int, num_actors: int, batch_size: int,
                num_gpus: float = 0.0, reuse_files: bool = True, alignments: bool = True):
    """Stream spoken rows (each item plus backend, duration, aligned_text, error) in completion order."""
    from slam_ray.core.storage import is_remote
    from slam_ray.parallel.actors import map_rows, small_enough_for_the_driver

    check_backend(backend, sample_rate)
    for item in items:
        if not is_remote(item["path"]):
            Path(item["path"]).parent.mkdir(parents=True, exist_ok=True)
    ctor = {"backend": backend, "sample_rate": sample_rate, "reuse_files": reuse_files, "alignments": alignments}
    seconds = sum(spoken_seconds(item.get("text") or "") for item in items)
    in_driver = small_enough_for_the_driver(seconds, exp.synth.local_speak_seconds, num_gpus)
    for df in map_rows(exp, items, SpeakActor, ctor, num_actors, batch_size, num_gpus, in_driver=in_driver):
        yield from df.to_dict("records")


def speak_items(exp, items: list[dict], backend: str, sample_rate: int, num_actors: int, batch_size: int):
    """Speak `items` (id, text, voice, speed, path) in parallel; returns (good rows, error rows) as lists."""
    good, bad = [], []
    for row in iter_spoken(exp, items, backend, sample_rate, num_actors, batch_size, exp.synth.num_gpus_per_actor):
        (bad if isinstance(row.get("error"), str) else good).append(row)
    return good, bad
