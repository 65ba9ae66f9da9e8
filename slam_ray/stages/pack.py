"""`slam-ray pack`: unit shards -> fixed-length token windows for training.

Each utterance becomes `<s> u+2 ... <s>` (BOS and EOS are both id 1, as in slamkit); utterances are shuffled
(seeded), concatenated and cut into `context_len` windows, so almost no position is padding. A seeded share
of utterances is held out as the validation split. `pack.mix` weights datasets (named by `extract.inputs`)
by their share of training tokens, `pack.epochs` caps how often each may be repeated.
Output: `train.npy`, `val.npy` (uint16, [n, context_len]); the manifest reports each dataset's share and epochs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from slam_ray.config import Experiment, name_entries
from slam_ray.core.runner import StageResult, run_stage
from slam_ray.core.stage_io import StageDir, Timer, upstream_dir
from slam_ray.core.tracking import Tracker
from slam_ray.errors import SlamError
from slam_ray.speech.units import PAD_ID, read_jsonl, read_unit_shards, repr_to_units, units_to_tokens


def pack_windows(sequences: list[np.ndarray], context_len: int) -> tuple[np.ndarray, int]:
    """Concatenate and cut into windows; the last partial window is padded. Returns (windows, n_pad)."""
    if not sequences:
        return np.zeros((0, context_len), dtype=np.uint16), 0
    stream = np.concatenate(sequences)
    n_windows = -(-len(stream) // context_len)
    n_pad = n_windows * context_len - len(stream)
    stream = np.concatenate([stream, np.full(n_pad, PAD_ID, dtype=stream.dtype)])
    return stream.reshape(n_windows, context_len).astype(np.uint16), n_pad


def select_mix(units: pd.DataFrame, mix: dict[str, float] | None, epochs: dict[str, float], seed: int
               ) -> tuple[list[np.ndarray], dict[str, dict[str, float]]]:
    """Token sequences for the training stream, drawn per dataset so each takes its `mix` share of tokens.

    Without a mix every utterance is used once. With one, dataset d may be read at most `epochs[d]` times
    (default 1); the stream is as long as the scarcest dataset allows at its share, the others are sampled to
    their share (whole shuffled passes, then a partial one). Deterministic for a seed.
    """
    seqs = [units_to_tokens(u) for u in units["units"]]
    names = units["dataset"].fillna("").astype(str).to_numpy()
    present = sorted(set(names))
    if mix is None:
        lengths = {d: float(sum(len(s) for s, n in zip(seqs, names, strict=True) if n == d)) for d in present}
        total = sum(lengths.values()) or 1.0
        return seqs, {d: {"tokens": lengths[d], "share": lengths[d] / total, "epochs": 1.0} for d in present}
    unknown = sorted(set(mix) - set(present)) + sorted(set(epochs) - set(present))
    if unknown:
        raise SlamError(f"pack.mix/pack.epochs name datasets {unknown} that the extract output does not hold; "
                        f"its datasets are {present} (named by extract.inputs)")
    weights = {d: w / sum(mix.values()) for d, w in mix.items() if w > 0}
    by_dataset = {d: [s for s, n in zip(seqs, names, strict=True) if n == d] for d in weights}
    tokens = {d: sum(len(s) for s in by_dataset[d]) for d in weights}
    stream_tokens = min(epochs.get(d, 1.0) * tokens[d] / weights[d] for d in weights)
    rng = np.random.default_rng(seed)
    chosen, report = [], {}
    for d in sorted(weights):
        target, taken = weights[d] * stream_tokens, 0
        while taken < target - 0.5:
            for i in rng.permutation(len(by_dataset[d])):
                if taken >= target - 0.5:
                    break
                chosen.append(by_dataset[d][i])
                taken += len(by_dataset[d][i])
        report[d] = {"tokens": float(taken), "epochs": taken / max(tokens[d], 1)}
    total = sum(r["tokens"] for r in report.values()) or 1.0
    for d in report:
        report[d]["share"] = report[d]["tokens"] / total
    order = rng.permutation(len(chosen))
    return [chosen[i] for i in order], report


def read_slamkit_units(path: str | Path, dataset: str) -> pd.DataFrame:
    """Utterances of a slamkit features JSONL (`units`, `duration`, `file_name`) or tokens JSONL
    (`file_name`, `audio_repr`), as rows (id, units, dataset)."""
    rows = []
    for i, rec in enumerate(read_jsonl(path)):
        if "units" in rec:
            units = rec["units"]
        elif "audio_repr" in rec:
            units = repr_to_units(rec["audio_repr"])
        else:
            raise SlamError(f"{path}:{i + 1}: neither a slamkit features row (`units`) nor a tokens row (`audio_repr`)")
        rows.append({"id": str(rec.get("file_name") or f"{dataset}-{i:07d}"), "units": np.asarray(units), "dataset": dataset})
    return pd.DataFrame(rows, columns=["id", "units", "dataset"])


def read_pack_inputs(exp: Experiment) -> pd.DataFrame:
    frames = []
    for dataset, entry in name_entries(exp.pack.inputs, {"@extract": "@extract"}):
        if entry == "@extract":
            extracted = upstream_dir(exp, "extract")
            extracted.local("units")  # fetched when the workdir is a bucket
            units = read_unit_shards(extracted.path)
            if "dataset" not in units.columns:
                units["dataset"] = ""
            frames.append(units[["id", "units", "dataset"]])
        elif Path(entry).is_file():
            frames.append(read_slamkit_units(entry, dataset))
        else:
            raise SlamError(f"pack.inputs entry {entry!r} is neither '@extract' nor an existing slamkit JSONL file")
    return pd.concat(frames, ignore_index=True)


def _pack(exp: Experiment, out: StageDir, tracker: Tracker, timer: Timer) -> StageResult:
    cfg = exp.pack
    with timer.phase("read"):
        units = read_pack_inputs(exp)
    if len(units) == 0:
        raise SlamError("pack.inputs hold no utterances to pack")
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(units))
    n_val = int(round(cfg.val_fraction * len(units)))
    counts: dict[str, int | float] = {"utterances": len(units)}
    with timer.phase("pack"):
        train_seqs, mix_report = select_mix(units.iloc[order[n_val:]], cfg.mix, cfg.epochs, cfg.seed)
        val_seqs = [units_to_tokens(units["units"].iloc[i]) for i in order[:n_val]]
        for split, seqs in (("train", train_seqs), ("val", val_seqs)):
            windows, n_pad = pack_windows(seqs, cfg.context_len)
            np.save(out.path / f"{split}.npy", windows)
            counts[f"{split}_windows"] = len(windows)
            counts[f"{split}_tokens"] = int(windows.size - n_pad)
            counts[f"{split}_pad_fraction"] = round(n_pad / max(windows.size, 1), 6)
    for dataset, r in mix_report.items():
        counts[f"mix.{dataset or 'default'}.share"] = round(r["share"], 4)
        counts[f"mix.{dataset or 'default'}.epochs"] = round(r["epochs"], 3)
    if counts["train_windows"] == 0:
        raise SlamError("no training windows; lower pack.val_fraction or give more audio")
    return StageResult(counts=counts, outputs={"train": "train.npy", "val": "val.npy"})


def pack(exp: Experiment) -> StageDir:
    return run_stage(exp, "pack", _pack)
