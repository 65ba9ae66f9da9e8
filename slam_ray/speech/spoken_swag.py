"""SpokenSwag-style preference triples: SWAG/HellaSwag-shaped text rows -> spoken prompt/chosen/rejected.

From each JSONL row `{context, endings: [...], label}`: prompt = the context, chosen = the gold ending,
rejected = one wrong ending drawn with a seeded generator. As in SpokenSwag (slamkit's paper), rows whose chosen
text has a bigram Auto-BLEU above `max_auto_bleu` (0.3) are dropped, and each triple is read by one voice drawn
from several. `synth` speaks them; `preferences.jsonl` is slamkit's preference input (`prompt_path`,
`chosen_path`, `rejected_path` plus the texts), and `slam-ray export --format preferences` adds the units
(`prompt`/`chosen`/`rejected`: `{"units", "duration"}`; slam_ray/parallel/audio_units.py), the form `dpo.inputs`
reads.
"""

from __future__ import annotations

import random
from pathlib import Path

from slam_ray.config import Experiment, SwagConfig
from slam_ray.core.storage import join
from slam_ray.errors import SlamError
from slam_ray.lm import textmetrics
from slam_ray.speech.units import read_jsonl, write_jsonl

PARTS = ("prompt", "chosen", "rejected")


def auto_bleu(text: str, n: int = 2) -> float:
    """textmetrics' Auto-BLEU, 0 for a text shorter than n words (nothing repeats): the repetitiveness measure
    slamkit's SpokenSwag filter thresholds at 0.3."""
    return textmetrics.auto_bleu(text, n) or 0.0


def _row_fields(cfg: SwagConfig, row: dict, where: str) -> tuple[str, list[str], int]:
    missing = [f for f in (cfg.context_field, cfg.endings_field, cfg.label_field) if f not in row]
    if missing:
        raise SlamError(f"{where}: no field {missing[0]!r} (fields: {', '.join(row)}); set "
                        "synth.preferences.context_field / endings_field / label_field")
    endings, label = row[cfg.endings_field], row[cfg.label_field]
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise SlamError(f"{where}: {cfg.endings_field!r} must be a list of at least two texts")
    try:
        label = int(label)
    except (TypeError, ValueError):
        raise SlamError(f"{where}: {cfg.label_field!r} is {label!r}, not the index of the gold ending") from None
    if not 0 <= label < len(endings):
        raise SlamError(f"{where}: {cfg.label_field!r} {label} is outside the {len(endings)} endings")
    return str(row[cfg.context_field]), endings, label


def build_triples(cfg: SwagConfig, voices: list[str]) -> tuple[list[dict], dict[str, int]]:
    """Text triples (id, prompt, chosen, rejected, voice) and counts (rows, dropped by the Auto-BLEU filter)."""
    if not Path(cfg.path).is_file():
        raise SlamError(f"synth.preferences.path {cfg.path!r} is not a file; give JSONL rows "
                        "{context, endings, label}")
    rng = random.Random(f"spoken_swag:{cfg.seed}")
    triples, counts = [], {"rows": 0, "dropped_auto_bleu": 0}
    lines_of: dict[str, int] = {}  # a triple's id names its audio files and its synth shard: two rows, one id clash
    for i, row in enumerate(read_jsonl(cfg.path)):
        counts["rows"] += 1
        context, endings, label = _row_fields(cfg, row, f"{cfg.path}:{i + 1}")
        uid = str(row.get("id") or f"swag{i:07d}")
        if uid in lines_of:
            raise SlamError(f"{cfg.path}:{i + 1}: id {uid!r} is also the id of line {lines_of[uid]}; ids must be "
                            "unique (they name the spoken files), or leave `id` out to number the rows")
        lines_of[uid] = i + 1
        wrong = rng.choice([k for k in range(len(endings)) if k != label])  # drawn for every row: stable streams
        voice = rng.choice(voices)
        if auto_bleu(endings[label]) > cfg.max_auto_bleu:
            counts["dropped_auto_bleu"] += 1
            continue
        triples.append({"id": uid, "prompt": context.strip(),
                        "chosen": endings[label].strip(), "rejected": endings[wrong].strip(), "voice": voice})
        if cfg.n_pairs is not None and len(triples) >= cfg.n_pairs:
            break
    return triples, counts


def plan_items(exp: Experiment, triples: list[dict], audio_dir: str) -> list[dict]:
    """Three speech items per triple, one voice and one speed per triple (chosen and rejected differ only in
    their words), in shards of `synth.shard_size` items."""
    rng = random.Random(f"spoken_swag:speed:{exp.synth.preferences.seed}")
    low, high = exp.synth.speed
    items = []
    for t in triples:
        speed = round(rng.uniform(low, high), 2)
        for part in PARTS:
            k = len(items)
            uid = f"{t['id']}-{part}"
            items.append({"id": uid, "text": t[part], "voice": t["voice"], "speed": speed, "noise": 0.0,
                          "seed": k, "path": join(audio_dir, f"{k // exp.synth.shard_size:05d}", f"{uid}.flac")})
    return items


def write_preferences(path: Path, triples: list[dict], spoken: dict[str, dict]) -> int:
    """slamkit's preference JSONL (paths + texts) for every triple whose three parts were spoken."""
    rows = []
    for t in triples:
        parts = [spoken.get(f"{t['id']}-{p}") for p in PARTS]
        if all(parts):
            rows.append({"id": t["id"], **{f"{p}_path": r["path"] for p, r in zip(PARTS, parts, strict=True)},
                         **{f"{p}_text": t[p] for p in PARTS}, "voice": t["voice"]})
    write_jsonl(path, rows)
    return len(rows)
