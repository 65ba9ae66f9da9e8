"""`slam-ray pack`: unit shards -> shards of fixed-length token windows for training, streaming on Ray Data.

Each utterance becomes `<s> u+2 ... <s>` (BOS and EOS are both id 1, as in slamkit); utterances are concatenated
and cut into `context_len` windows, so almost no position is padding. Memory stays flat in corpus size: no
process ever holds more than one output shard's inputs. Read top to bottom:

1. **Input shards.** Each extract shard (`units/part-*.parquet`) is one; a slamkit features/tokens JSONL is cut
   into pieces of about `pack.shard_tokens / 4` tokens (byte ranges found by a scan).
2. **Statistics pass** (Ray Data, 16 input shards per task): per shard and dataset, utterances and tokens of
   the training and held-out parts. An utterance is held out for validation when a seeded hash of its dataset
   and id falls below `pack.val_fraction`: the same utterance is held out however the corpus is sharded.
3. **Mix plan** (driver, from those counts only): `pack.mix` shares of training tokens with `pack.epochs` caps
   give each dataset a rate: how many times its utterances are used (e.g. 2.4 = twice, plus 40% of its
   tokens a third time). Without a mix every utterance is used once.
4. **Two-level shuffle:** the input shards are put in a seeded order and grouped into consecutive runs of
   about `pack.shard_tokens` training tokens; each group's utterances (with their repeats) are shuffled
   within it -- the group is the shuffle buffer -- and written as one output shard. Training then draws
   windows in a fresh seeded order every epoch across all shards.
With `pack.interleave` (docs/interleaving.md), each utterance is read as a whole token sequence of the merged
vocabulary instead: the words of its alignment split into text and speech spans by a seeded sampler (seeded by
the utterance, so both passes and every rerun see the same spans), text spans tokenised by the text LM's
tokenizer, speech spans the units spoken over their words, a marker at every switch; an utterance without words
(or of a dataset not interleaved) is its units alone. Counting and packing then work on those sequences.

5. **Pack pass** (Ray Data, one task per group): writes `train/part-N.npy`, `val/part-N.npy` (+ `.starts.npy`
   document starts) and, last, `parts/part-N.json`, the group's done mark: a killed run redoes only missing
   groups. A group's output depends on the seed and its inputs only, so it is the same for any number of
   workers. The driver then writes `index.json` (format: slam_ray/lm/packed.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from slam_ray.config import Experiment, name_entries
from slam_ray.core.runner import StageResult, init_ray, run_stage
from slam_ray.core.stage_io import StageDir, Timer, upstream_dir
from slam_ray.core.storage import local_path, localize
from slam_ray.core.tracking import Tracker
from slam_ray.errors import SlamError
from slam_ray.lm.interleave import alternating_spans, interleaved_tokens, slamkit_spans
from slam_ray.lm.packed import utterance_stream, write_index, write_shard
from slam_ray.lm.vocabulary import MergedVocabulary, load_text_tokenizer, tokenizer_source, vocabulary_of
from slam_ray.parallel.actors import quiet_ray_data
from slam_ray.speech.alignment import parse_alignment
from slam_ray.speech.units import repr_to_units

# --- reading input shards ----------------------------------------------------------------------------------------


class Utterances:
    """A shard's utterances as a ragged array: utterance i's units are `values[offsets[i]:offsets[i + 1]]` — or,
    `complete`, its whole token sequence (merged vocabulary, BOS to EOS). `aligned_text` and `durations` (per
    utterance: its words' JSON and its units' durations in frames) are read only for interleaving."""

    def __init__(self, ids: list[str], datasets: list[str], values: np.ndarray, offsets: np.ndarray,
                 complete: bool = False, aligned_text: list | None = None, durations: list | None = None) -> None:
        self.ids, self.datasets, self.values, self.offsets = ids, np.asarray(datasets, dtype=object), values, offsets
        self.complete, self.aligned_text, self.durations = complete, aligned_text, durations

    @property
    def tokens(self) -> np.ndarray:
        """Tokens per utterance once packed: its units, BOS and EOS (a complete sequence: its length)."""
        return np.diff(self.offsets) + (0 if self.complete else 2)

    def take(self, keep: np.ndarray) -> Utterances:
        """Only utterances `keep` (indices), in a compact copy: a group holds what it packs, not all it read."""
        lengths = np.diff(self.offsets)[keep]
        values = (np.concatenate([self.values[self.offsets[i] : self.offsets[i + 1]] for i in keep.tolist()])
                  if len(keep) else self.values[:0])
        pick = lambda column: None if column is None else [column[i] for i in keep.tolist()]  # noqa: E731
        return Utterances([self.ids[i] for i in keep.tolist()], list(self.datasets[keep]), values,
                          np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), self.complete,
                          pick(self.aligned_text), pick(self.durations))

    @staticmethod
    def join(parts: list[Utterances]) -> Utterances:
        """The utterances of `parts`, in order (complete sequences, as merged_sequences makes them)."""
        offsets = [parts[0].offsets]
        for part in parts[1:]:
            offsets.append(part.offsets[1:] + offsets[-1][-1])
        return Utterances([i for p in parts for i in p.ids], [d for p in parts for d in p.datasets],
                          np.concatenate([p.values for p in parts]), np.concatenate(offsets).astype(np.int64),
                          all(p.complete for p in parts))


def _read_parquet(shard: dict[str, Any], words: bool = False) -> Utterances:
    import pyarrow.parquet as pq

    path = localize(shard["location"])
    names = pq.read_schema(path).names
    wanted = ["id", "units", "dataset"] + (["durations", "aligned_text"] if words else [])
    table = pq.read_table(path, columns=[c for c in wanted if c in names])
    units = table.column("units").combine_chunks()
    datasets = (table.column("dataset").fill_null("").to_pylist() if "dataset" in table.column_names
                else [""] * table.num_rows)
    offsets = units.offsets.to_numpy().astype(np.int64)
    values = units.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]  # `.values` ignores a slice
    u = Utterances(table.column("id").to_pylist(), datasets, values, offsets - offsets[0])
    if words:
        u.durations = table.column("durations").to_pylist()
        u.aligned_text = (table.column("aligned_text").to_pylist() if "aligned_text" in table.column_names
                          else [None] * table.num_rows)  # an extract output from before words were kept
    return u


def _read_jsonl(shard: dict[str, Any], words: bool = False) -> Utterances:
    """The lines of a slamkit features (`units`) or tokens (`audio_repr`) JSONL in bytes [start, stop)."""
    ids, arrays, aligned, durations = [], [], [], []
    with open(localize(shard["location"]), "rb") as f:
        f.seek(shard["start"])
        line_no = shard["first_line"]
        while f.tell() < shard["stop"]:
            line = f.readline()
            line_no += 1
            if not line.strip():
                continue
            rec = json.loads(line)
            if "units" in rec:
                units = rec["units"]
            elif "audio_repr" in rec:
                units = repr_to_units(rec["audio_repr"])
            else:
                raise SlamError(f"{shard['location']}:{line_no}: neither a slamkit features row (`units`) nor a "
                                "tokens row (`audio_repr`)")
            n_units = shard.get("n_units")
            if units and n_units is not None and not 0 <= min(units) <= max(units) < n_units:
                # uint16 would wrap a large id, and the model's embedding has n_units + 2 rows: fail here, not in train
                raise SlamError(f"{shard['location']}:{line_no}: unit ids {min(units)}..{max(units)} are outside the "
                                f"tokenizer's units (extract.tokenizer.n_units is {n_units}); set it to the units' "
                                f"tokenizer size (at least {max(units) + 1}), e.g. "
                                f"--set extract.tokenizer.n_units={max(units) + 1}")
            ids.append(str(rec.get("file_name") or f"{shard['location']}:{line_no}"))  # unique across files
            arrays.append(np.asarray(units, dtype=np.uint16))
            aligned.append(rec.get("aligned_text"))  # slamkit's features rows carry words for its interleaving
            durations.append(rec.get("duration"))
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint16)
    return Utterances(ids, [shard["dataset"]] * len(ids), values, offsets,
                      aligned_text=aligned if words else None, durations=durations if words else None)


def read_shard(shard: dict[str, Any], interleave: dict[str, Any] | None = None) -> Utterances:
    """An input shard's utterances: units, or with `interleave` (`interleave_settings`) whole sequences of the
    merged vocabulary (a text shard's texts too)."""
    if shard["kind"] == "text":
        return text_sequences(shard, interleave)
    u = _read_units(shard, words=interleave is not None)
    return u if interleave is None else merged_sequences(u, interleave, shard["location"])


def _read_units(shard: dict[str, Any], words: bool) -> Utterances:
    return _read_parquet(shard, words) if shard["kind"] == "parquet" else _read_jsonl(shard, words)


def pass_numbers(chosen: np.ndarray) -> np.ndarray:
    """For each entry of `chosen` (utterance indices with repeats), how many times the same utterance came
    before it: 0 on its first pass, 1 on its second..."""
    order = np.argsort(chosen, kind="stable")
    ranked = chosen[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    passes = np.empty(len(chosen), dtype=np.int64)
    passes[order] = np.arange(len(chosen)) - np.repeat(starts, np.diff(np.r_[starts, len(chosen)]))
    return passes


def redraw_repeats(u: Utterances, chosen: np.ndarray, shard: dict[str, Any], interleave: dict[str, Any]
                   ) -> tuple[Utterances, np.ndarray]:
    """`resample: epoch`: the k-th repeat of an utterance in `chosen` gets its spans from draw k — its sequences
    are appended to `u` and `chosen` points at them. The first pass keeps draw 0 (as `once`)."""
    passes = pass_numbers(chosen)
    if shard["kind"] == "text" or not (passes > 0).any():
        return u, chosen
    raw = _read_units(shard, words=True)  # read again only when a shard's utterances repeat
    chosen, pieces, base = chosen.copy(), [u], len(u.ids)
    for k in range(1, int(passes.max()) + 1):
        picked = chosen[passes == k]
        pieces.append(merged_sequences(raw.take(picked), interleave, shard["location"], draw=k))
        chosen[passes == k] = base + np.arange(len(picked))
        base += len(picked)
    return Utterances.join(pieces), chosen


# --- interleaving --------------------------------------------------------------------------------------------------


def interleave_settings(exp: Experiment) -> dict[str, Any] | None:
    """What a task needs to build merged sequences (JSON-able: it travels with the task)."""
    cfg = exp.pack.interleave
    if cfg is None:
        return None
    vocab = vocabulary_of(exp)  # loads the tokenizer here first: a bad path fails before any task starts
    return {"tokenizer": tokenizer_source(exp), "n_units": vocab.n_units, "datasets": cfg.datasets,
            "method": cfg.method, "lam": cfg.lam, "eta": cfg.eta, "unimodal_marker": cfg.unimodal_marker,
            "frame_rate": exp.extract.tokenizer.frame_rate, "seed": exp.pack.seed, "resample": cfg.resample}


def _utterance_rng(seed: int, dataset: str, uid: str, draw: int = 0) -> np.random.Generator:
    """The span sampler's generator for one utterance's `draw` (0: its only draw under `resample: once`)."""
    digest = hashlib.blake2b(f"spans\0{seed}\0{dataset}\0{uid}{f'{chr(0)}{draw}' if draw else ''}".encode(),
                             digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def merged_vocabulary(settings: dict[str, Any]) -> tuple[Any, MergedVocabulary]:
    """(the text tokenizer, the merged vocabulary) of `interleave_settings` (the tokenizer is loaded once per
    process)."""
    tokenizer = load_text_tokenizer(settings["tokenizer"])
    return tokenizer, MergedVocabulary.of(tokenizer, settings["n_units"])


def merged_sequences(u: Utterances, settings: dict[str, Any], location: str, draw: int = 0) -> Utterances:
    """Each utterance as `BOS pieces... EOS` in the merged vocabulary: interleaved when its dataset is and it has
    words (its spans from draw `draw`), else its units (after `<speech>` with `unimodal_marker`)."""
    tokenizer, vocab = merged_vocabulary(settings)
    chosen = settings["datasets"]
    sequences = []
    for i, uid in enumerate(u.ids):
        units = u.values[u.offsets[i] : u.offsets[i + 1]]
        dataset = str(u.datasets[i])
        try:
            words = parse_alignment(u.aligned_text[i]) if chosen is None or dataset in chosen else None
        except ValueError as e:
            raise SlamError(f"{location}: utterance {uid}: {e}") from None
        words = [(w.strip(), s, e) for w, s, e in words or [] if w.strip()]  # joined with spaces by the tokenizer step
        try:
            if words and u.durations[i] is not None:
                rng = _utterance_rng(settings["seed"], dataset, uid, draw)
                is_speech = (slamkit_spans(len(words), rng, settings["lam"], settings["eta"])
                             if settings["method"] == "slamkit" else alternating_spans(len(words), rng))
                ends = np.cumsum(np.asarray(u.durations[i], dtype=np.float64)) / settings["frame_rate"]
                body = np.concatenate([ids for _, ids in interleaved_tokens(words, is_speech, units, ends, tokenizer,
                                                                            vocab)])
            else:
                body = vocab.unit_ids(units)
                if settings["unimodal_marker"]:
                    body = np.concatenate([[vocab.speech_marker], body])
        except ValueError as e:  # units beyond extract.tokenizer.n_units, say
            raise SlamError(f"{location}: utterance {uid}: {e} (extract.tokenizer.n_units is {settings['n_units']}: "
                            "set it to the k-means size these units came from)") from None
        sequences.append(np.concatenate([[vocab.bos_id], body, [vocab.eos_id]]).astype(vocab.dtype))
    lengths = np.array([len(q) for q in sequences], dtype=np.int64)
    values = np.concatenate(sequences) if sequences else np.zeros(0, dtype=vocab.dtype)
    return Utterances(u.ids, list(u.datasets), values, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                      complete=True)


def write_text_shards(exp: Experiment, out: StageDir) -> list[dict[str, Any]]:
    """Each `pack.text` dataset's texts (read and cut as `synth.corpus` reads them, at most its `n_sentences`) as
    Parquet shards of about `pack.shard_tokens` characters under `text/<name>/` in the stage folder: input shards
    like extract's, written once (a rerun after a kill reads them back)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from slam_ray.speech.text_sources import load_texts

    shards = []
    for dataset in exp.pack.text:
        folder = out.path / "text" / dataset.name
        done = folder / "shards.json"
        if not done.is_file():
            texts, _ = load_texts(dataset.corpus)
            if not texts:
                raise SlamError(f"pack.text {dataset.name!r}: its corpus gave no text ({dataset.corpus.path})")
            folder.mkdir(parents=True, exist_ok=True)
            names, start, size = [], 0, 0
            for i, text in enumerate(texts):
                size += len(text)
                if size >= exp.pack.shard_tokens or i == len(texts) - 1:
                    name = f"part-{len(names):05d}.parquet"
                    ids = [f"{dataset.name}/{k:09d}" for k in range(start, i + 1)]
                    pq.write_table(pa.table({"id": ids, "text": texts[start : i + 1]}), folder / name)
                    names.append(name)
                    start, size = i + 1, 0
            tmp = folder / ".shards.json.tmp"
            tmp.write_text(json.dumps(names))
            tmp.replace(done)  # last: the dataset's shards are all there
        for name in json.loads(done.read_text()):
            out.publish("text", dataset.name, name)
            shards.append({"kind": "text", "location": out.location("text", dataset.name, name),
                           "dataset": dataset.name, "id": f"@text/{dataset.name}/{name}"})
        out.publish("text", dataset.name, "shards.json")
    return shards


def text_sequences(shard: dict[str, Any], settings: dict[str, Any] | None) -> Utterances:
    """A text shard's texts as `BOS [<text>] tokens EOS` in the merged vocabulary (the marker with
    `unimodal_marker`, as a speech-only utterance's)."""
    import pyarrow.parquet as pq

    if settings is None:
        raise SlamError("pack.text needs pack.interleave: text ids live in the merged vocabulary")
    tokenizer, vocab = merged_vocabulary(settings)
    table = pq.read_table(localize(shard["location"]))
    texts = table.column("text").to_pylist()
    lead = [vocab.text_marker] if settings["unimodal_marker"] else []
    sequences = [np.asarray([vocab.bos_id, *lead, *ids, vocab.eos_id], dtype=vocab.dtype)
                 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]  # one batched call
    lengths = np.array([len(q) for q in sequences], dtype=np.int64)
    values = np.concatenate(sequences) if sequences else np.zeros(0, dtype=vocab.dtype)
    return Utterances(table.column("id").to_pylist(), [shard["dataset"]] * len(texts), values,
                      np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), complete=True)


def modality_counts(tokens: np.ndarray, settings: dict[str, Any] | None) -> dict[str, int]:
    """Unit, text and marker tokens of a merged stream (BOS/EOS count as text: they are the tokenizer's)."""
    if settings is None:
        return {}
    _, vocab = merged_vocabulary(settings)
    units = int(((tokens >= vocab.unit_offset) & (tokens < vocab.text_marker)).sum())
    markers = int(((tokens == vocab.text_marker) | (tokens == vocab.speech_marker)).sum())
    return {"unit_tokens": units, "marker_tokens": markers, "text_tokens": int(len(tokens)) - units - markers}


SEGMENT_SUFFIX = re.compile(r"@\d{4}$")  # extract's id of a long file's piece: <recording id>@<index>


def held_out(u: Utterances, seed: int, fraction: float) -> np.ndarray:
    """Which utterances are validation: a seeded hash of (dataset, recording) below `fraction`, so the choice
    depends on the utterance alone, not on the shard it is in or on how many workers pack. The recording is the id
    less extract's segment suffix (`<id>@0003`): the pieces of one long file (a Libri-Light chapter, one speaker,
    running text) go to the same side — hashed one by one, neighbours in training made the validation loss low."""
    if fraction <= 0:
        return np.zeros(len(u.ids), dtype=bool)
    draws = [int.from_bytes(hashlib.blake2b(f"{seed}\0{d}\0{SEGMENT_SUFFIX.sub('', i)}".encode(), digest_size=8).digest(),
                            "little")
             for d, i in zip(u.datasets, u.ids, strict=True)]
    return np.array(draws, dtype=np.float64) / 2.0**64 < fraction


# --- pass 1: statistics ----------------------------------------------------------------------------------------


def _jsonl_pieces(location: str, dataset: str, piece_tokens: int, n_units: int | None = None) -> list[dict[str, Any]]:
    """Byte ranges of a JSONL file holding about `piece_tokens` tokens each (one scan, line by line); reading one
    checks its unit ids against `n_units`."""
    pieces, start, first_line, tokens, line_no = [], 0, 0, 0, 0
    with open(localize(location), "rb") as f:
        for line in iter(f.readline, b""):
            line_no += 1
            if line.strip():
                rec = json.loads(line)
                tokens += (len(rec["units"]) if "units" in rec else rec.get("audio_repr", "").count("<")) + 2
            if tokens >= piece_tokens:
                pieces.append({"start": start, "stop": f.tell(), "first_line": first_line})
                start, first_line, tokens = f.tell(), line_no, 0
        if f.tell() > start:
            pieces.append({"start": start, "stop": f.tell(), "first_line": first_line})
    return [{"kind": "jsonl", "location": location, "dataset": dataset, **p, "id": f"{location}@{p['start']:015d}",
             **({"n_units": n_units} if n_units is not None else {})} for p in pieces]


def shard_stats(shard: dict[str, Any], seed: int, val_fraction: float, interleave: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """Per dataset of one input shard: utterances and tokens of its training and held-out parts."""
    u = read_shard(shard, interleave)
    val, tokens = held_out(u, seed, val_fraction), u.tokens
    per: dict[str, dict[str, int]] = {}
    for d in sorted(set(u.datasets)):
        mine = u.datasets == d
        per[d] = {"train_utterances": int((mine & ~val).sum()), "train_tokens": int(tokens[mine & ~val].sum()),
                  "val_utterances": int((mine & val).sum()), "val_tokens": int(tokens[mine & val].sum())}
    return {**shard, "datasets": per}


def _stats_task(row: dict[str, Any], seed: int, val_fraction: float, piece_tokens: int,
                interleave: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Statistics of a few input shards (several per task: a Ray task costs more than counting a small shard)."""
    rows = []
    for shard in json.loads(row["shards"]):
        pieces = (_jsonl_pieces(shard["location"], shard["dataset"], piece_tokens, shard.get("n_units"))
                  if shard["kind"] == "jsonl" else [shard])
        rows += [{"stats": json.dumps(shard_stats(p, seed, val_fraction, interleave))} for p in pieces]
    return rows


def input_shards(exp: Experiment) -> list[dict[str, Any]]:
    """The inputs named by `pack.inputs`: each extract shard, and each slamkit JSONL file (split in pass 1)."""
    shards = []
    for dataset, entry in name_entries(exp.pack.inputs, {"@extract": "@extract"}):
        if entry == "@extract":
            extracted = upstream_dir(exp, "extract")
            for name in (extracted.read_manifest() or {}).get("outputs", {}).get("units", []):
                shards.append({"kind": "parquet", "location": extracted.location(name), "id": f"@extract/{name}"})
        elif Path(entry).is_file():
            shards.append({"kind": "jsonl", "location": str(Path(entry).resolve()), "dataset": dataset,
                           "n_units": exp.extract.tokenizer.n_units})
        else:
            raise SlamError(f"pack.inputs entry {entry!r} is neither '@extract' nor an existing slamkit JSONL file")
    return shards


# --- pass 2: the mix plan and the groups -------------------------------------------------------------------------


def mix_rates(train_tokens: dict[str, int], mix: dict[str, float] | None, epochs: dict[str, float]) -> dict[str, float]:
    """Times each dataset's training utterances are used so that it takes its `mix` share of the training tokens,
    none more than its `epochs` cap (default 1): the scarcest dataset at its share sets the stream's length.
    Without a mix every dataset is used once; a dataset the mix does not name is left out."""
    present = sorted(train_tokens)
    if mix is None:
        return dict.fromkeys(present, 1.0)
    unknown = sorted(set(mix) - set(present)) + sorted(set(epochs) - set(present))
    if unknown:
        raise SlamError(f"pack.mix/pack.epochs name datasets {unknown} that the inputs do not hold; "
                        f"their datasets are {present} (named by extract.inputs or pack.inputs)")
    weights = {d: w / sum(mix.values()) for d, w in mix.items() if w > 0}
    empty = [d for d in weights if train_tokens[d] == 0]
    if empty:
        raise SlamError(f"pack.mix gives {empty} a share but they hold no training tokens")
    stream = min(epochs.get(d, 1.0) * train_tokens[d] / weights[d] for d in weights)
    return {d: (weights[d] * stream / train_tokens[d] if d in weights else 0.0) for d in present}


def plan_groups(stats: list[dict[str, Any]], rates: dict[str, float], shard_tokens: int, seed: int
                ) -> list[list[dict[str, Any]]]:
    """Input shards in a seeded order, cut into consecutive groups of about `shard_tokens` training tokens."""
    ordered = [stats[i] for i in np.random.default_rng(seed).permutation(len(stats))]
    groups, current, size = [], [], 0.0
    for shard in ordered:
        current.append(shard)
        size += sum(rates.get(d, 0.0) * c["train_tokens"] + c["val_tokens"] for d, c in shard["datasets"].items())
        if size >= shard_tokens:
            groups.append(current)
            current, size = [], 0.0
    if current:
        groups.append(current)
    return groups


def choose_training(u: Utterances, train: np.ndarray, rates: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    """Indices of the training utterances with their repeats: rate 2.4 = every utterance twice, and a seeded
    choice of utterances holding 40% of the dataset's tokens in this shard a third time (rounded to the nearest
    utterance, so the shares hold over many shards)."""
    tokens, chosen = u.tokens, []
    for d in sorted(set(u.datasets[train])):
        mine = np.flatnonzero(train & (u.datasets == d))
        whole, part = divmod(rates.get(d, 0.0), 1.0)
        chosen.extend([mine] * int(whole))
        if part > 0:
            candidates = rng.permutation(mine)
            cumulative = np.cumsum(tokens[candidates])
            quota = part * cumulative[-1]
            chosen.append(candidates[: int(np.searchsorted(cumulative - tokens[candidates] / 2, quota))])
    return np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, dtype=np.int64)


def pack_group(group: dict[str, Any]) -> dict[str, Any]:
    """Read one group's input shards, choose and shuffle its utterances, write its train and val shards, then
    its done mark. Returns the group's index rows and per-dataset training tokens."""
    rng = np.random.default_rng([group["seed"], group["index"]])
    merged = merged_vocabulary(group["interleave"])[1] if group.get("interleave") else None
    parts: dict[str, list[tuple[Utterances, np.ndarray]]] = {"train": [], "val": []}
    datasets: dict[str, int] = {}
    for shard in group["shards"]:
        u = read_shard(shard, group.get("interleave"))
        val = held_out(u, group["seed"], group["val_fraction"])
        chosen = choose_training(u, ~val, group["rates"], rng)
        if (group.get("interleave") or {}).get("resample") == "epoch":
            u, chosen = redraw_repeats(u, chosen, shard, group["interleave"])
        names, tokens = u.datasets[chosen], u.tokens[chosen]
        for d in set(names):
            datasets[d] = datasets.get(d, 0) + int(tokens[names == d].sum())
        # keep only what is packed (a dataset used at a low rate, or only for validation, is mostly dropped here),
        # so a group's memory is its output's size plus one input shard
        keep = np.union1d(chosen, np.flatnonzero(val)).astype(np.int64)
        u, chosen, val_rows = u.take(keep), np.searchsorted(keep, chosen), np.searchsorted(keep, np.flatnonzero(val))
        parts["train"].append((u, chosen))
        parts["val"].append((u, val_rows))
    folder = local_path(group["root"])  # this node's staging copy when the workdir is a bucket
    rows = {}
    for split, selections in parts.items():
        values, offsets, order, base, count = [], [np.zeros(1, dtype=np.int64)], [], 0, 0
        for u, chosen in selections:  # one ragged array of the group's utterances
            values.append(u.values)
            offsets.append(u.offsets[1:] + base)
            order.append(chosen + count)
            base, count = base + int(u.offsets[-1]), count + len(u.ids)
        merged_offsets = np.concatenate(offsets).astype(np.int64)
        order_all = np.concatenate(order) if order else np.zeros(0, dtype=np.int64)
        order_all = order_all[rng.permutation(len(order_all))]  # the group is the shuffle buffer
        tokens, starts = utterance_stream(np.concatenate(values) if values else np.zeros(0, np.uint16),
                                          merged_offsets, order_all, complete=merged is not None)
        rows[split] = write_shard(folder, split, group["index"], tokens, starts, group["context_len"],
                                  **({"pad_id": merged.pad_id, "dtype": merged.dtype} if merged else {}))
        if split == "train":
            modalities = modality_counts(tokens, group.get("interleave"))
    done = {"index": group["index"], "shards": rows, "datasets": datasets, "modalities": modalities,
            "utterances": {split: int(sum(len(picked) for _, picked in selections)) for split, selections in parts.items()}}
    (folder / "parts").mkdir(parents=True, exist_ok=True)
    tmp = folder / "parts" / f".part-{group['index']:05d}.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(done))
    tmp.replace(folder / "parts" / f"part-{group['index']:05d}.json")  # last: the group's done mark
    return done


def _pack_task(row: dict[str, Any]) -> dict[str, Any]:
    from slam_ray.core.storage import publish

    group = json.loads(row["group"])
    done = pack_group(group)
    name = f"part-{group['index']:05d}"
    for relative in (f"train/{name}.npy", f"train/{name}.starts.npy", f"val/{name}.npy", f"val/{name}.starts.npy",
                     f"parts/{name}.json"):  # in a bucket: uploaded, the done mark last
        publish(group["root"], relative)
    return {"done": json.dumps(done)}


IN_DRIVER_ITEMS = 4  # up to this many tasks run in the driver: Ray Data's start-up (~2.5 s here) costs more


def _map(items: list[dict[str, Any]], fn: Any, exp: Experiment, flat: bool = False, **fn_kwargs: Any):
    """Run `fn` over `items` (one JSON string column each) as Ray Data tasks, `pack.num_workers` at a time. A few
    items (a statistics task covers 16 shards, a pack task ~4 M tokens: well under a second each) run here, in the
    driver, one after the other: the same function on the same input, without a Ray Data start-up that would cost
    more than the work (the quickstart's pack is one group; 10 M tokens are two)."""
    if len(items) <= IN_DRIVER_ITEMS:
        return (row for item in items for row in (fn(item, **fn_kwargs) if flat else [fn(item, **fn_kwargs)]))
    import ray.data

    init_ray(exp)
    quiet_ray_data()
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    mapper = ds.flat_map if flat else ds.map
    return mapper(fn, fn_kwargs=fn_kwargs, num_cpus=exp.ray.actor_cpus,
                  compute=ray.data.TaskPoolStrategy(size=min(exp.pack.num_workers, len(items)))).iter_rows()


def _pack(exp: Experiment, out: StageDir, tracker: Tracker, timer: Timer) -> StageResult:
    cfg = exp.pack
    shards = input_shards(exp) + write_text_shards(exp, out)
    if not shards:
        raise SlamError("pack.inputs hold no unit shards to pack")
    interleave = interleave_settings(exp)
    out.local("parts")  # with a workdir in a bucket: the groups a killed run finished there
    stats_file = out.path / "stats.json"
    with timer.phase("stats"):
        if (cached := out.local("stats.json")).is_file():  # pass 1 of a killed run
            stats = json.loads(cached.read_text())
        else:
            per_task = 16  # counting runs at ~50M tokens/s: a task per shard would cost more than the counting
            stats = [json.loads(r["stats"]) for r in tqdm(
                _map([{"shards": json.dumps(shards[i : i + per_task])} for i in range(0, len(shards), per_task)],
                         _stats_task, exp, flat=True, seed=cfg.seed,
                         val_fraction=cfg.val_fraction, piece_tokens=max(1, cfg.shard_tokens // 4),
                         interleave=interleave),
                desc="[pack] count", unit="piece", mininterval=2)]
            stats.sort(key=lambda s: s["id"])
            tmp = out.path / f".stats.json.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(stats))
            tmp.replace(stats_file)  # atomic: a kill mid-write leaves no truncated file for the rerun to read
            out.publish("stats.json")
    train_tokens: dict[str, int] = {}
    for s in stats:
        for d, c in s["datasets"].items():
            train_tokens[d] = train_tokens.get(d, 0) + c["train_tokens"]
    if not sum(c["train_utterances"] + c["val_utterances"] for s in stats for c in s["datasets"].values()):
        raise SlamError("pack.inputs hold no utterances to pack")
    rates = mix_rates(train_tokens, cfg.mix, cfg.epochs)
    groups = [{"index": i, "shards": g, "rates": rates, "seed": cfg.seed, "val_fraction": cfg.val_fraction,
               "context_len": cfg.context_len, "root": out.root, "interleave": interleave}
              for i, g in enumerate(plan_groups(stats, rates, cfg.shard_tokens, cfg.seed))]
    todo = [g for g in groups if not (out.path / "parts" / f"part-{g['index']:05d}.json").is_file()]
    if len(todo) < len(groups):
        print(f"[pack] resuming: {len(groups) - len(todo)} of {len(groups)} shards already written")
    with timer.phase("pack"):
        for _ in tqdm(_map([{"group": json.dumps(g)} for g in todo], _pack_task, exp) if todo else [],
                      total=len(todo), desc="[pack] pack", unit="shard", mininterval=2):
            pass
    done = [json.loads((out.local("parts", f"part-{g['index']:05d}.json")).read_text()) for g in groups]
    taken: dict[str, int] = {}
    for part in done:
        for d, n in part["datasets"].items():
            taken[d] = taken.get(d, 0) + n
    total = sum(taken.values()) or 1
    report = {d: {"tokens": taken.get(d, 0), "share": taken.get(d, 0) / total,
                  "epochs": taken.get(d, 0) / max(train_tokens[d], 1)} for d in sorted(rates) if rates[d] > 0}
    index = write_index(out.path, cfg.context_len, {split: [p["shards"][split] for p in done] for split in ("train", "val")},
                        report, None if interleave is None else merged_vocabulary(interleave)[1].index_entry())
    counts: dict[str, int | float] = {"utterances": sum(c["train_utterances"] + c["val_utterances"] for s in stats
                                                        for c in s["datasets"].values()),
                                      "shards": len(groups), "shards_resumed": len(groups) - len(todo)}
    for split, info in index["splits"].items():
        counts[f"{split}_windows"] = info["windows"]
        counts[f"{split}_tokens"] = info["tokens"]
        counts[f"{split}_pad_fraction"] = round(info["pad"] / max(info["windows"] * cfg.context_len, 1), 6)
    for dataset, r in report.items():
        counts[f"mix.{dataset or 'default'}.share"] = round(r["share"], 4)
        counts[f"mix.{dataset or 'default'}.epochs"] = round(r["epochs"], 3)
    if interleave is not None:  # what share of the training tokens is speech (the paper's ~40% at its settings)
        for kind in ("unit", "text", "marker"):
            n = sum(p.get("modalities", {}).get(f"{kind}_tokens", 0) for p in done)
            counts[f"train_{kind}_token_share"] = round(n / max(counts["train_tokens"], 1), 4)
    if counts["train_windows"] == 0:
        raise SlamError("no training windows; lower pack.val_fraction or give more audio")
    seconds = max(timer.timings.get("pack", 0.0), 1e-9)
    return StageResult(counts=counts, outputs={"index": "index.json", "train": "train", "val": "val"},
                       metrics={"throughput/tokens_per_s": (counts["train_tokens"] + counts["val_tokens"]) / seconds})


def pack(exp: Experiment) -> StageDir:
    return run_stage(exp, "pack", _pack)
