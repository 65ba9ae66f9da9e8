"""`slam-ray synth`: read a text corpus aloud with a TTS engine, in parallel on Ray Data.

Output: `audio/NNNN/<id>.flac` (16 kHz) and `index.parquet` (id, path, text, voice, speed, backend, duration).
The offline default corpus is the built-in grammar (slam_ray.grammar), training side only.
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

from slam_ray import grammar
from slam_ray.config import Experiment
from slam_ray.errors import SlamError
from slam_ray.runner import StageResult, init_ray, run_stage
from slam_ray.stage_io import StageDir, Timer
from slam_ray.tracking import Tracker
from slam_ray.tts import speak_items


def load_texts(exp: Experiment) -> list[str]:
    corpus = exp.synth.corpus
    if corpus.source == "grammar":
        return grammar.generate_sentences(corpus.n_sentences, corpus.seed, corpus.held_out_percent)
    if not corpus.path or not Path(corpus.path).is_file():
        raise SlamError(f"synth.corpus.path {corpus.path!r} is not a file; give a text file with one utterance per line")
    lines = [line.strip() for line in Path(corpus.path).read_text().splitlines()]
    texts = list(dict.fromkeys(t for t in lines if t))  # drop empties and duplicates, keep order
    return texts[: corpus.n_sentences]


def plan_items(exp: Experiment, texts: list[str], audio_dir: Path) -> list[dict]:
    """Voice and speed per item, seeded: the same config always gives the same audio."""
    rng = random.Random(exp.synth.seed)
    low, high = exp.synth.speed
    items = []
    for i, text in enumerate(texts):
        uid = f"utt{i:07d}"
        items.append({"id": uid, "text": text, "voice": rng.choice(exp.synth.voices),
                      "speed": round(rng.uniform(low, high), 2), "path": str(audio_dir / f"{i // 1000:04d}" / f"{uid}.flac")})
    return items


def _synthesize(exp: Experiment, out: StageDir, tracker: Tracker, timer: Timer) -> StageResult:
    with timer.phase("texts"):
        texts = load_texts(exp)
        items = plan_items(exp, texts, out.path / "audio")
    init_ray(exp)
    with timer.phase("speak"):
        good, bad = speak_items(exp, items, exp.synth.backend, exp.synth.sample_rate,
                                exp.synth.num_actors, exp.synth.batch_size)
    index = pd.DataFrame(good).drop(columns=["error"]).sort_values("id").reset_index(drop=True)
    index.to_parquet(out.path / "index.parquet", index=False)
    audio_seconds = float(index["duration"].sum()) if len(index) else 0.0
    speak_s = timer.timings["speak"]
    return StageResult(
        counts={"utterances": len(index), "audio_seconds": round(audio_seconds, 1), "texts": len(texts)},
        outputs={"index": "index.parquet", "audio_dir": "audio"},
        errors=bad,
        metrics={"throughput/utterances_per_s": len(items) / max(speak_s, 1e-9),
                 "throughput/audio_seconds_per_s": audio_seconds / max(speak_s, 1e-9)},
    )


def synth(exp: Experiment) -> StageDir:
    return run_stage(exp, "synth", _synthesize)
