"""The token vocabulary an experiment trains on: the one object pack, train (and later dpo, eval, generation) take
their ids from.

- `SpeechVocabulary` (speech-only, slamkit's): `<pad>` 0, `<s>` 1 as BOS and EOS, unit u -> u + 2. Today's ids,
  unchanged (`slam_ray/speech/units.py` holds them).
- `MergedVocabulary` (text–speech interleaving): the text LM's tokenizer (its length with added special tokens:
  151,665 for Qwen2.5), then the units, `<text>`, `<speech>` and a `<pad>`; BOS and EOS are the tokenizer's. The
  pad is a row of its own, one more than slamkit's two markers: a text tokenizer's pad is often its EOS (Qwen2.5's
  is `<|endoftext|>`), and the loss drops pad targets, so a shared id would drop every EOS target too.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from slam_ray.errors import SlamError
from slam_ray.speech.units import BOS_ID, EOS_ID, PAD_ID, UNIT_OFFSET, units_to_tokens


@dataclass(frozen=True)
class SpeechVocabulary:
    n_units: int
    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    unit_offset: int = UNIT_OFFSET

    @property
    def size(self) -> int:
        return self.n_units + UNIT_OFFSET

    @property
    def dtype(self) -> type:
        return np.uint16


@dataclass(frozen=True)
class MergedVocabulary:
    """Unit u is `text_size + u`; `<text>`, `<speech>` and `<pad>` follow the units, so no unit, marker or pad id is
    a text token's."""

    text_size: int
    n_units: int
    bos_id: int | None = None  # the tokenizer's; None only where no sequence is built (tests of the layout)
    eos_id: int | None = None

    @property
    def unit_offset(self) -> int:
        return self.text_size

    @property
    def text_marker(self) -> int:
        return self.text_size + self.n_units

    @property
    def speech_marker(self) -> int:
        return self.text_size + self.n_units + 1

    @property
    def pad_id(self) -> int:
        return self.text_size + self.n_units + 2

    @property
    def size(self) -> int:
        return self.text_size + self.n_units + 3

    @property
    def dtype(self) -> type:
        return np.uint16 if self.size <= 1 << 16 else np.uint32

    def unit_ids(self, units: Sequence[int] | np.ndarray) -> np.ndarray:
        u = np.asarray(units, dtype=np.int64)
        if u.size and (u.min() < 0 or u.max() >= self.n_units):
            raise ValueError(f"units must be in [0, {self.n_units}); got {int(u.min())}..{int(u.max())}")
        return u + self.unit_offset

    def index_entry(self) -> dict[str, Any]:
        """What a pack output's index.json says of it (read back by `vocabulary_of_pack`)."""
        return {"kind": "merged", "size": self.size, "pad_id": self.pad_id, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "text_size": self.text_size, "n_units": self.n_units,
                "text_marker": self.text_marker, "speech_marker": self.speech_marker,
                "dtype": np.dtype(self.dtype).name}

    @classmethod
    def of(cls, tokenizer: Any, n_units: int) -> MergedVocabulary:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise SlamError("the text tokenizer has no EOS token; interleaving ends every utterance with it")
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos  # Qwen2.5 has no BOS: EOS opens too
        return cls(text_size=len(tokenizer), n_units=n_units, bos_id=int(bos), eos_id=int(eos))


Vocabulary = SpeechVocabulary | MergedVocabulary


GRAMMAR_TOKENIZER = "@grammar"
GRAMMAR_TOKENIZER_SIZE = 512


def grammar_tokenizer() -> Any:
    """A byte-level BPE tokenizer of GRAMMAR_TOKENIZER_SIZE tokens trained here on the built-in grammar's training
    sentences (offline, under a second, the same every time): what `pack.interleave.tokenizer: "@grammar"` uses
    where no text LM is at hand (the quickstart). `<|endoftext|>` is its EOS and opens an utterance too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slam_ray.evals import grammar

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # the corpus as running text: words after the first carry their leading space, as they do in an utterance
    tokenizer.train_from_iterator(grammar.generate_sentences(5000, 0, 10), trainers.BpeTrainer(
        vocab_size=GRAMMAR_TOKENIZER_SIZE, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


@functools.lru_cache(maxsize=4)
def load_text_tokenizer(source: str) -> Any:
    """The text LM's tokenizer (HF id in the local cache, or a folder; a bucket folder is fetched), or the
    grammar's own (`@grammar`)."""
    from transformers import AutoTokenizer

    if source == GRAMMAR_TOKENIZER:
        return grammar_tokenizer()

    from slam_ray.core.storage import model_source

    try:
        return AutoTokenizer.from_pretrained(model_source(source))
    except (OSError, ValueError) as e:
        raise SlamError(f"cannot load the text tokenizer {source!r} for interleaving (HF id in the local cache, or a "
                        f"folder with tokenizer files): {e}. Set pack.interleave.tokenizer") from e


def tokenizer_source(exp: Any) -> str:
    source = exp.pack.interleave.tokenizer or exp.train.model.base
    if not source:
        raise SlamError("pack.interleave needs a text tokenizer: set pack.interleave.tokenizer (a folder, an HF id, "
                        "or '@grammar' for one trained on the built-in grammar), or train.model.base (the TWIST "
                        "text LM, whose tokenizer it then uses)")
    return source


def vocabulary_of(exp: Any) -> Vocabulary:
    """The experiment's vocabulary: merged when `pack.interleave` is set, speech-only otherwise."""
    n_units = exp.extract.tokenizer.n_units
    if exp.pack.interleave is None:
        return SpeechVocabulary(n_units)
    return MergedVocabulary.of(load_text_tokenizer(tokenizer_source(exp)), n_units)


def vocabulary_of_pack(index_vocabulary: dict[str, Any], n_units: int) -> Vocabulary:
    """The vocabulary a pack output's windows are in, from its index (no tokenizer needed: a training worker
    on another node reads it from there)."""
    if not index_vocabulary:
        return SpeechVocabulary(n_units)
    if index_vocabulary.get("kind") != "merged":
        raise SlamError(f"unknown vocabulary kind {index_vocabulary.get('kind')!r} in a pack index")
    return MergedVocabulary(text_size=int(index_vocabulary["text_size"]), n_units=int(index_vocabulary["n_units"]),
                            bos_id=int(index_vocabulary["bos_id"]), eos_id=int(index_vocabulary["eos_id"]))


def speech_sequence(vocab: Vocabulary, units: Sequence[int]) -> tuple[list[int], int]:
    """A spoken utterance as the model reads it, with the index of its first scored token: speech-only
    `<s> u+2 ... <s>` scored after BOS; merged `BOS <speech> units EOS` scored after the marker (the marker
    every speech span opens with in interleaved training; it is the same for every utterance, so not scored)."""
    if isinstance(vocab, SpeechVocabulary):
        return units_to_tokens(units).tolist(), 1
    return [vocab.bos_id, vocab.speech_marker, *vocab.unit_ids(units).tolist(), vocab.eos_id], 2
