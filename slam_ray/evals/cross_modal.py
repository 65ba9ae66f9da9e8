"""Cross-modal evaluation of interleaved models (SpiritLM's and SIMS's cross-modal StoryCloze, at grammar scale):
a context in one modality, two continuations in another, the model should prefer the grammatical one.

The items are the built-in grammar's held-out preference triples (`slam_ray/lm/preferences.py`: prompt = a
sentence's first words, chosen = its rest, rejected = the rest corrupted by a lexical, word-order or agreement
error). Each part is given as text (the text LM's tokens) or as speech (its units, spoken by the synth voice).
A sequence is `BOS <ctx marker> context [<cont marker>] continuation EOS` in the merged vocabulary — the
continuation's marker only at a switch of modality, as in interleaved training — and its score is the NLL of the
continuation's tokens and EOS given the context (the marker is the same for both continuations, so not scored).
No Ray here: the eval stage speaks the parts and scores the sequences.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

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
