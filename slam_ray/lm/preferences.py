"""Preference triples (prompt, chosen, rejected) for the DPO stage.

Two sources: text triples from the built-in grammar (for the offline quickstart, to be read aloud like the
corpus) and unit triples from slamkit's preference JSONL (SpokenSwag and the like, tokenised by slamkit).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from slam_ray.errors import SlamError
from slam_ray.evals import grammar
from slam_ray.speech.units import read_jsonl, repr_to_units, units_to_tokens

SPLITS = ("train", "held_out")
# A change of the triple generator bumps PREFERENCES_VERSION in slam_ray/core/stage_io.py (part of the dpo key).


@dataclass(frozen=True)
class TextPreference:
    """`prompt` + " " + `chosen` is a grammatical sentence; `prompt` + " " + `rejected` is its corruption."""

    id: str
    task: str
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class UnitPreference:
    """Unit vocabulary ids (unit + UNIT_OFFSET), no BOS/EOS: what `dpo_loss.build_preference_batch` takes."""

    id: str
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def _corrupt(task: str, words: list[str], verb_index: int,
             rng: random.Random) -> tuple[list[str], int] | None:
    """The corrupted words and the first changed index (>= 1, so a prompt of at least one word precedes it);
    the same three corruptions as `grammar.make_minimal_pairs`, or None when this sentence cannot take it."""
    changed = list(words)
    if task == "lexical":
        positions = [i for i in grammar._content_positions(words) if i >= 1]
        if not positions:
            return None
        i = rng.choice(positions)
        changed[i] = grammar.make_nonword(rng, like=words[i])
    elif task == "word_order":
        if len(words) < 3:
            return None
        i = rng.randrange(1, len(words) - 1)
        if words[i] == words[i + 1]:
            return None
        changed[i], changed[i + 1] = words[i + 1], words[i]
    else:
        i = verb_index
        flipped = grammar._flip_number(words[i])
        if flipped is None or i < 1:
            return None
        changed[i] = flipped
    return changed, i


def grammar_preference_triples(n: int, seed: int, held_out_percent: int, split: str = "train",
                               tasks: Sequence[str] = grammar.TASKS) -> list[TextPreference]:
    """`n` distinct text triples from sentences on one side of the grammar's held-out split, tasks in turn.

    Prompt = the first words of a sentence, chosen = its grammatical rest, rejected = the rest corrupted as
    the task says (the corruption always lies after the prompt). With `split="train"` no sentence that the
    evaluation pairs are built from is used, and no corrupted sentence falls on the held-out side either.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    unknown = [t for t in tasks if t not in grammar.TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown preference tasks {unknown or list(tasks)}; "
                         f"choose from {', '.join(grammar.TASKS)}")
    held_out = split == "held_out"
    # a seed stream of its own, so triples do not replay the corpus or the evaluation pairs in order
    rng = random.Random(f"preferences:{split}:{seed}")
    out: list[TextPreference] = []
    seen: set[tuple[str, str, str]] = set()
    misses = 0
    while len(out) < n:
        task = tasks[len(out) % len(tasks)]
        words, verb_index = grammar._sentence_words(rng)
        corrupted = _corrupt(task, words, verb_index, rng)
        ok = corrupted is not None and grammar.is_held_out(" ".join(words), held_out_percent) == held_out
        if ok and not held_out:
            ok = not grammar.is_held_out(" ".join(corrupted[0]), held_out_percent)
        if ok:
            changed, first = corrupted
            cut = rng.randint(1, first)
            key = (" ".join(words[:cut]), " ".join(words[cut:]), " ".join(changed[cut:]))
            ok = key not in seen
        if not ok:
            misses += 1
            if misses > 100_000:  # the grammar is nearly exhausted on this side of the split
                raise ValueError(f"the built-in grammar cannot produce {n} distinct preference triples; "
                                 "ask for fewer")
            continue
        misses = 0
        seen.add(key)
        out.append(TextPreference(f"pref-{task}-{len(out):05d}", task, *key))
    return out


def _units_of(value, where: str) -> list[int]:
    # slamkit's extractor writes {"units", "duration"}; its tokeniser also takes an audio_repr string
    if isinstance(value, dict) and "units" in value:
        return [int(u) for u in value["units"]]
    if isinstance(value, dict) and "audio_repr" in value:
        return repr_to_units(value["audio_repr"])
    if isinstance(value, str):
        return repr_to_units(value)
    raise SlamError(f"{where}: expected {{'units': [...], 'duration': [...]}} or an audio_repr string")


def read_slamkit_preferences(path: str | Path) -> list[UnitPreference]:
    """Triples of a slamkit preference JSONL (the output of its preference_alignment_feature_extractor:
    `prompt`/`chosen`/`rejected` each `{"units", "duration"}`), as unit vocabulary ids."""
    out = []
    for i, row in enumerate(read_jsonl(path)):
        parts = {}
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                raise SlamError(f"{path}:{i + 1}: no {key!r} field; a slamkit preference JSONL needs prompt, "
                                "chosen and rejected units (run slamkit's "
                                "preference_alignment_feature_extractor first)")
            units = _units_of(row[key], f"{path}:{i + 1}: {key}")
            if any(u < 0 for u in units):
                raise SlamError(f"{path}:{i + 1}: {key} holds negative units")
            parts[key] = units_to_tokens(units, add_bos=False, add_eos=False).tolist()
        out.append(UnitPreference(id=str(row.get("id") or f"{Path(path).stem}-{i:07d}"), **parts))
    return out
