"""`slam-ray synth`: read a text corpus aloud with a TTS engine, in parallel on Ray Data.

1. Texts from `synth.corpus` (slam_ray/speech/text_sources.py): the built-in grammar by default, or a text / JSONL /
   Parquet file or a local HF datasets folder, cut into utterances and de-duplicated.
2. A seeded plan: per utterance a voice, a speed, a noise scale and a seed (the same config, the same audio).
3. An actor pool of the backend (slam_ray/parallel/tts.py) speaks the plan shard by shard: `audio/NNNNN/<id>.flac`
   (16 kHz) and, when a shard's last utterance is in, `index/part-NNNNN.parquet` (renamed into place last:
   the mark that the shard is done). A rerun after an interruption speaks only the shards without one.
4. `index.parquet` (all parts, by id) for `extract`; texts the engine cannot speak are lines of errors.jsonl.
5. With `synth.preferences`: SpokenSwag-style triples (slam_ray/speech/spoken_swag.py), spoken in the same pass, under
   `preferences/`, listed in `preferences.jsonl`.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from slam_ray.config import Experiment
from slam_ray.core.runner import StageResult, init_ray, run_stage
from slam_ray.core.stage_io import StageDir, Timer
from slam_ray.core.storage import is_remote, join
from slam_ray.core.tracking import Tracker
from slam_ray.errors import SlamError
from slam_ray.parallel.tts import iter_spoken
from slam_ray.speech import spoken_swag
from slam_ray.speech.text_sources import load_texts

# Utterances per Ray Data pass: bounds what one `from_items` ships to the object store; a pass costs one actor
# start-up (~4 s), nothing next to 100k utterances.
WAVE_UTTERANCES = 100_000

INDEX_SCHEMA = pa.schema([
    ("id", pa.string()), ("path", pa.string()), ("text", pa.string()), ("voice", pa.string()),
    ("speed", pa.float64()), ("noise", pa.float64()), ("seed", pa.int64()), ("backend", pa.string()),
    ("duration", pa.float64()), ("aligned_text", pa.string()),
])


def plan_items(exp: Experiment, texts: list[str], audio_dir: str) -> list[dict]:
    """Voice, speed, noise and seed per item, seeded: the same config always gives the same audio. Voices and
    speeds come from their own stream, so adding noise to a config leaves them as they were."""
    cfg = exp.synth
    rng = random.Random(cfg.seed)
    extra = random.Random(f"synth:noise:{cfg.seed}")
    low, high = cfg.speed
    items = []
    for i, text in enumerate(texts):
        uid = f"utt{i:07d}"
        items.append({"id": uid, "text": text, "voice": rng.choice(cfg.voices),
                      "speed": round(rng.uniform(low, high), 2), "noise": round(extra.uniform(*cfg.noise), 3),
                      "seed": extra.randrange(2**31),
                      "path": join(audio_dir, f"{i // cfg.shard_size:05d}", f"{uid}.flac")})
    return items


def _shards(items: list[dict], size: int, prefix: str) -> dict[str, list[dict]]:
    return {f"{prefix}-{k // size:05d}": items[k : k + size] for k in range(0, len(items), size)}


def _write_shard(out: StageDir, name: str, good: list[dict], bad: list[dict]) -> None:
    """The shard's error lines, then its index part, renamed into place last (the shard's done mark)."""
    index_dir = out.path / "index"
    with open(index_dir / f"{name}.errors.jsonl", "w") as f:
        for rec in sorted(bad, key=lambda r: r["id"]):
            f.write(json.dumps({"id": rec["id"], "path": rec["path"], "text": rec["text"], "voice": rec["voice"],
                                "error": rec["error"], "phase": "synth"}, ensure_ascii=False) + "\n")
    rows = [{k: rec.get(k) for k in INDEX_SCHEMA.names} for rec in sorted(good, key=lambda r: r["id"])]
    tmp = index_dir / f".{name}.parquet.tmp"
    pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), tmp)
    tmp.replace(index_dir / f"{name}.parquet")
    out.publish("index", f"{name}.errors.jsonl")
    out.publish("index", f"{name}.parquet")  # published last: the shard's done mark in a bucket too


def _speak_shards(exp: Experiment, out: StageDir, shards: dict[str, list[dict]],
                  tracker: Tracker) -> tuple[int, int, float]:
    """Speak every shard whose index part is missing; returns (shards already done, utterances spoken now,
    audio seconds spoken now)."""
    index_dir = out.local("index")  # with a workdir in a bucket: the shards a killed run finished there
    index_dir.mkdir(parents=True, exist_ok=True)
    todo = [name for name in shards if not (index_dir / f"{name}.parquet").is_file()]
    if len(todo) < len(shards):
        print(f"[synth] resuming: {len(shards) - len(todo)} of {len(shards)} shards already spoken")
    shard_of = {item["id"]: name for name in todo for item in shards[name]}
    folders = {Path(item["path"]).parent for name in todo for item in shards[name] if not is_remote(item["path"])}
    for tmp in (t for folder in folders for t in folder.glob(".*.tmp")):
        tmp.unlink()  # a killed actor's temporary file; the FLACs of an unfinished shard are spoken again
    received: dict[str, tuple[list[dict], list[dict]]] = {name: ([], []) for name in todo}
    cfg = exp.synth
    seconds, errors, start = 0.0, 0, time.perf_counter()
    total = sum(len(shards[name]) for name in todo)
    with tqdm(total=total, unit="utt", desc="[synth] speak", mininterval=2) as bar:
        for wave in _waves(todo, shards):
            # reuse_files=False: a FLAC from an unfinished shard lacks its alignment row, so it is spoken again
            pending = [item for name in wave for item in shards[name]]
            for rec in iter_spoken(exp, pending, cfg.backend, cfg.sample_rate, cfg.num_actors, cfg.batch_size,
                                   cfg.num_gpus_per_actor, reuse_files=False, alignments=cfg.alignments):
                name = shard_of[rec["id"]]
                good, bad = received[name]
                failed = isinstance(rec.get("error"), str)
                (bad if failed else good).append(rec)
                seconds += rec["duration"]
                errors += failed
                bar.update()
                bar.set_postfix_str(f"{seconds / 3600:.2f} h audio, {errors} errors", refresh=False)
                if len(good) + len(bad) == len(shards[name]):
                    _write_shard(out, name, good, bad)
                    del received[name]
                    elapsed = time.perf_counter() - start
                    tracker.log_metrics({"progress/audio_seconds_per_s": seconds / max(elapsed, 1e-9),
                                         "progress/utterances": float(bar.n)}, step=bar.n)
    return len(shards) - len(todo), total, seconds


def _waves(todo: list[str], shards: dict[str, list[dict]]) -> list[list[str]]:
    """Consecutive groups of shards of at most WAVE_UTTERANCES utterances (at least one shard each)."""
    waves: list[list[str]] = []
    size = 0
    for name in todo:
        if not waves or size + len(shards[name]) > WAVE_UTTERANCES:
            waves.append([])
            size = 0
        waves[-1].append(name)
        size += len(shards[name])
    return waves


def _errors(index_dir: Path, names: list[str]) -> list[dict]:
    return [json.loads(line) for n in names for line in (index_dir / f"{n}.errors.jsonl").read_text().splitlines()]


def _read_parts(index_dir: Path, names: list[str]) -> pd.DataFrame:
    table = pa.concat_tables([pq.read_table(index_dir / f"{n}.parquet", schema=INDEX_SCHEMA) for n in names])
    return table.to_pandas().sort_values("id").reset_index(drop=True)


def _write_index(index_dir: Path, names: list[str], path: Path) -> tuple[int, float]:
    """`index.parquet` from the corpus shards' parts, one part (a row group) in memory at a time: the driver's
    memory does not grow with the corpus. Parts hold consecutive utterances, so in order they are the index in
    utterance order (sorted by id up to 10 M utterances, whose ids have 7 digits). Returns (rows, audio seconds)."""
    rows, seconds = 0, 0.0
    tmp = path.with_name(f".{path.name}.tmp")
    with pq.ParquetWriter(tmp, INDEX_SCHEMA) as writer:
        for name in names:
            part = pq.read_table(index_dir / f"{name}.parquet", schema=INDEX_SCHEMA)
            if part.num_rows:  # a shard whose every utterance failed adds no (statistics-less) empty row group
                writer.write_table(part)
            rows += part.num_rows
            seconds += float(pa.compute.sum(part["duration"]).as_py() or 0.0)
    tmp.replace(path)
    return rows, seconds


def _plan_only(exp: Experiment, out: StageDir, plan: list[dict], text_counts: dict) -> StageResult:
    """`synth.write_audio: false`: the index holds the plan only (no path, duration or alignment); `extract`
    speaks each utterance in its encoding actors, straight into units."""
    from slam_ray.parallel.tts import check_backend

    check_backend(exp.synth.backend, exp.synth.sample_rate)  # a missing engine fails here, not in every actor
    rows = [{**{k: item.get(k) for k in INDEX_SCHEMA.names}, "path": "", "backend": exp.synth.backend}
            for item in plan]
    pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), out.path / "index.parquet")
    return StageResult(counts={"texts": len(plan), "utterances": len(plan), "planned_only": 1, **text_counts},
                       outputs={"index": "index.parquet"})


def _synthesize(exp: Experiment, out: StageDir, tracker: Tracker, timer: Timer) -> StageResult:
    cfg = exp.synth
    with timer.phase("texts"):
        texts, text_counts = load_texts(cfg.corpus)
        if not texts:
            raise SlamError(f"synth.corpus gave no text to speak ({text_counts}); check synth.corpus.path and text_field")
        plan = plan_items(exp, texts, out.location("audio"))
        if not cfg.write_audio:
            return _plan_only(exp, out, plan, text_counts)
        shards = _shards(plan, cfg.shard_size, "part")
        triples: list[dict] = []
        if cfg.preferences:
            triples, pref_counts = spoken_swag.build_triples(cfg.preferences, cfg.preferences.voices or cfg.voices)
            text_counts.update({f"preference_{k}": v for k, v in pref_counts.items()})
            pref_items = spoken_swag.plan_items(exp, triples, out.location("preferences"))
            shards.update(_shards(pref_items, cfg.shard_size, "pref"))
    init_ray(exp)
    with timer.phase("speak"):
        resumed, spoken_now, seconds_now = _speak_shards(exp, out, shards, tracker)
    corpus_parts = [n for n in shards if n.startswith("part-")]
    errors = _errors(out.path / "index", corpus_parts)
    if len(errors) == len(plan):  # nothing spoken at all is a setup problem, not a few bad texts
        raise SlamError(f"synth: every utterance failed, e.g. {errors[0]['error']!r}; check synth.backend and "
                        f"synth.voices (see {out.path / 'index'} for every error)")
    utterances, audio_seconds = _write_index(out.path / "index", corpus_parts, out.path / "index.parquet")
    counts = {"texts": len(texts), "utterances": utterances, **text_counts,
              "audio_seconds": round(audio_seconds, 1), "shards": len(shards), "shards_resumed": resumed}
    outputs = {"index": "index.parquet", "audio_dir": "audio"}
    if cfg.preferences:
        pref_parts = [n for n in shards if n.startswith("pref-")]
        spoken = _read_parts(out.path / "index", pref_parts) if pref_parts else pd.DataFrame()
        by_id = {r["id"]: r for r in spoken.to_dict("records")}
        counts["preference_triples"] = spoken_swag.write_preferences(out.path / "preferences.jsonl", triples, by_id)
        errors += _errors(out.path / "index", pref_parts)
        outputs.update(preferences="preferences.jsonl", preference_audio_dir="preferences")
    speak_s = max(timer.timings["speak"], 1e-9)
    return StageResult(
        counts=counts, outputs=outputs, errors=errors,
        # this run's work only: a resumed run does not count the shards spoken before
        metrics={"throughput/utterances_per_s": spoken_now / speak_s,
                 "throughput/audio_seconds_per_s": seconds_now / speak_s,
                 "errors": float(len(errors))},
    )


def synth(exp: Experiment) -> StageDir:
    return run_stage(exp, "synth", _synthesize)
