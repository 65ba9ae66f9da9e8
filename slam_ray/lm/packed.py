"""Packed token windows on disk: the `pack` stage's output format, read memory-mapped by the training workers.

A pack output (format 2) is a folder of shards plus a small index, so neither the stage that writes it nor a
worker that reads it ever holds the corpus:

    index.json                    context_len; per split its shards (file, windows, tokens, pad); per dataset
                                  the training tokens, share and epochs; `vocabulary` (kind, size, pad_id,
                                  bos_id, eos_id) when it is not the speech-only one
    train/part-NNNNN.npy          uint16 [windows, context_len]: utterances `<s> u+2 ... <s>` concatenated and cut
                                  into windows; only a shard's last window is padded (<pad> = 0)
    train/part-NNNNN.starts.npy   int64: flat offsets (row * context_len + column) in that shard where an
                                  utterance begins (its <s>)
    val/part-NNNNN.npy, ...       the same for the held-out utterances

Under text–speech interleaving (`pack.interleave`) the windows hold ids of the merged vocabulary
(slam_ray/lm/vocabulary.py): uint32 when it has more than 65,536 ids, padded with its own `<pad>`.

Documents: a window's documents begin at column 0 and at every utterance start inside it. An utterance cut by a
window boundary is two documents; the later piece starts with the utterance's next unit (no repeated <s>), so
no token is added or lost by the cut.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from slam_ray.errors import SlamError
from slam_ray.speech.units import BOS_ID, EOS_ID, PAD_ID, UNIT_OFFSET

PACK_FORMAT = 2
SPLITS = ("train", "val")


def utterance_stream(values: np.ndarray, offsets: np.ndarray, order: np.ndarray, complete: bool = False
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The token stream of utterances `order` (indices into a ragged array: utterance i's units are
    `values[offsets[i]:offsets[i + 1]]`), each as `<s> u+2 ... <s>`, in that order; an index may repeat.
    Returns (tokens uint16, starts int64: where each utterance's <s> is). One slice copy per utterance (a loop
    per utterance, not per token: ~190M tokens/s on this 2-core machine; index arrays per token ran at ~17M).
    `complete`: the values already are whole token sequences (BOS to EOS, any vocabulary): copied as they are."""
    order = np.asarray(order, dtype=np.int64)
    if complete:
        lengths = (offsets[order + 1] - offsets[order]).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(order) else np.zeros(0, np.int64)
        tokens = np.empty(int(lengths.sum()), dtype=values.dtype)
        for begin, length, source in zip(starts.tolist(), lengths.tolist(), offsets[order].tolist(), strict=True):
            tokens[begin : begin + length] = values[source : source + length]
        return tokens, starts
    lengths = (offsets[order + 1] - offsets[order]).astype(np.int64)
    ends = np.cumsum(lengths + 2)
    starts = ends - (lengths + 2)
    tokens = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.uint16)
    tokens[starts] = BOS_ID
    tokens[ends - 1] = EOS_ID
    shifted = values.astype(np.uint16) + np.uint16(UNIT_OFFSET)
    for begin, end, source in zip((starts + 1).tolist(), (ends - 1).tolist(), offsets[order].tolist(), strict=True):
        tokens[begin:end] = shifted[source : source + end - begin]
    return tokens, starts


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    tmp.replace(path)


def write_shard(folder: Path, split: str, index: int, tokens: np.ndarray, starts: np.ndarray, context_len: int,
                pad_id: int = PAD_ID, dtype: type = np.uint16) -> dict[str, Any]:
    """Cut `tokens` into windows (the last one padded) and write shard `index` of `split`; returns its index row."""
    n_windows = -(-len(tokens) // context_len)
    pad = n_windows * context_len - len(tokens)
    windows = np.concatenate([tokens.astype(dtype, copy=False), np.full(pad, pad_id, dtype=dtype)]
                             ).reshape(n_windows, context_len)
    (folder / split).mkdir(parents=True, exist_ok=True)
    name = f"part-{index:05d}"
    _atomic_save(folder / split / f"{name}.starts.npy", np.asarray(starts, dtype=np.int64))
    _atomic_save(folder / split / f"{name}.npy", windows)
    return {"file": f"{name}.npy", "windows": n_windows, "tokens": int(len(tokens)), "pad": int(pad)}


def write_index(folder: Path, context_len: int, shards: dict[str, list[dict[str, Any]]],
                datasets: dict[str, dict[str, float]] | None = None, vocabulary: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    index = {"format": PACK_FORMAT, "context_len": context_len,
             "splits": {split: {"windows": sum(s["windows"] for s in rows), "tokens": sum(s["tokens"] for s in rows),
                                "pad": sum(s["pad"] for s in rows), "shards": rows}
                        for split, rows in shards.items()},
             "datasets": datasets or {}}
    if vocabulary is not None:  # absent: the speech-only vocabulary (outputs from before interleaving stay as they were)
        index["vocabulary"] = vocabulary
    tmp = folder / ".index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(folder / "index.json")
    return index


def save_windows(folder: str | Path, train: np.ndarray, val: np.ndarray) -> None:
    """Write already-cut windows ([n, context_len] each) as a one-shard pack output (benchmarks, tests)."""
    folder = Path(folder)
    context_len = train.shape[1]
    shards = {}
    for split, windows in (("train", train), ("val", val)):
        flat = np.asarray(windows, dtype=np.uint16).reshape(-1)
        starts = np.flatnonzero(flat == BOS_ID)[::2]  # every utterance is <s> ... <s>: its start is every other one
        shards[split] = [write_shard(folder, split, 0, flat, starts, context_len)]
    write_index(folder, context_len, shards)


def allow_open_files(n: int) -> None:
    """Raise this process's soft limit on open files towards `n` (up to the hard limit): the `slam` corpus is
    ~1,400 shards, and a soft limit of 1,024 is common."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = n if hard == resource.RLIM_INFINITY else min(n, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class PackedWindows:
    """One split of a pack output as a read-only array of windows `[len(self), context_len]`, memory-mapped shard
    by shard: indexing reads only the rows asked for, and the workers of a node share the page cache."""

    def __init__(self, folder: str | Path, split: str) -> None:
        folder = Path(folder)
        index_file = folder / "index.json"
        if not index_file.is_file():
            raise SlamError(f"{folder} holds no index.json: not a pack output of format {PACK_FORMAT} "
                            "(rerun `slam-ray pack`; an older train.npy output is not read)")
        index = json.loads(index_file.read_text())
        if index.get("format") != PACK_FORMAT:
            raise SlamError(f"{index_file}: pack format {index.get('format')}, this slam_ray reads {PACK_FORMAT}")
        self.folder, self.split = folder / split, split
        self.context_len = int(index["context_len"])
        vocabulary = index.get("vocabulary") or {}
        self.vocabulary = vocabulary  # {} = the speech-only vocabulary
        self.pad_id = int(vocabulary.get("pad_id", PAD_ID))
        self.dtype = np.dtype(vocabulary.get("dtype", "uint16"))
        rows = [s for s in index["splits"][split]["shards"] if s["windows"] > 0]
        self._files = [r["file"] for r in rows]
        self._shards: list[np.ndarray | None] = [None] * len(rows)
        self._shard_starts: list[np.ndarray | None] = [None] * len(rows)
        self.offsets = np.concatenate([[0], np.cumsum([r["windows"] for r in rows])]).astype(np.int64)
        allow_open_files(2 * len(rows) + 1024)  # a map (and its document starts) keeps a descriptor per shard

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.context_len

    def _shard(self, s: int) -> np.ndarray:
        if self._shards[s] is None:
            self._shards[s] = np.load(self.folder / self._files[s], mmap_mode="r")
        return self._shards[s]

    def __getitem__(self, index: int | slice | np.ndarray) -> np.ndarray:
        """Rows as an in-memory array (uint16, or uint32 for a merged vocabulary): `windows[i]`, `windows[a:b]` or
        `windows[[i, j, ...]]` (any order)."""
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        rows = np.atleast_1d(np.asarray(index, dtype=np.int64))
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"window index out of range 0..{len(self) - 1}")
        out = np.empty((len(rows), self.context_len), dtype=self.dtype)
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(shard_of):
            mask = shard_of == s
            out[mask] = self._shard(int(s))[rows[mask] - self.offsets[s]]
        return out[0] if np.ndim(index) == 0 else out

    def _starts(self, s: int) -> np.ndarray:
        if self._shard_starts[s] is None:
            self._shard_starts[s] = np.load(self.folder / self._files[s].replace(".npy", ".starts.npy"), mmap_mode="r")
        return self._shard_starts[s]

    def document_starts(self, window: int) -> np.ndarray:
        """Columns of window `window` where a document begins: 0, and every utterance start after it."""
        s = int(np.searchsorted(self.offsets, window, side="right") - 1)
        starts = self._starts(s)
        begin = (window - self.offsets[s]) * self.context_len
        inside = starts[np.searchsorted(starts, begin): np.searchsorted(starts, begin + self.context_len)] - begin
        return np.union1d([0], inside).astype(np.int64)

    def positions(self, rows: np.ndarray, tokens: np.ndarray | None = None) -> np.ndarray:
        """Position ids `[len(rows), context_len]` that restart at 0 at every document start of each window (the
        padding after a shard's last utterance is a document of its own): what document masking feeds the
        model. transformers reads restarting position ids as packed sequences (block-diagonal causal attention
        for sdpa/eager, varlen for flash_attention_2). `tokens`: the rows already read (`self[rows]`), if any."""
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        tokens = self[rows] if tokens is None else tokens
        columns = np.arange(self.context_len, dtype=np.int64)
        begins = np.zeros((len(rows), self.context_len), dtype=np.int64)
        for k, window in enumerate(rows.tolist()):
            marks = np.zeros(self.context_len, dtype=bool)
            marks[self.document_starts(window)] = True
            pad = np.flatnonzero(tokens[k] == self.pad_id)
            if len(pad):
                marks[pad[0]] = True
            begins[k] = np.maximum.accumulate(np.where(marks, columns, 0))
        return columns[None, :] - begins
