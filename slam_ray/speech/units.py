"""The one unit vocabulary and slamkit's unit file formats.

Vocabulary (slamkit's): `<pad>` = 0, `<s>` = 1 (BOS and EOS), unit i -> token i + 2.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

PAD_ID = 0
BOS_ID = 1
EOS_ID = 1
UNIT_OFFSET = 2


def vocab_size(n_units: int) -> int:
    return n_units + UNIT_OFFSET


def units_to_tokens(units: Sequence[int] | np.ndarray, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
    body = np.asarray(units, dtype=np.int64) + UNIT_OFFSET
    parts = ([np.array([BOS_ID])] if add_bos else []) + [body] + ([np.array([EOS_ID])] if add_eos else [])
    return np.concatenate(parts)


def tokens_to_units(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    t = np.asarray(tokens, dtype=np.int64)
    return t[t >= UNIT_OFFSET] - UNIT_OFFSET


def dedup(units: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Collapse runs of a repeated unit: returns (units, durations) with durations = run lengths in frames."""
    u = np.asarray(units)
    if u.size == 0:
        return u.astype(np.int64), np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[0], np.flatnonzero(u[1:] != u[:-1]) + 1])
    durations = np.diff(np.concatenate([starts, [u.size]]))
    return u[starts].astype(np.int64), durations.astype(np.int64)


# --- slamkit JSONL formats -------------------------------------------------------------------------------------

_UNIT_TOKEN = re.compile(r"<Un(\d+)>")


def units_to_repr(units: Iterable[int]) -> str:
    return "".join(f"<Un{int(u)}>" for u in units)


def repr_to_units(audio_repr: str) -> list[int]:
    units = [int(m) for m in _UNIT_TOKEN.findall(audio_repr)]
    if units_to_repr(units) != audio_repr:
        raise ValueError(f"not a slamkit audio_repr string: {audio_repr[:40]!r}...")
    return units


def read_jsonl(path: str | Path) -> Iterator[dict]:
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from e


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_unit_shards(folder: str | Path):
    """All rows of an extract output (its `units/part-*.parquet` shards) as one pandas DataFrame."""
    import pandas as pd

    shards = sorted((Path(folder) / "units").glob("part-*.parquet"))
    if not shards:
        return pd.DataFrame(columns=["id", "units", "durations"])
    return pd.concat([pd.read_parquet(p) for p in shards], ignore_index=True)
