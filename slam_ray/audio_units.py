"""Speech units of arbitrary audio files (an evaluation dataset, generation prompts) with the experiment's
tokenizer, encoded in one Ray Data pass and cached under WORKDIR/eval_units/ per file list and tokenizer."""

from __future__ import annotations

from slam_ray.benchmarks import READERS_VERSION
from slam_ray.config import Experiment
from slam_ray.fingerprint import stat_digest
from slam_ray.runner import cached_json, init_ray
from slam_ray.stage_io import StageDir, stage_key, upstream_dir
from slam_ray.tokenizer import encode_files


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
