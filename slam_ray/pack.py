"""`slam-ray pack`: unit shards -> fixed-length token windows for training.

Each utterance becomes `<s> u+2 ... <s>` (BOS and EOS are both id 1, as in slamkit); utterances are shuffled
(seeded), concatenated and cut into `context_len` windows, so almost no position is padding. A seeded share
of utterances is held out as the validation split. Output: `train.npy`, `val.npy` (uint16, [n, context_len]).
"""

from __future__ import annotations

import numpy as np

from slam_ray.config import Experiment
from slam_ray.errors import SlamError
from slam_ray.runner import StageResult, run_stage
from slam_ray.stage_io import StageDir, Timer, upstream_dir
from slam_ray.tracking import Tracker
from slam_ray.units import PAD_ID, read_unit_shards, units_to_tokens


def pack_windows(sequences: list[np.ndarray], context_len: int) -> tuple[np.ndarray, int]:
    """Concatenate and cut into windows; the last partial window is padded. Returns (windows, n_pad)."""
    if not sequences:
        return np.zeros((0, context_len), dtype=np.uint16), 0
    stream = np.concatenate(sequences)
    n_windows = -(-len(stream) // context_len)
    n_pad = n_windows * context_len - len(stream)
    stream = np.concatenate([stream, np.full(n_pad, PAD_ID, dtype=stream.dtype)])
    return stream.reshape(n_windows, context_len).astype(np.uint16), n_pad


def _pack(exp: Experiment, out: StageDir, tracker: Tracker, timer: Timer) -> StageResult:
    cfg = exp.pack
    with timer.phase("read"):
        units = read_unit_shards(upstream_dir(exp, "extract").path)
    if len(units) == 0:
        raise SlamError("the extract output holds no utterances to pack")
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(units))
    n_val = int(round(cfg.val_fraction * len(units)))
    splits = {"val": order[:n_val], "train": order[n_val:]}
    counts: dict[str, int | float] = {"utterances": len(units)}
    with timer.phase("pack"):
        for split, rows in splits.items():
            seqs = [units_to_tokens(units["units"].iloc[i]) for i in rows]
            windows, n_pad = pack_windows(seqs, cfg.context_len)
            np.save(out.path / f"{split}.npy", windows)
            n_tokens = windows.size
            counts[f"{split}_windows"] = len(windows)
            counts[f"{split}_tokens"] = int(n_tokens - n_pad)
            counts[f"{split}_pad_fraction"] = round(n_pad / max(n_tokens, 1), 6)
    if counts["train_windows"] == 0:
        raise SlamError("no training windows; lower pack.val_fraction or give more audio")
    return StageResult(counts=counts, outputs={"train": "train.npy", "val": "val.npy"})


def pack(exp: Experiment) -> StageDir:
    return run_stage(exp, "pack", _pack)
