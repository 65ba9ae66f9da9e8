"""Speech units of many files in one Ray Data pass, shared by `extract`, `eval` and `dpo`: decoding tasks (CPU)
feed encoding actors that run the fitted tokenizer (`slam_ray/speech/tokenizer.py`); `encode_spoken` speaks texts
inside the decoding tasks first (speak-then-tokenise, no audio file written)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from slam_ray.core.storage import localize
from slam_ray.speech.audio import TARGET_SAMPLE_RATE
from slam_ray.speech.tokenizer import UnitTokenizer
from slam_ray.speech.tts_backends import spoken_seconds

_FILE_FIELDS = ("id", "path", "text", "speaker", "dataset")


def decode_rows(batch, max_segment_seconds: float | None = None, segmenter: str = "vad"):
    """Ray Data task (CPU): input rows -> one row per segment, 16 kHz float32 samples as bytes in `audio`, or one
    error row for a file that cannot be decoded. Segments are yielded as they are read (a long file never sits
    in memory whole), each held until the next is known, so `n_segments` is set on a file's last row only (0 on
    the others); an error row closes its file too (`n_segments` = segments before it + 1)."""
    import pandas as pd

    from slam_ray.parallel.tts import row_segments

    for row in batch.to_dict("records"):
        base = {k: (row.get(k) if isinstance(row.get(k), str) else "") for k in _FILE_FIELDS}
        base["input_id"] = row["id"]
        held, k = None, 0
        try:
            for start, end, audio in row_segments(row, max_segment_seconds, segmenter):
                if held is not None:
                    yield pd.DataFrame([{**held, "id": f"{row['id']}@{k - 1:04d}", "n_segments": 0}])
                held = {**base, "seg_start": start, "seg_end": end, "audio_seconds": end - start,
                        "audio": audio.astype(np.float32, copy=False).tobytes(), "error": None}
                k += 1
        except Exception as e:
            if held is not None:  # segments before the failure still count, so the driver can close the file
                yield pd.DataFrame([{**held, "id": f"{row['id']}@{k - 1:04d}", "n_segments": 0}])
            yield pd.DataFrame([{**base, "seg_start": 0.0, "seg_end": 0.0, "audio_seconds": 0.0, "audio": b"",
                                 "error": str(e) or type(e).__name__, "n_segments": k + 1}])
            continue
        yield pd.DataFrame([{**held, "id": f"{row['id']}@{k - 1:04d}" if k > 1 else row["id"], "n_segments": k}])


class EncodeActor:
    """Ray Data actor: decoded segment rows -> the same rows with `units`, `durations`, `n_frames` (audio dropped).
    Segments are encoded in batches of about `flush_seconds` of audio (the model sees padded batches whose
    results equal each segment alone); a segment that fails is an error row and every other still comes through.

    With `decode` (the keyword arguments of `decode_rows`), the actor takes input rows and decodes (or speaks)
    them itself, a group of segments at a time: on CPUs a separate pool of decoding tasks only adds processes,
    each paying for torch's import and a TTS engine's start (measured: 30 s before the first of 400 spoken rows
    came back with 4 decoding processes beside 2 actors on 2 cores)."""

    def __init__(self, tokenizer_dir: str, flush_seconds: float | None = None,
                 gpu_batch_seconds: float | None = None, decode: dict | None = None) -> None:
        from slam_ray.parallel.actors import limit_threads

        limit_threads()
        self.tokenizer = UnitTokenizer.load(localize(tokenizer_dir))  # fetched to this node from a bucket
        features = self.tokenizer.features
        if flush_seconds is None:  # a GPU needs big batches to choose from (bench/gpu.py)
            flush_seconds = 800.0 if features.device.type == "cuda" else 200.0
        if gpu_batch_seconds is not None and hasattr(features, "max_batch_samples"):  # HuBERT's padded batches
            features.max_batch_samples = int(gpu_batch_seconds * TARGET_SAMPLE_RATE)
        self.flush_samples = int(flush_seconds * TARGET_SAMPLE_RATE)
        self.decode = decode

    def _encode(self, audios: list[np.ndarray]) -> list[dict | str]:
        try:
            return self.tokenizer.encode_batch(audios)
        except Exception:  # find the culprit(s): one at a time
            out: list[dict | str] = []
            for audio in audios:
                try:
                    out.append(self.tokenizer.encode(audio))
                except Exception as e:
                    out.append(str(e) or type(e).__name__)
            return out

    def _segments(self, batch) -> Iterator[dict]:
        if self.decode is None:
            yield from batch.to_dict("records")
            return
        for df in decode_rows(batch, **self.decode):  # one segment at a time: a long file never sits whole here
            yield from df.to_dict("records")

    def __call__(self, batch):  # pandas DataFrame in and out
        import pandas as pd

        out: dict[int, dict] = {}  # by position: rows come back in the order they came in
        group: list[tuple[int, dict]] = []
        samples = 0

        def flush() -> None:
            audios = [np.frombuffer(r["audio"], dtype=np.float32).copy() for _, r in group]  # writable for torch
            for (i, row), enc in zip(group, self._encode(audios), strict=True):
                out[i] = _encoded_row(row, enc)
            group.clear()

        for i, row in enumerate(self._segments(batch)):
            if isinstance(row.get("error"), str):
                out[i] = _encoded_row(row, row["error"])
                continue
            group.append((i, row))
            samples += len(row["audio"]) // 4  # float32 bytes
            if samples >= self.flush_samples:
                flush()
                samples = 0
        if group:
            flush()
        return pd.DataFrame([out[i] for i in sorted(out)])


def _encoded_row(row: dict, enc: dict | str) -> dict:
    row = {k: v for k, v in row.items() if k != "audio"}
    if isinstance(enc, dict):
        return {**row, "units": enc["units"].tolist(), "durations": enc["durations"].tolist(),
                "n_frames": enc["n_frames"], "error": None}
    return {**row, "units": [], "durations": [], "n_frames": 0, "error": enc}


BYTES_PER_SECOND = 16_000  # 128-kbit/s audio: 16-kHz FLAC about right, a 16-bit WAV estimated at twice its length


def audio_seconds_at_most(rows: list[dict], limit: float) -> float | None:
    """The audio seconds of `rows` if they are known to be at most `limit`, else None (more, or not known): a row's
    `duration`, a text to speak by `spoken_seconds`, or a local file's size at BYTES_PER_SECOND; a file in object
    storage without a duration is not known. Stops reading as soon as the sum passes `limit`."""
    total = 0.0
    for row in rows:
        if row.get("duration"):
            total += float(row["duration"])
        elif row.get("speak"):
            total += spoken_seconds(row.get("text") or "")
        elif row.get("path") and Path(row["path"]).is_file():
            total += Path(row["path"]).stat().st_size / BYTES_PER_SECOND
        else:
            return None
        if total > limit:
            return None
    return total


def iter_encoded(exp, rows: list[dict], tokenizer_dir: str | Path, num_actors: int, batch_size: int,
                 num_gpus: float = 0.0) -> Iterator[dict]:
    """Stream encoded files as they complete: a file's rows (`id`, `path`, `text`, `speaker`, `dataset`,
    `input_id`, `seg_start`, `seg_end`, `audio_seconds`, `units`, `durations`, `n_frames`, `n_segments`,
    `error` None), one per segment — a file longer than `extract.max_segment_seconds` is `<id>@0000`, ... — or
    one error row (`error`: the reason) when any part of it fails. With `num_gpus`, decoding runs as Ray tasks
    on CPUs feeding the encoding actors on GPUs; without, each actor decodes its own rows. At most
    `extract.local_encode_seconds` of audio, without GPUs, is encoded in this process by one `EncodeActor`."""
    from slam_ray.parallel.actors import map_rows, small_enough_for_the_driver

    limit = exp.extract.local_encode_seconds
    in_driver = small_enough_for_the_driver(audio_seconds_at_most(rows, limit), limit, num_gpus)

    decode = {"max_segment_seconds": exp.extract.max_segment_seconds, "segmenter": exp.extract.segmenter}
    parts: dict[str, list[dict]] = {}
    expected: dict[str, int] = {}
    actor = {"tokenizer_dir": str(tokenizer_dir), "gpu_batch_seconds": exp.extract.gpu_batch_seconds}
    if num_gpus:  # CPU decoding overlaps the GPU's encoding
        stages = {"prepare": (decode_rows, decode, exp.extract.decode_cpus)}
    else:
        stages, actor["decode"] = {}, decode
    for df in map_rows(exp, rows, EncodeActor, actor, num_actors, batch_size, num_gpus, **stages, in_driver=in_driver):
        for rec in df.to_dict("records"):
            uid = rec["input_id"]
            parts.setdefault(uid, []).append(rec)
            if int(rec["n_segments"]):
                expected[uid] = int(rec["n_segments"])
            if len(parts[uid]) != expected.get(uid):
                continue
            done = sorted(parts.pop(uid), key=lambda r: r["seg_start"])
            del expected[uid]
            failed = next((r for r in done if isinstance(r.get("error"), str)), None)
            if failed is not None:
                yield {**failed, "id": uid, "n_segments": 1, "units": [], "durations": [], "audio_seconds": 0.0}
                continue
            for r in done:
                yield {**r, "n_segments": len(done), "error": None, "units": [int(u) for u in r["units"]],
                       "durations": [int(d) for d in r["durations"]]}


def encode_files(exp, rows: list[dict], tokenizer_dir: str | Path, num_actors: int, batch_size: int,
                 num_gpus: float = 0.0) -> tuple[list[dict], list[dict]]:
    """Units for every row (`id`, `path`, `text`, `speaker`); returns (good rows, error rows)."""
    good, bad = [], []
    for rec in iter_encoded(exp, rows, tokenizer_dir, num_actors, batch_size, num_gpus):
        (bad if rec["error"] else good).append(rec)
    return good, bad


def encode_spoken(exp, items: list[dict], tokenizer_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """Units of texts spoken with the experiment's synth engine — items with `id`, `text`, `voice`, `speed` (and
    optionally `noise`, `seed`) — in one Ray Data pass: each text is spoken inside a decoding task straight
    into memory (a 16-bit FLAC round trip, so its units are those of the file synth would write) and encoded by
    the actors; no audio file is written. The `hf` backend wants its GPU actors: its items (which then need a
    `path`) are spoken into files first. Returns (good rows, error rows) as `encode_files` does."""
    from slam_ray.parallel.tts import check_backend, speak_items

    synth = exp.synth
    if synth.backend == "hf":
        spoken, unspoken = speak_items(exp, items, synth.backend, synth.sample_rate, synth.num_actors, synth.batch_size)
        good, bad = encode_files(exp, spoken, tokenizer_dir, exp.extract.num_actors, exp.extract.batch_size,
                                 exp.extract.num_gpus_per_actor)
        return good, unspoken + bad
    check_backend(synth.backend, synth.sample_rate)  # a missing engine fails here, not once per row
    rows = []
    for item in items:
        plan = {"backend": synth.backend, "text": item["text"], "voice": item["voice"], "speed": item["speed"],
                "noise": float(item.get("noise") or 0.0), "seed": int(item.get("seed") or 0),
                "sample_rate": synth.sample_rate}
        rows.append({"id": item["id"], "path": "", "text": item["text"], "speaker": item.get("speaker") or item["voice"],
                     "speak": json.dumps(plan)})
    return encode_files(exp, rows, tokenizer_dir, exp.extract.num_actors, exp.extract.batch_size,
                        exp.extract.num_gpus_per_actor)
