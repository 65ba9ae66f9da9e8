"""Speech units of arbitrary audio files (an evaluation dataset, generation prompts) with the experiment's
tokenizer, encoded in one Ray Data pass and cached under WORKDIR/eval_units/ per file list and tokenizer; and
of synth's spoken preference triples (`slam-ray export --format preferences`)."""

from __future__ import annotations

from pathlib import Path

from slam_ray.config import Experiment
from slam_ray.core.fingerprint import stat_digest
from slam_ray.core.runner import cached_json, init_ray
from slam_ray.core.stage_io import READERS_VERSION, StageDir, stage_key, upstream_dir
from slam_ray.errors import SlamError
from slam_ray.parallel.encode import encode_files
from slam_ray.speech.spoken_swag import PARTS
from slam_ray.speech.units import read_jsonl, write_jsonl


def tokenizer_dir(exp: Experiment) -> str:
    """Where the fitted tokenizer (features + k-means) of the extract stage lives."""
    return upstream_dir(exp, "extract").location("tokenizer")


def audio_units(exp: Experiment, paths: list[str]) -> tuple[dict[str, list[int]], dict[str, list[int]], list[dict]]:
    """(units, durations, errors) of every audio file (by path) with the experiment's tokenizer, cached under
    WORKDIR/eval_units/ per file list and tokenizer (shared by likelihood tasks and generation prompts); a file
    cut into segments (extract.max_segment_seconds) is joined back in order."""
    payload = {"files": sorted(set(paths)), "extract": stage_key(exp, "extract"), "readers_version": READERS_VERSION}
    payload["stats"] = stat_digest(payload["files"])  # a dataset's audio rewritten in place is encoded anew

    def tokenise(cache: StageDir) -> dict:
        init_ray(exp)
        rows = [{"id": f"f{i:08d}", "path": p, "text": "", "speaker": ""} for i, p in enumerate(payload["files"])]
        good, bad = encode_files(exp, rows, tokenizer_dir(exp), exp.extract.num_actors, exp.extract.batch_size,
                                 exp.extract.num_gpus_per_actor)
        joined: dict[str, list[int]] = {}
        durations: dict[str, list[int]] = {}
        for rec in sorted(good, key=lambda r: (r["path"], r["seg_start"])):
            units, runs = joined.setdefault(rec["path"], []), durations.setdefault(rec["path"], [])
            if units and rec["units"] and exp.extract.tokenizer.dedup and units[-1] == rec["units"][0]:
                runs[-1] += rec["durations"][0]  # one run across the segment cut
                units += rec["units"][1:]
                runs += rec["durations"][1:]
            else:
                units += rec["units"]
                runs += rec["durations"]
        return {"units": joined, "durations": durations,
                "errors": [{"path": e["path"], "error": e["error"]} for e in bad]}

    _, cached = cached_json(exp, "eval_units", payload, "units.json", tokenise)
    return cached["units"], cached["durations"], cached["errors"]


def export_preference_units(exp: Experiment, path: str | Path) -> int:
    """Tokenise this experiment's spoken preference triples with its `extract` tokenizer and write slamkit's
    preference JSONL with units (what slamkit's preference_alignment_feature_extractor writes and
    `dpo.inputs` reads). Returns the number of triples written."""
    synth_out = upstream_dir(exp, "synth")
    prefs = synth_out.local("preferences.jsonl")
    if not prefs.is_file():
        raise SlamError(f"{synth_out.root} holds no preferences.jsonl: set synth.preferences.path and rerun synth")
    tokenizer = tokenizer_dir(exp)
    rows = list(read_jsonl(prefs))
    files = [{"id": f"{r['id']}-{p}", "path": r[f"{p}_path"], "text": r[f"{p}_text"], "speaker": r["voice"]}
             for r in rows for p in PARTS]
    init_ray(exp)
    encoded, _ = encode_files(exp, files, tokenizer, exp.extract.num_actors, exp.extract.batch_size)
    units = {e["id"]: {"units": e["units"], "duration": e["durations"]} for e in encoded}
    out = [{**r, **{p: units[f"{r['id']}-{p}"] for p in PARTS}} for r in rows
           if all(f"{r['id']}-{p}" in units for p in PARTS)]
    write_jsonl(path, out)
    return len(out)

