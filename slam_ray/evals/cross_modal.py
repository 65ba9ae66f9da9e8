"""Cross-modal evaluation of interleaved models (SpiritLM's and SIMS's cross-modal StoryCloze, at grammar scale):
a context in one modality, two continuations in another, the model should prefer the grammatical one.

The items are the built-in grammar's held-out preference triples (`slam_ray/lm/preferences.py`: prompt = a
sentence's first words, chosen = its rest, rejected = the rest corrupted by a lexical, word-order or agreement
error). Each part is given as text (the text LM's tokens) or as speech (its units, spoken by the synth voice).
A sequence is `BOS <ctx marker> context [<cont marker>] continuation EOS` in the merged vocabulary — the
continuation's marker only at a switch of modality, as in interleaved training — and its score is the NLL of the
continuation's tokens and EOS given the context (the marker is the same for both continuations, so not scored).
No Ray here: the eval stage speaks the parts and scores the sequences.

The cross-modal StoryCloze (`cm_sc_*` tasks) reads a folder of stories instead: `<n>_mutual` (the first four
sentences), `<n>_correct` and `<n>_incorrect` (the endings), each as `.txt` and/or `.wav`/`.flac`. Scored as slamkit
scores it: the NLL of the whole sequence after BOS (context, markers and ending; a mean per token under the default
`eval.convention`); for speech to speech the context's and the ending's audio are joined first and tokenised as one
file.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from slam_ray.errors import SlamError
from slam_ray.lm.preferences import TextPreference
from slam_ray.lm.vocabulary import MergedVocabulary

MODALITIES = ("text", "speech")
PARTS = ("prompt", "chosen", "rejected")


def _ids(modality: str, text: str, units: list[int], tokenizer: Any, vocab: MergedVocabulary, space: bool) -> list[int]:
    if modality == "speech":
        return vocab.unit_ids(units).tolist()
    return list(tokenizer.encode((" " if space else "") + text, add_special_tokens=False))


def cross_modal_sequence(context: str, continuation: str, prompt: tuple[str, list[int]], rest: tuple[str, list[int]],
                         tokenizer: Any, vocab: MergedVocabulary) -> tuple[list[int], int]:
    """(token ids, index of the first scored token) of a prompt in modality `context` continued by `rest` in
    modality `continuation`; each part given as (text, units)."""
    marker = {"text": vocab.text_marker, "speech": vocab.speech_marker}
    head = [vocab.bos_id, marker[context], *_ids(context, *prompt, tokenizer, vocab, space=False)]
    switch = [marker[continuation]] if continuation != context else []
    # text after the prompt continues the sentence: a leading space (as a text span after another in training)
    body = _ids(continuation, *rest, tokenizer, vocab, space=True)
    tokens = head + switch + body + [vocab.eos_id]
    return tokens, len(head) + len(switch)


def cross_modal_comparisons(triples: list[TextPreference], units: dict[str, list[int]], context: str,
                            continuation: str, tokenizer: Any, vocab: MergedVocabulary
                            ) -> tuple[pd.DataFrame, dict[str, tuple[list[int], int]]]:
    """(comparisons: item, positive, negatives, texts and the grammar `kind`; sequences by key). `units` holds
    `<triple id>-<part>` for the triples whose parts were spoken (the others are dropped when speech is needed)."""
    if context not in MODALITIES or continuation not in MODALITIES:
        raise ValueError(f"context and continuation are each one of {MODALITIES}")
    direction = f"{context[0]}2{continuation[0]}"
    needs_units = "speech" in (context, continuation)
    rows, sequences = [], {}
    for t in triples:
        if needs_units and not all(f"{t.id}-{p}" in units for p in PARTS):
            continue
        part = {p: (getattr(t, p), units.get(f"{t.id}-{p}", [])) for p in PARTS}
        keys = {side: f"{direction}:{t.id}:{side}" for side in ("chosen", "rejected")}
        for side, key in keys.items():
            sequences[key] = cross_modal_sequence(context, continuation, part["prompt"], part[side], tokenizer, vocab)
        rows.append({"item": t.id, "positive": keys["chosen"], "negatives": [keys["rejected"]], "kind": t.task,
                     "positive_text": f"{t.prompt} | {t.chosen}", "negative_text": f"{t.prompt} | {t.rejected}"})
    return pd.DataFrame(rows), sequences


# --- the cross-modal StoryCloze folder --------------------------------------------------------------------------

STORY_PARTS = ("mutual", "correct", "incorrect")
_SUFFIX_MODALITY = {".txt": "text", ".wav": "speech", ".flac": "speech"}


def read_story_parts(path: Path, context: str, continuation: str) -> tuple[dict[str, dict[str, Path]], list[str]]:
    """({story: {part: file}} with `mutual` in the context's modality and both endings in the continuation's,
    [stories that lack one of those files]). Stories in number order."""
    if not path.is_dir():
        raise SlamError(f"cross-modal StoryCloze: folder {path} does not exist; point the task's `path` at a folder "
                        "of <n>_mutual, <n>_correct and <n>_incorrect files (.txt and/or .wav)")
    found: dict[str, dict[tuple[str, str], Path]] = {}
    for file in sorted(path.iterdir()):
        match = re.fullmatch(r"(\d+)_(mutual|correct|incorrect)", file.stem)
        if match and file.suffix.lower() in _SUFFIX_MODALITY:
            found.setdefault(match[1], {})[(match[2], _SUFFIX_MODALITY[file.suffix.lower()])] = file
    if not found:
        raise SlamError(f"cross-modal StoryCloze: no <n>_mutual / <n>_correct / <n>_incorrect .txt or .wav files in {path}")
    need = {"mutual": context, "correct": continuation, "incorrect": continuation}
    stories, incomplete = {}, []
    for story in sorted(found, key=int):
        parts = {part: found[story].get((part, modality)) for part, modality in need.items()}
        if None in parts.values():
            incomplete.append(story)
        else:
            stories[story] = parts
    if not stories:
        wanted = ", ".join(f"<n>_{part}.{'txt' if m == 'text' else 'wav/.flac'}" for part, m in need.items())
        raise SlamError(f"cross-modal StoryCloze ({context} -> {continuation}): no story in {path} has {wanted}")
    return stories, incomplete


JOIN_VERSION = 1  # how join_story_audio joins: part of its cache's name


def join_story_audio(stories: dict[str, dict[str, Path]], cache: Path) -> tuple[dict[str, Path], list[dict]]:
    """Speech to speech: each story's context audio joined with each ending's, as one file per ending under
    `cache` (float WAV: the decoded samples exactly; made once per set of files). ({`<story>/<ending>`: file},
    errors: a story whose audio cannot be decoded is left out, with a line saying why)."""
    import os

    from slam_ray.speech.audio import AudioError, decode_audio, write_float_wav

    files = sorted(str(p) for parts in stories.values() for p in parts.values())
    digest = hashlib.sha1("\n".join([f"join{JOIN_VERSION}"] + [
        f"{f}:{Path(f).stat().st_size}:{Path(f).stat().st_mtime_ns}" for f in files]).encode()).hexdigest()[:12]
    folder = cache / digest
    joined, errors = {}, []
    for story, parts in stories.items():
        context = None
        try:
            for ending in ("correct", "incorrect"):
                target = folder / f"{story}_{ending}.wav"
                if not target.is_file():
                    context = decode_audio(parts["mutual"]) if context is None else context
                    tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp.wav")  # concurrent evals
                    write_float_wav(tmp, np.concatenate([context, decode_audio(parts[ending])]))
                    tmp.replace(target)
                joined[f"{story}/{ending}"] = target
        except AudioError as e:
            joined.pop(f"{story}/correct", None)
            errors.append({"path": str(parts["mutual"].parent / f"{story}_*"), "error": f"story {story}: {e}"})
    return joined, errors


def storycloze_comparisons(stories: dict[str, dict[str, Path]], context: str, continuation: str,
                           units: dict[str, list[int]], tokenizer: Any, vocab: MergedVocabulary, name: str
                           ) -> tuple[pd.DataFrame, dict[str, tuple[list[int], int]]]:
    """(comparisons, sequences by key) of the stories whose speech was tokenised. `units` by `<story>/<part>` (for
    speech to speech `<story>/<ending>`: the joined audio's units). Every sequence is scored from index 1. `name`
    (the task's name in results) prefixes the keys: two tasks on two folders never share one."""
    rows, sequences = [], {}
    for story, parts in stories.items():
        text = {part: f.read_text().strip() for part, f in parts.items() if f.suffix.lower() == ".txt"}
        keys = {ending: f"{name}:{story}:{ending}" for ending in ("correct", "incorrect")}
        if context == continuation == "speech":
            if not all(f"{story}/{e}" in units for e in keys):
                continue
            for ending, key in keys.items():
                sequences[key] = ([vocab.bos_id, vocab.speech_marker, *vocab.unit_ids(units[f"{story}/{ending}"]).tolist(),
                                   vocab.eos_id], 1)
        else:
            if any(f.suffix.lower() != ".txt" and f"{story}/{part}" not in units for part, f in parts.items()):
                continue
            part = {p: (text.get(p, ""), units.get(f"{story}/{p}", [])) for p in STORY_PARTS}
            for ending, key in keys.items():
                tokens, _ = cross_modal_sequence(context, continuation, part["mutual"], part[ending], tokenizer, vocab)
                sequences[key] = (tokens, 1)
        rows.append({"item": story, "positive": keys["correct"], "negatives": [keys["incorrect"]],
                     "positive_text": text.get("correct", parts["correct"].name),
                     "negative_text": text.get("incorrect", parts["incorrect"].name)})
    return pd.DataFrame(rows), sequences
