"""A small built-in English grammar: the offline text corpus and the held-out spoken minimal pairs.

The quickstart needs speech that a tiny model can learn in minutes and benchmarks shaped like the real ones
(sWUGGY, sBLIMP). Sentences come from a seeded generator; a fixed hash of the sentence decides whether it is
held out, so evaluation sentences are never read aloud for training, whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

# A change of a generator bumps SENTENCES_VERSION / PAIRS_VERSION in slam_ray/core/stage_io.py: they are part of
# the synth / eval stage keys, so old outputs are not reused.

SINGULAR_DETERMINERS = ["the", "a", "this", "that", "every"]
PLURAL_DETERMINERS = ["the", "some", "these", "those", "many"]
ADJECTIVES = ["big", "small", "red", "old", "happy", "quiet", "green", "young", "tall", "brown", "lazy", "clever"]
# (singular, plural)
NOUNS = [
    ("dog", "dogs"), ("cat", "cats"), ("bird", "birds"), ("girl", "girls"), ("boy", "boys"),
    ("farmer", "farmers"), ("teacher", "teachers"), ("horse", "horses"), ("child", "children"),
    ("friend", "friends"), ("baker", "bakers"), ("rabbit", "rabbits"), ("man", "men"), ("woman", "women"),
]
INTRANSITIVE_VERBS = [
    ("sleeps", "sleep"), ("runs", "run"), ("sings", "sing"), ("jumps", "jump"), ("laughs", "laugh"),
    ("waits", "wait"), ("smiles", "smile"), ("dances", "dance"), ("swims", "swim"), ("walks", "walk"),
]
TRANSITIVE_VERBS = [
    ("sees", "see"), ("likes", "like"), ("finds", "find"), ("follows", "follow"), ("helps", "help"),
    ("watches", "watch"), ("calls", "call"), ("visits", "visit"), ("feeds", "feed"), ("loves", "love"),
]
# Auxiliaries give agreement items whose cue is more than one /s/ (sBLIMP has such items too).
COPULAS = [("is", "are"), ("was", "were")]
HAVE = [("has", "have")]
PARTICIPLES = ["sleeping", "running", "singing", "jumping", "laughing", "waiting", "smiling", "dancing",
               "swimming", "walking"]
ADVERBS = ["quickly", "slowly", "loudly", "quietly", "today", "again", "often", "happily", "outside", "at night"]

TASKS = ("lexical", "word_order", "agreement")


@dataclass(frozen=True)
class MinimalPair:
    """One spoken minimal pair: the model should give `positive` the higher likelihood."""

    id: str
    task: str
    positive: str
    negative: str


def is_held_out(sentence: str, held_out_percent: int) -> bool:
    """Stable split by a hash of the text: the same sentence is always on the same side."""
    digest = hashlib.sha1(sentence.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < held_out_percent


def _noun_phrase(rng: random.Random, plural: bool) -> list[str]:
    det = rng.choice(PLURAL_DETERMINERS if plural else SINGULAR_DETERMINERS)
    noun = rng.choice(NOUNS)[1 if plural else 0]
    if rng.random() < 0.5:
        return [det, rng.choice(ADJECTIVES), noun]
    return [det, noun]


def _sentence_words(rng: random.Random) -> tuple[list[str], int]:
    """Return the words of one sentence and the index of its (agreeing) verb."""
    plural = rng.random() < 0.5
    subject = _noun_phrase(rng, plural)
    kind = rng.random()
    number = 1 if plural else 0
    if kind < 0.3:
        verb = rng.choice(INTRANSITIVE_VERBS)[number]
        rest: list[str] = []
    elif kind < 0.6:
        verb = rng.choice(TRANSITIVE_VERBS)[number]
        rest = _noun_phrase(rng, rng.random() < 0.5)
    elif kind < 0.75:
        verb = rng.choice(COPULAS)[number]
        rest = [rng.choice(ADJECTIVES)]
    elif kind < 0.9:
        verb = rng.choice(COPULAS)[number]
        rest = [rng.choice(PARTICIPLES)]
    else:
        verb = HAVE[0][number]
        rest = _noun_phrase(rng, rng.random() < 0.5)
    if rng.random() < 0.4:
        rest = rest + [rng.choice(ADVERBS)]
    return subject + [verb] + rest, len(subject)


def generate_sentences(n: int, seed: int, held_out_percent: int, held_out: bool = False) -> list[str]:
    """`n` distinct sentences from the training side (or, with `held_out=True`, the evaluation side)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    misses = 0
    while len(out) < n:
        sentence = " ".join(_sentence_words(rng)[0])
        if sentence in seen or is_held_out(sentence, held_out_percent) != held_out:
            misses += 1
            if misses > 100_000:  # the grammar is nearly exhausted
                raise ValueError(f"the built-in grammar cannot produce {n} distinct sentences; ask for fewer")
            continue
        misses = 0
        seen.add(sentence)
        out.append(sentence)
    return out


def _known_words() -> set[str]:
    words = set(SINGULAR_DETERMINERS + PLURAL_DETERMINERS + ADJECTIVES + PARTICIPLES)
    for pairs in (NOUNS, INTRANSITIVE_VERBS, TRANSITIVE_VERBS, COPULAS, HAVE):
        for singular, plural in pairs:
            words.update((singular, plural))
    for adverb in ADVERBS:
        words.update(adverb.split())
    return words


def make_nonword(rng: random.Random, like: str = "") -> str:
    """A pronounceable English-like non-word, never a word of the grammar: CVC, or CVCVC when the word it
    replaces (`like`) is long, so non-words match real words roughly in length, as sWUGGY's do."""
    onsets = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "bl", "pr", "st", "gr", "fl"]
    vowels = ["a", "e", "i", "o", "u", "oo", "ee", "ai"]
    codas = ["b", "d", "g", "k", "m", "n", "p", "t", "sh", "nk", "rp", "st"]
    known = _known_words()
    while True:
        word = rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
        if len(like) > 5:
            word += rng.choice(vowels) + rng.choice(codas)
        if word not in known:
            return word


def _content_positions(words: list[str]) -> list[int]:
    function_words = set(SINGULAR_DETERMINERS + PLURAL_DETERMINERS + [w for pair in COPULAS + HAVE for w in pair])
    return [i for i, w in enumerate(words) if w not in function_words]


def _flip_number(word: str) -> str | None:
    for pairs in (INTRANSITIVE_VERBS, TRANSITIVE_VERBS, COPULAS, HAVE):
        for singular, plural in pairs:
            if word == singular:
                return plural
            if word == plural:
                return singular
    return None


def make_minimal_pairs(task: str, n: int, seed: int, held_out_percent: int) -> list[MinimalPair]:
    """`n` minimal pairs for one task, built from held-out sentences only."""
    if task not in TASKS:
        raise ValueError(f"unknown minimal-pair task {task!r}; choose from {', '.join(TASKS)}")
    rng = random.Random(f"{task}:{seed}")
    pairs: list[MinimalPair] = []
    seen: set[str] = set()
    while len(pairs) < n:
        words, verb_index = _sentence_words(rng)
        sentence = " ".join(words)
        if sentence in seen or not is_held_out(sentence, held_out_percent):
            continue
        seen.add(sentence)
        changed = list(words)
        if task == "lexical":
            i = rng.choice(_content_positions(words))
            changed[i] = make_nonword(rng, like=words[i])
        elif task == "word_order":
            i = rng.randrange(len(words) - 1)
            if words[i] == words[i + 1]:
                continue
            changed[i], changed[i + 1] = words[i + 1], words[i]
        else:
            flipped = _flip_number(words[verb_index])
            assert flipped is not None
            changed[verb_index] = flipped
        pairs.append(MinimalPair(f"{task}-{len(pairs):05d}", task, sentence, " ".join(changed)))
    return pairs
