"""Likelihood benchmarks as data: readers of the official layouts for the task definitions (YAML,
`slam_ray/evals/tasks/`; their schema and lookup: `slam_ray/config/tasks.py`).

A task definition names a reader, its arguments, how comparisons are aggregated (`aggregate_by`: the official
ZeroSpeech scoring averages the voices of an item first) and which columns break the accuracy down. A reader
turns a dataset folder into *comparisons*, one row each: `item` (what is averaged first), `positive` (the audio
the model should prefer), `negatives` (one audio for a pair, several for a group) and breakdown columns.
Scoring (slam_ray/lm/scoring.py) is shared by every task.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from slam_ray.config.tasks import TaskSpec
from slam_ray.errors import SlamError

# A change of a reader's output (or of the eval unit cache's format) bumps READERS_VERSION in
# slam_ray/core/stage_io.py: it is part of the eval stage key and of the eval unit cache key.
SALMON_SUBSETS = ("bg_alignment", "bg_all_consistency", "bg_domain_consistency", "gender_consistency",
                  "rir_consistency", "sentiment_alignment", "sentiment_consistency", "speaker_consistency")


# --- readers: (dataset path, options) -> comparisons DataFrame --------------------------------------------------


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise SlamError(f"{what}: folder {path} does not exist. Download the dataset and point the task's `path` at it")
    return path


def _wavs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".wav", ".flac"))


def frequency_band(frequency: float) -> str | None:
    """sWUGGY's band of the word's corpus frequency as the ZeroSpeech 2021 toolkit cuts it (`pandas.cut` at 0, 1,
    5, 20, 100, right-open), labels and all: 0 is `oov`, 1-4 `1-5`, 5-19 `6-20`, 20-99 `21-100`, 100 on `>100` (the
    labels are the toolkit's, not its intervals'). None without a frequency: the toolkit leaves such words out."""
    if pd.isna(frequency):
        return None
    edges = ((1, "oov"), (5, "1-5"), (20, "6-20"), (100, "21-100"))
    return next((label for edge, label in edges if frequency < edge), ">100")


def read_zerospeech(path: Path, part: str, split: str = "dev", **_: Any) -> pd.DataFrame:
    """ZeroSpeech 2021 `lexical` (sWUGGY) or `syntactic` (sBLIMP): `<path>/<part>/<split>/*.wav` and `gold.csv`
    (path may also be the `<part>/<split>` folder itself). Pairs the correct and incorrect file of the same `id`
    and `voice`, as the official toolkit does; sWUGGY items also get the word's frequency band."""
    folder = path / part / split if (path / part / split).is_dir() else path
    gold_path = _need_dir(folder, f"ZeroSpeech {part}/{split}") / "gold.csv"
    if not gold_path.is_file():
        raise SlamError(f"ZeroSpeech {part}/{split}: {gold_path} is missing (only the dev split's gold labels are public)")
    gold = pd.read_csv(gold_path)
    need = {"filename", "id", "voice", "correct"}
    if missing := need - set(gold.columns):
        raise SlamError(f"{gold_path} lacks columns {sorted(missing)}: is this a ZeroSpeech 2021 gold.csv?")
    gold["audio"] = [str(folder / f"{name}.wav") for name in gold["filename"]]
    pos, neg = gold[gold["correct"] == 1], gold[gold["correct"] == 0]
    extra = [c for c in ("type", "subtype", "frequency", "word", "length") if c in pos.columns]
    pairs = pos[["id", "voice", "audio", *extra]].merge(neg[["id", "voice", "audio"]], on=["id", "voice"],
                                                       suffixes=("_pos", "_neg"))
    out = pd.DataFrame({"item": pairs["id"].astype(str), "voice": pairs["voice"].astype(str),
                        "positive": pairs["audio_pos"], "negatives": [[a] for a in pairs["audio_neg"]]})
    for column in extra:
        out[column] = pairs[column].values
    if "frequency" in out:
        out["frequency_band"] = [frequency_band(f) for f in out["frequency"]]
    return out


def read_storycloze(path: Path, **_: Any) -> pd.DataFrame:
    """The SpokenStoryCloze release (sSC or tSC): one flat folder of `<n>_<tag>.wav`, two files per story `n`.
    The positive is the file whose tag says `correct` (not `incorrect`); otherwise the first in name order,
    as slamkit reads it."""
    groups: dict[int, list[Path]] = {}
    for wav in _wavs(_need_dir(path, "StoryCloze")):
        head = wav.stem.split("_", 1)[0]
        if head.isdigit():
            groups.setdefault(int(head), []).append(wav)
    if not groups:
        raise SlamError(f"StoryCloze: no `<number>_<tag>.wav` files in {path}")
    rows = []
    for n, files in sorted(groups.items()):
        if len(files) != 2:
            raise SlamError(f"StoryCloze: story {n} has {len(files)} files in {path} (expected 2: correct, incorrect)")
        correct = [f for f in files if re.search(r"(?<!in)correct", f.stem.split("_", 1)[-1].lower())]
        positive = correct[0] if len(correct) == 1 else files[0]
        rows.append({"item": str(n), "positive": str(positive), "negatives": [str(f) for f in files if f != positive]})
    return pd.DataFrame(rows)


def read_salmon(path: Path, subsets: list[str] | None = None, **_: Any) -> pd.DataFrame:
    """SALMon's released folder: `<path>/<subset>/sample_<n>_<k>.wav`, `k = 0` the positive, others negatives;
    or its Hugging Face parquet: `<path>/<subset>/*.parquet` with `positive_audio` / `negative_audio`."""
    rows = []
    for subset in subsets or SALMON_SUBSETS:
        if subset not in SALMON_SUBSETS:
            raise SlamError(f"SALMon: unknown subset {subset!r}; choose from {', '.join(SALMON_SUBSETS)}")
        folder = _need_dir(path / subset, f"SALMon {subset}")
        if parquet := sorted(folder.glob("*.parquet")):
            rows += _salmon_parquet(subset, parquet)
            continue
        samples: dict[int, dict[int, Path]] = {}
        for wav in _wavs(folder):
            match = re.fullmatch(r"sample_(\d+)_(\d+)", wav.stem)
            if match:
                samples.setdefault(int(match[1]), {})[int(match[2])] = wav
        if not samples:
            raise SlamError(f"SALMon {subset}: no sample_<n>_<k>.wav files in {folder}")
        for n, files in sorted(samples.items()):
            if 0 not in files or len(files) < 2:
                raise SlamError(f"SALMon {subset}: sample {n} needs sample_{n}_0.wav (positive) and a negative")
            rows.append({"item": f"{subset}/{n}", "subset": subset, "positive": str(files[0]),
                         "negatives": [str(files[k]) for k in sorted(files) if k != 0]})
    return pd.DataFrame(rows)


def _salmon_parquet(subset: str, files: list[Path]) -> list[dict[str, Any]]:
    """SALMon as Hugging Face parquet (`<subset>/train-*.parquet`, audio columns `positive_audio` and
    `negative_audio` holding encoded bytes): the audio is written once to a cache folder so the encoding actors
    read files like any other task's."""
    import hashlib

    import pyarrow.parquet as pq

    rows = []
    for file in files:
        table = pq.read_table(file)
        if missing := {"positive_audio", "negative_audio"} - set(table.column_names):
            raise SlamError(f"SALMon {file}: no {sorted(missing)} columns (found {table.column_names}); "
                            "use the released folder layout or rename the audio columns")
        digest = hashlib.sha1(f"{file.resolve()}:{file.stat().st_size}:{file.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        cache = Path.home() / ".cache" / "slam_ray" / "salmon" / digest
        cache.mkdir(parents=True, exist_ok=True)
        for i, rec in enumerate(table.select(["positive_audio", "negative_audio"]).to_pylist()):
            paths = []
            for side in ("positive_audio", "negative_audio"):
                target = cache / f"{i:05d}_{side}.wav"
                if not target.is_file():
                    tmp = target.with_suffix(".tmp")
                    tmp.write_bytes(rec[side]["bytes"])
                    tmp.replace(target)
                paths.append(str(target))
            rows.append({"item": f"{subset}/{file.stem}/{i}", "subset": subset, "positive": paths[0],
                         "negatives": [paths[1]]})
    return rows


def read_manifest(path: Path, **_: Any) -> pd.DataFrame:
    """JSONL, one comparison per line: `{"id", "positive", "negative"}` or `{"id", "positive", "negatives": [...]}`,
    optional `subset`; relative paths are relative to the manifest."""
    if not path.is_file():
        raise SlamError(f"manifest {path} does not exist: write a JSONL file of {{\"id\", \"positive\", \"negative\"}}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            negatives = rec["negatives"] if "negatives" in rec else [rec["negative"]]
            positive = rec["positive"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SlamError(f"{path}:{n}: need a JSON object with positive and negative(s) ({e})") from None
        # a string would be read as a list of its characters, an empty list would leave nothing to compare with
        if not isinstance(positive, str) or not isinstance(negatives, list) or not negatives or \
                not all(isinstance(p, str) for p in negatives):
            raise SlamError(f"{path}:{n}: `positive` must be a path and `negatives` a non-empty list of paths "
                            f"(or give one `negative` path); got positive {positive!r}, negatives {negatives!r}")
        resolve = lambda p: str(p if Path(p).is_absolute() else path.parent / p)  # noqa: E731
        rows.append({"item": str(rec.get("id", n)), "subset": str(rec.get("subset", "all")),
                     "positive": resolve(positive), "negatives": [resolve(p) for p in negatives]})
    if not rows:
        raise SlamError(f"manifest {path} holds no comparisons")
    return pd.DataFrame(rows)


READERS: dict[str, Callable[..., pd.DataFrame]] = {
    "zerospeech": read_zerospeech, "storycloze": read_storycloze, "salmon": read_salmon, "manifest": read_manifest,
}


def read_comparisons(spec: TaskSpec, path: str, options: dict[str, Any], limit: int | None = None) -> pd.DataFrame:
    """The task's comparisons (at most `limit` items, the first in item order: a quick look at a big set)."""
    df = READERS[spec.reader](Path(path).expanduser(), **{**spec.reader_args, **options})
    if limit is not None:
        keep = list(dict.fromkeys(df["item"]))[:limit]
        df = df[df["item"].isin(set(keep))].reset_index(drop=True)
    return df
