"""Unit extraction throughput: slam_ray's Ray Data pipeline vs a plain sequential loop, same files, same model.

The baseline is slamkit's way: one process, files sorted by length, padded batches, every layer of the model
computed (`output_hidden_states`) to read one, then nearest-centroid assignment. The pipeline is what
`slam-ray extract` runs (`slam_ray.parallel.encode.iter_encoded`): Ray tasks decode and resample the files into
segments, feeding an actor pool that runs the model only up to the layer read, one utterance per forward pass
on CPU (batched with exact group norms on GPU; units never depend on batch mates). Both use the same CPU cores
in total; the pipeline's time includes starting its actors and loading the model in each. Files: the two real LibriSpeech fixture utterances cut to random
lengths (2-14 s, like a real corpus). Model: an mHuBERT-base-shaped `HubertModel` (12 layers, 768 wide, 25 Hz
conv stack) with random weights built here, or `--model` (an HF id in the cache or a folder). Last line: JSON.

    .venv/bin/python bench/extract.py [--files 200] [--layer 11] [--batch 8] [--actors 2] [--model PATH] [--dtype bfloat16]
                                      [--repeat 1] [--pipeline-batch N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The repository's own real-speech fixtures (tests/data/slamkit_example/README.md: origin, MIT licence).
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "data" / "slamkit_example"


def make_files(folder: Path, n: int, seed: int = 0) -> list[Path]:
    from slam_ray.speech.audio import decode_audio, write_flac

    speech = [decode_audio(FIXTURES / f"audio{i}.flac") for i in (1, 2)]
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        source = speech[i % 2]
        length = int(rng.uniform(2.0, 14.0) * 16_000)
        start = int(rng.integers(0, len(source) - length))
        paths.append(folder / f"utt{i:04d}.flac")
        write_flac(paths[-1], source[start : start + length])
    return paths


def mhubert_base_shaped(folder: Path) -> str:
    import torch
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    config = HubertConfig(conv_dim=(512,) * 8, conv_stride=(5, 2, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2, 2))
    HubertModel(config).eval().save_pretrained(folder)
    return str(folder)


def plain_loop(paths: list[Path], model_path: str, layer: int, centroids: np.ndarray, batch: int,
               threads: int, dtype: str) -> tuple[float, int]:
    """slamkit's extractor: sorted by length, padded batches, all layers, no attention mask. Returns (s, frames)."""
    import torch
    from transformers import HubertModel

    from slam_ray.speech.audio import decode_audio

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = getattr(torch, dtype) if device == "cuda" else torch.float32
    start = time.perf_counter()
    model = HubertModel.from_pretrained(model_path).eval().to(device, torch_dtype)
    c = torch.from_numpy(centroids).to(device)
    audio = sorted((decode_audio(p) for p in paths), key=len)
    frames = 0
    with torch.inference_mode():
        for i in range(0, len(audio), batch):
            group = audio[i : i + batch]
            x = torch.zeros(len(group), max(len(a) for a in group))
            for row, a in enumerate(group):
                x[row, : len(a)] = torch.from_numpy(a)
            hidden = model(x.to(device, torch_dtype), output_hidden_states=True).hidden_states[layer].float()
            units = ((c**2).sum(1) - 2 * hidden @ c.T).argmin(-1)
            lengths = model._get_feat_extract_output_lengths(torch.tensor([len(a) for a in group]))
            frames += int(sum(len(units[row, : int(n)].cpu()) for row, n in enumerate(lengths)))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, frames


def ray_pipeline(paths: list[Path], tokenizer_dir: Path, actors: int, batch: int, cpus: float,
                 gpus: float, decode_cpus: float, repeat: int = 1,
                 num_cpus: int | None = None) -> tuple[float, int, float]:
    """(seconds, frames, audio-s/s after the first units: the pool's steady state, start-up excluded)."""
    import ray

    from slam_ray.config import Experiment
    from slam_ray.parallel.encode import iter_encoded

    exp = Experiment.model_validate({"name": "bench", "workdir": str(tokenizer_dir.parent), "stages": ["extract"],
                                     "ray": {"actor_cpus": cpus}, "extract": {"decode_cpus": decode_cpus}})
    rows = [{"id": f"{p.stem}_{r}", "path": str(p), "text": "", "speaker": "", "dataset": "bench"}
            for r in range(repeat) for p in paths]
    ray.init(num_cpus=num_cpus or max(2, round(actors * cpus + 2 * decode_cpus)),
             num_gpus=int(gpus * actors + 0.999) or None,
             include_dashboard=False, logging_level="ERROR")
    try:
        start = time.perf_counter()
        frames, errors, first, later_audio = 0, [], None, 0.0
        for rec in iter_encoded(exp, rows, tokenizer_dir, actors, batch, gpus):
            if first is None:
                first = time.perf_counter() - start
            else:
                later_audio += rec["audio_seconds"]
            frames += int(rec["n_frames"])
            if rec["error"]:
                errors.append(rec["error"])
        seconds = time.perf_counter() - start
        print(f"ray pipeline: first units after {first:.1f} s (actor start-up, model load, first batch)")
    finally:
        ray.shutdown()
    if errors:
        raise RuntimeError(f"{len(errors)} files failed: {errors[:3]}")
    return seconds, frames, later_audio / (seconds - first)


def main() -> None:
    import torch

    from slam_ray.config import TokenizerConfig
    from slam_ray.speech.tokenizer import UnitTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--layer", type=int, default=11)
    parser.add_argument("--batch", type=int, default=8, help="the loop's padded batch size (files)")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--model", default=None, help="HubertModel id or folder (default: random mHuBERT-base shape)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="GPU only")
    parser.add_argument("--units", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=1,
                        help="the pipeline reads each file this many times (a long job from few files; the loop "
                        "runs once and the ratio compares rates)")
    parser.add_argument("--pipeline-batch", type=int, default=None,
                        help="segments per actor call (default 4 on CPU, 128 on GPU as in the slam recipe)")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "audio").mkdir()
        paths = make_files(tmp_path / "audio", args.files)
        audio_seconds = sum(sf.info(str(p)).duration for p in paths)
        model = args.model or mhubert_base_shaped(tmp_path / "model")
        centroids = np.random.default_rng(0).normal(size=(args.units, 768)).astype(np.float32)
        cfg = TokenizerConfig(kind="hubert", model=model, layer=args.layer, n_units=args.units, dtype=args.dtype)
        tok = UnitTokenizer(cfg, centroids, np.zeros(768, np.float32), np.ones(768, np.float32))
        tok.save(tmp_path / "tokenizer")
        del tok
        print(f"{len(paths)} files, {audio_seconds:.0f} s of audio; layer {args.layer}; "
              f"{'GPU ' + args.dtype if gpu else 'CPU float32'}", flush=True)
        threads = 1 if gpu else args.actors  # the loop gets the cores the actors share
        loop_s, loop_frames = plain_loop(paths, model, args.layer, centroids, args.batch, threads, args.dtype)
        print(f"plain loop: {loop_s:.1f} s, {audio_seconds / loop_s:.1f} audio-s/s", flush=True)
        # CPU: the actors and two decoding tasks share the cores (Ray's CPU counts are bookkeeping); GPU: the
        # actors split the GPU and decoding tasks of one CPU each use every other core
        batch = args.pipeline_batch or (128 if gpu else 4)
        pipe_s, pipe_frames, steady = ray_pipeline(paths, tmp_path / "tokenizer", args.actors, batch,
                                                   0.8 if not gpu else 1.0, 1.0 / args.actors if gpu else 0.0,
                                                   0.2 if not gpu else 1.0, args.repeat,
                                                   os.cpu_count() if gpu else None)
        pipe_audio = audio_seconds * args.repeat
        print(f"ray pipeline: {args.repeat} x {len(paths)} files, {pipe_s:.1f} s, {pipe_audio / pipe_s:.1f} audio-s/s "
              f"({steady:.1f} after its first units)", flush=True)
    # the same work was done
    assert abs(pipe_frames - loop_frames * args.repeat) <= len(paths) * args.repeat, (pipe_frames, loop_frames)
    result = {"files": len(paths), "repeat": args.repeat, "audio_seconds": round(audio_seconds, 1),
              "layer": args.layer, "device": torch.cuda.get_device_name() if gpu else "cpu",
              "dtype": args.dtype if gpu else "float32", "pipeline_batch": batch,
              "pipeline_audio_s_per_s": round(pipe_audio / pipe_s, 2),
              "baseline_audio_s_per_s": round(audio_seconds / loop_s, 2),
              "ratio": round(pipe_audio / pipe_s / (audio_seconds / loop_s), 3),
              "pipeline_steady_audio_s_per_s": round(steady, 2)}  # on one GPU: audio-hours per GPU-hour
    print(json.dumps(result))


if __name__ == "__main__":
    main()
