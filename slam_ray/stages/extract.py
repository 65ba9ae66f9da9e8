"""`slam-ray extract`: audio -> discrete units, in parallel on Ray Data.

1. Resolve `extract.inputs` (folders, globs, JSONL/CSV manifests, '@synth'; local or s3:// / gs://) into rows
   (id, path, text, speaker) and where each file's word alignment is, if it has one: synth's index, a manifest's
   `aligned_text` column (or `alignment`, a JSON file's path), or a `<name>.json` beside the audio.
2. Tokeniser: load centroids, or fit k-means on features of a seeded sample of files (saved to `tokenizer/`).
3. Encode every file: Ray tasks decode it (mono, 16 kHz, long files cut into segments in pauses) and stream
   its segments to an actor pool (features -> units -> de-dup); a file that fails anywhere is one line of
   errors.jsonl and its neighbours still come through.
4. Write Parquet shards `units/part-NNNNN.parquet`, sorted by id (the same inputs give the same shards), each
   row with its words (`aligned_text`, in its segment's time) where the file has an alignment: what interleaved
   text-speech training needs (docs/interleaving.md). A malformed alignment is an error line (phase
   `alignment`) and the file's units still come through, without words.
"""

from __future__ import annotations

import glob
import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from slam_ray.config import Experiment
from slam_ray.core.runner import StageResult, init_ray, run_stage
from slam_ray.core.stage_io import StageDir, Timer, upstream_dir
from slam_ray.core.storage import is_remote, list_files, open_input, resolve_relative
from slam_ray.core.tracking import Tracker
from slam_ray.errors import SlamError
from slam_ray.parallel.actors import map_rows
from slam_ray.parallel.encode import iter_encoded
from slam_ray.speech.alignment import (
    alignment_json,
    holds_words,
    parse_alignment,
    segment_alignment,
)
from slam_ray.speech.tokenizer import UnitTokenizer, fit_kmeans
from slam_ray.speech.tts_backends import spoken_seconds

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif"}

UNITS_SCHEMA = pa.schema([
    ("id", pa.string()), ("path", pa.string()), ("units", pa.list_(pa.uint16())),
    ("durations", pa.list_(pa.uint16())), ("n_frames", pa.int64()), ("audio_seconds", pa.float64()),
    ("segment", pa.struct([("start", pa.float64()), ("end", pa.float64())])),
    ("text", pa.string()), ("speaker", pa.string()), ("dataset", pa.string()),
    ("aligned_text", pa.string()),  # JSON [[word, start_s, end_s], ...] in the segment's time; null: no alignment
])


# --- inputs ----------------------------------------------------------------------------------------------------


def _text_field(rec: dict, key: str) -> str:
    value = rec.get(key)
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)  # NaN != NaN


def _alignment_source(rec: dict, manifest: str) -> dict:
    """Where a manifest row's alignment is: its `aligned_text` (JSON text, or a list in JSONL) or the JSON file
    its `alignment` names (relative to the manifest)."""
    value = rec.get("aligned_text")
    if isinstance(value, (list, dict)):
        return {"aligned_text": json.dumps(value)}
    if isinstance(value, str) and value.strip():
        return {"aligned_text": value}
    file = _text_field(rec, "alignment")
    return {"alignment_file": _beside(manifest, file)} if file else {}


def _beside(manifest: str, relative: str) -> str:
    """A path a manifest names: absolute (or a URI) as given, otherwise relative to the manifest's folder."""
    if is_remote(manifest):
        return resolve_relative(manifest, relative)
    return str(Path(relative) if Path(relative).is_absolute() else Path(manifest).parent / relative)


def _manifest_rows(path: str) -> list[dict]:
    """Rows of a JSONL/CSV manifest, local or in object storage; relative audio paths are relative to it."""
    remote = is_remote(path)
    name = Path(path.partition("?")[0])  # a URI's query (endpoint etc.) is not part of its name
    source = open_input(path) if remote else path
    # No type inference: ids and speakers such as "00123" stay strings ("00123" became 123, "0012" and "012" the
    # same id; a CSV column with a blank cell turned 12 into "12.0").
    df = pd.read_json(source, lines=True, dtype=False) if name.suffix == ".jsonl" else pd.read_csv(source, dtype=str)
    if "path" not in df.columns:
        raise SlamError(f"manifest {path} has no `path` column (columns: {', '.join(map(str, df.columns))})")
    rows = []
    for i, rec in enumerate(df.to_dict("records")):
        rows.append({"id": _text_field(rec, "id") or f"{name.stem}-{i:07d}", "path": _beside(path, str(rec["path"])),
                     "text": _text_field(rec, "text"), "speaker": _text_field(rec, "speaker"),
                     **_alignment_source(rec, path)})
    return rows


def _remote_rows(uri: str) -> list[dict]:
    """Rows of the audio files under an s3:// / gs:// folder, glob or single object; ids relative to the folder;
    a `<name>.json` beside an audio file is its alignment."""
    listed = list_files(uri)
    sidecars = {str(Path(relative).with_suffix("")): file for relative, file in listed if relative.endswith(".json")}
    rows = []
    for relative, file in listed:
        if Path(relative).suffix.lower() in AUDIO_SUFFIXES:
            stem = str(Path(relative).with_suffix(""))
            rows.append({"id": stem, "path": file, "text": "", "speaker": "",
                         **({"alignment_file": sidecars[stem], "sidecar": True} if stem in sidecars else {})})
    return rows


def _file_rows(files: list[Path], root: Path | None) -> list[dict]:
    """Rows of local audio files; a `<name>.json` beside one is its alignment."""
    rows = []
    for f in sorted(files):
        rel = f.relative_to(root) if root else Path(f.name)
        sidecar = f.with_suffix(".json")
        rows.append({"id": str(rel.with_suffix("")), "path": str(f.absolute()), "text": "", "speaker": "",
                     **({"alignment_file": str(sidecar.absolute()), "sidecar": True} if sidecar.is_file() else {})})
    return rows


def _planned(exp: Experiment, row: dict) -> dict:
    """A synth row with no audio (`synth.write_audio: false`): what the encoding actor needs to speak it, and a
    duration estimated from the text (~14 characters/s) for sizing the k-means sample."""
    if row["path"]:
        return {}
    spec = {k: row[k] for k in ("backend", "text", "voice", "speed", "noise", "seed")}
    return {"speak": json.dumps({**spec, "sample_rate": exp.synth.sample_rate}), "duration": spoken_seconds(row["text"])}


SYNTH_COLUMNS = ["id", "path", "text", "voice", "duration", "speed", "noise", "seed", "backend"]


def _synth_rows(exp: Experiment) -> list[dict]:
    """Rows of synth's index, read a batch at a time. A row's word alignment is not loaded: it stays in the index
    (`synth_index`) until its shard's units are written (`_chunk_sources`) — sTinyStories' alignments are ~4 KB a
    story, gigabytes over the corpus, where the rest of a row is a path and a text."""
    path = str(upstream_dir(exp, "synth").local("index.parquet"))
    rows = []
    for batch in pq.ParquetFile(path).iter_batches(batch_size=8192, columns=[*SYNTH_COLUMNS, "aligned_text"]):
        aligned = pa.compute.is_valid(batch.column("aligned_text")).to_pylist()
        for r, has_words in zip(batch.select(SYNTH_COLUMNS).to_pylist(), aligned, strict=True):
            rows.append({"id": r["id"], "path": r["path"], "text": r["text"], "speaker": r["voice"],
                         "duration": r["duration"], **_planned(exp, r), **({"synth_index": path} if has_words else {})})
    return rows


def resolve_inputs(exp: Experiment) -> list[dict]:
    rows: list[dict] = []
    for dataset, entry in exp.named_inputs():
        found: list[dict] = []
        if entry == "@synth":
            found = _synth_rows(exp)
        elif is_remote(entry):
            base = entry.partition("?")[0]
            found = _manifest_rows(entry) if base.endswith((".jsonl", ".csv")) else _remote_rows(entry)
            if not found:
                raise SlamError(f"extract.inputs entry {entry!r} holds no audio file ({', '.join(sorted(AUDIO_SUFFIXES))})")
        elif Path(entry).is_dir():
            found = _file_rows([p for p in Path(entry).rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES], Path(entry))
        elif Path(entry).is_file() and Path(entry).suffix in (".jsonl", ".csv"):
            found = _manifest_rows(entry)
        elif Path(entry).is_file():
            found = _file_rows([Path(entry)], None)
        else:
            matches = [Path(p) for p in sorted(glob.glob(entry, recursive=True))]
            if not matches:
                raise SlamError(f"extract.inputs entry {entry!r} matches no folder, file, manifest or glob")
            found = _file_rows([p for p in matches if p.is_file()], None)
        rows += [{**r, "dataset": dataset} for r in found]
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise SlamError(f"extract.inputs give duplicate ids ({', '.join(dupes)}); give each input a distinct id")
    return rows


# --- actors ----------------------------------------------------------------------------------------------------


class FeatureActor:
    """Features of a sample of files, for fitting k-means (float16 bytes to keep the object store small).
    A long file contributes its first segment only (bounded memory)."""

    def __init__(self, tokenizer_cfg: dict, max_segment_seconds: float | None, segmenter: str = "vad") -> None:
        from slam_ray.config import TokenizerConfig
        from slam_ray.parallel.actors import limit_threads
        from slam_ray.speech.features import make_features

        limit_threads()
        self.features = make_features(TokenizerConfig.model_validate(tokenizer_cfg))
        self.max_segment_seconds, self.segmenter = max_segment_seconds, segmenter

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from slam_ray.parallel.tts import row_segments

        out = []
        for row in batch.to_dict("records"):
            try:
                _, _, audio = next(row_segments(row, self.max_segment_seconds, self.segmenter))
                feats = self.features(audio).cpu().numpy().astype(np.float16)
                out.append({"id": row["id"], "feats": feats.tobytes(), "dim": feats.shape[1], "error": None})
            except Exception as e:
                out.append({"id": row["id"], "feats": b"", "dim": 0, "error": str(e)})
        return pd.DataFrame(out)


# --- stage -----------------------------------------------------------------------------------------------------


def _seconds(row: dict) -> float:
    """A row's audio seconds, ~10 s when its duration is unknown (a file not yet read)."""
    return row.get("duration") or 10.0


def _fit_sample(exp: Experiment, rows: list[dict]) -> list[dict]:
    """A seeded sample with about `fit_frames` frames (or ~10 s per file when durations are unknown)."""
    cfg = exp.extract.tokenizer
    sample = list(rows)
    random.Random(cfg.seed).shuffle(sample)
    picked, frames = [], 0.0
    for row in sample:
        picked.append(row)
        frames += _seconds(row) * cfg.frame_rate
        if frames >= cfg.fit_frames * 1.1:
            break
    return picked


def _fit_in_driver(exp: Experiment, sample: list[dict]) -> bool:
    """A fit sample of at most `extract.local_fit_seconds` of audio is featurised in this process."""
    from slam_ray.parallel.actors import small_enough_for_the_driver

    return small_enough_for_the_driver(sum(_seconds(row) for row in sample), exp.extract.local_fit_seconds,
                                       exp.extract.num_gpus_per_actor)


def fit_tokenizer(exp: Experiment, rows: list[dict], folder: Path) -> UnitTokenizer:
    cfg = exp.extract.tokenizer
    if (folder / "tokenizer.json").is_file():  # written last by save(): a complete tokenizer from an earlier try
        return UnitTokenizer.load(folder)
    if cfg.centroids:
        tokenizer = UnitTokenizer.from_centroids(cfg)
        tokenizer.save(folder)
        return tokenizer
    by_id = {}
    sample = _fit_sample(exp, rows)
    ctor = {"tokenizer_cfg": cfg.model_dump(), "max_segment_seconds": exp.extract.max_segment_seconds,
            "segmenter": exp.extract.segmenter}
    records = (rec for df in map_rows(exp, sample, FeatureActor, ctor, exp.extract.num_actors, exp.extract.batch_size,
                                      exp.extract.num_gpus_per_actor, in_driver=_fit_in_driver(exp, sample))
               for rec in df.to_dict("records"))
    for rec in records:
        if not rec["error"]:  # a bad file is reported once, by the encoding pass that every file goes through
            by_id[rec["id"]] = np.frombuffer(rec["feats"], dtype=np.float16).reshape(-1, rec["dim"])
    # Ray Data returns batches in completion order: sort, so the same inputs always fit the same centroids.
    features = [by_id[i] for i in sorted(by_id)]
    if not features:
        raise SlamError("none of the sampled input files could be decoded to fit the tokenizer; check extract.inputs")
    centroids, mean, std = fit_kmeans(features, cfg)
    tokenizer = UnitTokenizer(cfg, centroids, mean, std)
    tokenizer.save(folder)
    return tokenizer


ALIGNMENT_FIELDS = ("aligned_text", "alignment_file", "sidecar", "synth_index")


class SynthWords:
    """Word alignments of `@synth` rows, read from synth's index a row group at a time: only the groups whose id
    range (Parquet statistics) meets the ids asked for, the last two kept (shards are written about in id order,
    so each group is read about once). Memory is bounded by the group size: a group per synth shard (1,000 rows by
    default) since synth writes its index part by part; an index written before that has groups of up to ~1 M
    rows, two of which are then held."""

    def __init__(self, path: str) -> None:
        self.file = pq.ParquetFile(path)
        id_column = self.file.schema_arrow.get_field_index("id")
        # (min id, max id) per non-empty row group, None where it has no statistics: read once, not per shard
        self.ranges: dict[int, tuple[str, str] | None] = {}
        for g in range(self.file.metadata.num_row_groups):
            group = self.file.metadata.row_group(g)
            stats = group.column(id_column).statistics
            if group.num_rows:
                self.ranges[g] = (stats.min, stats.max) if stats is not None and stats.has_min_max else None
        self.groups: dict[int, dict[str, str | None]] = {}
        self.groups_read: list[int] = []  # in order, for the record (the tests check which groups were read)

    def _group(self, g: int) -> dict[str, str | None]:
        if g not in self.groups:
            table = self.file.read_row_group(g, columns=["id", "aligned_text"])
            self.groups[g] = dict(zip(table.column("id").to_pylist(), table.column("aligned_text").to_pylist(),
                                      strict=True))
            self.groups_read.append(g)
            while len(self.groups) > 2:
                self.groups.pop(next(iter(self.groups)))
        return self.groups[g]

    def words(self, ids: list[str]) -> dict[str, str | None]:
        lo, hi, wanted, found = min(ids), max(ids), set(ids), {}
        for g, span in self.ranges.items():
            if span is not None and (span[1] < lo or span[0] > hi):
                continue
            group_words = self._group(g)
            found.update({uid: group_words[uid] for uid in wanted if uid in group_words})
        return found


def _chunk_sources(uids: list[str], sources: dict[str, dict], synth_words: SynthWords | None) -> dict[str, dict]:
    """The alignment sources of one shard's files, with the words of its `@synth` rows read from synth's index."""
    chunk = {uid: sources[uid] for uid in uids if uid in sources}
    wanted = [uid for uid, source in chunk.items() if "synth_index" in source]
    if wanted and synth_words is not None:
        words = synth_words.words(wanted)
        chunk.update({uid: {"aligned_text": words[uid]} for uid in wanted})
    return chunk


def _file_words(source: dict) -> list | None:
    """A file's alignment from its source (the JSON text, or the file holding it); ValueError if malformed."""
    if "aligned_text" in source:
        return parse_alignment(source["aligned_text"])
    file = source["alignment_file"]
    try:
        with (open_input(file) if is_remote(file) else open(file, "rb")) as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"alignment file {file} cannot be read ({e})") from None
    try:
        return parse_alignment(bytes(text).decode("utf-8"))
    except ValueError as e:
        if source.get("sidecar") and not holds_words(text):  # another tool's metadata (Libri-Light's beside
            return None                                     # every file): no alignment, not a bad one
        raise ValueError(f"{file}: {e}") from None


def _segment_words(good: list[dict], sources: dict[str, dict]) -> tuple[dict[str, str | None], list[dict]]:
    """Each encoded segment's words (JSON, in its own time; None for a file without an alignment) and an error
    line for each file whose alignment is malformed (its units still come through)."""
    words: dict[str, str | None] = {}
    errors: list[dict] = []
    parsed: dict[str, list | None] = {}
    for rec in good:
        uid = rec["input_id"]
        if uid not in parsed:
            parsed[uid] = None
            if uid in sources:
                try:
                    parsed[uid] = _file_words(sources[uid])
                except ValueError as e:
                    errors.append({"id": uid, "path": rec["path"], "phase": "alignment",
                                   "error": f"{e}; the file's units are kept without words"})
        file_words = parsed[uid]
        words[rec["id"]] = None if file_words is None else alignment_json(
            segment_alignment(file_words, rec["seg_start"], rec["seg_end"]))
    return words, errors


def _write_chunk(out: StageDir, index: int, good: list[dict], bad: list[dict], sources: dict[str, dict],
                 synth_words: SynthWords | None) -> None:
    """One shard per fixed chunk of inputs (sorted by id); the Parquet file, renamed into place last, marks
    the chunk done, so a rerun after an interruption encodes only the chunks that are missing."""
    (out.path / "chunks").mkdir(parents=True, exist_ok=True)
    (out.path / "units").mkdir(parents=True, exist_ok=True)
    words, alignment_errors = _segment_words(good, _chunk_sources([rec["input_id"] for rec in good], sources,
                                                                  synth_words))
    with open(out.path / "chunks" / f"part-{index:05d}.errors.jsonl", "w") as f:
        lines = [{"id": rec["id"], "path": rec["path"], "error": rec["error"], "phase": "encode"} for rec in bad]
        for line in sorted(lines + alignment_errors, key=lambda r: r["id"]):
            f.write(json.dumps(line) + "\n")
    rows = []
    for rec in sorted(good, key=lambda r: r["id"]):
        rows.append({**{k: rec[k] for k in UNITS_SCHEMA.names if k not in ("segment", "aligned_text")},
                     "segment": {"start": rec["seg_start"], "end": rec["seg_end"]}, "aligned_text": words[rec["id"]]})
    tmp = out.path / "units" / f".part-{index:05d}.parquet.tmp"
    pq.write_table(pa.Table.from_pylist(rows, schema=UNITS_SCHEMA), tmp)
    tmp.replace(out.path / "units" / f"part-{index:05d}.parquet")
    out.publish("chunks", f"part-{index:05d}.errors.jsonl")
    out.publish("units", f"part-{index:05d}.parquet")  # last: the chunk's done mark in a bucket too


def _extract(exp: Experiment, out: StageDir, tracker: Tracker, timer: Timer) -> StageResult:
    with timer.phase("inputs"):
        rows = sorted(resolve_inputs(exp), key=lambda r: r["id"])
    if not rows:
        raise SlamError("extract.inputs resolved to no audio files")
    # alignments stay here, on the driver: the encoding actors need none of them
    sources = {r["id"]: {k: r.pop(k) for k in ALIGNMENT_FIELDS if k in r} for r in rows}
    sources = {uid: source for uid, source in sources.items() if source}
    synth_index = next((s["synth_index"] for s in sources.values() if "synth_index" in s), None)
    synth_words = SynthWords(synth_index) if synth_index else None
    size = exp.extract.shard_files
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    out.local("chunks"), out.local("units")  # with a workdir in a bucket: the shards a killed run finished there
    todo = {i for i in range(len(chunks)) if not (out.path / "units" / f"part-{i:05d}.parquet").is_file()}
    if len(todo) < len(chunks):
        print(f"[extract] resuming: {len(chunks) - len(todo)} of {len(chunks)} shards already written")
    init_ray(exp)
    with timer.phase("fit_tokenizer"):
        fit_tokenizer(exp, rows, out.local("tokenizer"))
        out.publish("tokenizer")  # before any actor, which may run on another node, loads it
    chunk_of = {row["id"]: i for i in todo for row in chunks[i]}
    pending = [row for i in sorted(todo) for row in chunks[i]]
    received: dict[int, tuple[list[dict], list[dict]]] = {i: ([], []) for i in todo}
    files_done = dict.fromkeys(todo, 0)
    segments: dict[str, list[dict]] = {}  # a long file's segments, until all of them are in
    seconds, errors_seen = 0.0, 0
    with timer.phase("encode"), tqdm(total=len(pending), unit="file", desc="[extract] encode", mininterval=2) as bar:
        for rec in iter_encoded(exp, pending, out.location("tokenizer"), exp.extract.num_actors, exp.extract.batch_size,
                                exp.extract.num_gpus_per_actor):
            uid = rec["input_id"]
            parts = segments.setdefault(uid, [])
            parts.append(rec)
            if len(parts) < rec["n_segments"]:
                continue
            index = chunk_of[uid]
            good, bad = received[index]
            (bad if rec["error"] else good).extend(segments.pop(uid))
            files_done[index] += 1
            seconds += sum(p["audio_seconds"] for p in parts)
            errors_seen += 1 if rec["error"] else 0
            bar.update()
            bar.set_postfix_str(f"{seconds / 3600:.2f} h audio, {errors_seen} errors", refresh=False)
            if files_done[index] == len(chunks[index]):
                _write_chunk(out, index, good, bad, sources, synth_words)
                del received[index]
    errors = [json.loads(line) for i in range(len(chunks))
              for line in (out.path / "chunks" / f"part-{i:05d}.errors.jsonl").read_text().splitlines()]
    failed = sum(e["phase"] == "encode" for e in errors)
    if failed == len(rows):  # nothing encoded at all is a setup problem (a mount not there), not a few bad files
        raise SlamError(f"extract: every one of the {len(rows)} input files failed, e.g. {errors[0]['error']!r}; "
                        f"check that extract.inputs are readable, then delete {out.path} and run again (its shards "
                        "hold only these errors)")
    # The totals shard by shard: the driver never holds more than one shard's units (the `slam` corpus's are ~12 GB).
    audio_s, n_units, n_segments, with_words = 0.0, 0, 0, 0
    for i in range(len(chunks)):
        table = pq.read_table(out.path / "units" / f"part-{i:05d}.parquet", columns=["audio_seconds", "units", "aligned_text"])
        audio_s += float(pa.compute.sum(table["audio_seconds"]).as_py() or 0.0)
        n_units += int(pa.compute.sum(pa.compute.list_value_length(table["units"])).as_py() or 0)
        n_segments += table.num_rows
        with_words += table.num_rows - table["aligned_text"].null_count
    return StageResult(
        counts={"files": len(rows), "encoded": len(rows) - failed, "segments": n_segments, "units": n_units,
                "audio_seconds": round(audio_s, 1), "shards": len(chunks), "shards_resumed": len(chunks) - len(todo),
                # files without an alignment are fine for speech-only training: counted, not errors
                "segments_with_words": with_words,
                "alignment_errors": len(errors) - failed},
        outputs={"units": [f"units/part-{i:05d}.parquet" for i in range(len(chunks))], "tokenizer": "tokenizer"},
        errors=errors,
        metrics={"throughput/audio_seconds_per_s": audio_s / max(timer.timings["encode"], 1e-9),
                 "errors": float(len(errors)),
                 "units_per_second_of_audio": n_units / max(audio_s, 1e-9)},
    )


def extract(exp: Experiment) -> StageDir:
    return run_stage(exp, "extract", _extract)


def export_slamkit(exp: Experiment, form: str, path: str | Path) -> int:
    """Write this experiment's units in slamkit's `features` JSONL (`units`, `duration`, `file_name`) or `tokens`
    JSONL (`file_name`, `audio_repr`), one line per row in id order, for slamkit's own tools. Returns the rows."""
    from slam_ray.core.stage_io import stage_dir
    from slam_ray.speech.units import read_unit_shards, units_to_repr, write_jsonl

    out = stage_dir(exp, "extract")
    if not out.is_complete():
        raise SlamError(f"no complete extract output for this experiment at {out.root}: run `slam-ray extract` first")
    out.local("units")
    table = read_unit_shards(out.path).sort_values("id")
    if form == "features":
        # slamkit's interleaving reads a file's words from `aligned_text` in this file
        rows = ({"units": [int(u) for u in r.units], "duration": [int(d) for d in r.durations], "file_name": r.path or r.id,
                 **({"aligned_text": json.loads(r.aligned_text)} if isinstance(r.aligned_text, str) else {})}
                for r in table.itertuples())
    elif form == "tokens":
        rows = ({"file_name": r.path, "audio_repr": units_to_repr(r.units)} for r in table.itertuples())
    else:
        raise SlamError(f"unknown slamkit format {form!r}; choose features or tokens")
    write_jsonl(path, rows)
    return len(table)
