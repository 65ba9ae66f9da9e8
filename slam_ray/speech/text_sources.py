"""Text corpora for `synth`: where utterance texts come from and how they are cut.

Sources (`synth.corpus.source`): `grammar` (the built-in generator, the offline default), `text` (a plain file,
one item per line or per blank-line-separated paragraph), `jsonl` / `parquet` (a `text_field` column), `hf`
(a local folder written by `datasets`' `save_to_disk`, a Dataset or a DatasetDict with `hf_split`). Items are
cut into utterances (`split: sentence` = one per sentence; `max_chars` caps an utterance, packing whole
sentences, and words where one sentence alone is longer), whitespace is normalised, identical texts are kept
once (`dedup`), and at most `n_sentences` utterances are read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from slam_ray.config import CorpusConfig
from slam_ray.errors import SlamError
from slam_ray.evals import grammar

# A sentence ends at . ! ? (and closing quotes/brackets) followed by whitespace; abbreviations such as
# "Mr." split too, which costs a short pause in the speech, not a wrong word.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’)\]]))\s+")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _split_words(text: str, max_chars: int) -> list[str]:
    out, current = [], ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > max_chars:
            out.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    return out + ([current] if current else [])


def cut(text: str, per_sentence: bool, max_chars: int | None) -> list[str]:
    """One item -> utterances: its sentences (per_sentence), or itself; an utterance over `max_chars` becomes
    packs of whole sentences, and a single sentence over it is cut between words."""
    text = " ".join(text.split())
    if not text:
        return []
    if not per_sentence and (max_chars is None or len(text) <= max_chars):
        return [text]
    sentences = split_sentences(text)
    if max_chars is None:
        return sentences
    out: list[str] = []
    current = ""
    for sentence in sentences:
        pieces = _split_words(sentence, max_chars) if len(sentence) > max_chars else [sentence]
        for piece in pieces:
            if current and (per_sentence or len(current) + 1 + len(piece) > max_chars):
                out.append(current)
                current = ""
            current = f"{current} {piece}" if current else piece
    return out + ([current] if current else [])


def _plain_items(path: Path, unit: str) -> Iterator[str]:
    text = path.read_text(encoding="utf-8")
    if unit == "line":
        yield from text.splitlines()
    else:
        yield from re.split(r"\n\s*\n", text)


def _column(values: Iterable, path: Path, field: str) -> Iterator[str]:
    for value in values:
        if value is not None and not isinstance(value, str):
            raise SlamError(f"{path}: column {field!r} holds {type(value).__name__}, not text "
                            "(set synth.corpus.text_field to a text column)")
        yield value or ""


def _table_items(cfg: CorpusConfig, path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    if cfg.source == "parquet":
        schema = pq.read_schema(path)
        if cfg.text_field not in schema.names:
            raise SlamError(f"{path} has no column {cfg.text_field!r} (columns: {', '.join(schema.names)}); "
                            "set synth.corpus.text_field")
        for batch in pq.ParquetFile(path).iter_batches(columns=[cfg.text_field], batch_size=10_000):
            yield from _column(batch.column(0).to_pylist(), path, cfg.text_field)
        return
    from slam_ray.speech.units import read_jsonl

    for i, row in enumerate(read_jsonl(path)):
        if cfg.text_field not in row:
            raise SlamError(f"{path}:{i + 1}: no {cfg.text_field!r} field (fields: {', '.join(row)}); "
                            "set synth.corpus.text_field")
        yield from _column([row[cfg.text_field]], path, cfg.text_field)


def _hf_items(cfg: CorpusConfig, path: Path) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise SlamError(f"synth.corpus.path {str(path)!r} is not a folder written by datasets' save_to_disk ({e})") from e
    if isinstance(ds, datasets.DatasetDict):
        if cfg.hf_split not in ds:
            raise SlamError(f"{path} has splits {', '.join(ds)}, not {cfg.hf_split!r}; set synth.corpus.hf_split")
        ds = ds[cfg.hf_split]
    if cfg.text_field not in ds.column_names:
        raise SlamError(f"{path} has no column {cfg.text_field!r} (columns: {', '.join(ds.column_names)}); "
                        "set synth.corpus.text_field")
    for batch in ds.select_columns([cfg.text_field]).iter(batch_size=10_000):
        yield from _column(batch[cfg.text_field], path, cfg.text_field)


def raw_items(cfg: CorpusConfig) -> Iterator[str]:
    """The source's items, uncut (lazily: a large file is not read whole into utterances first)."""
    if cfg.source == "grammar":
        yield from grammar.generate_sentences(cfg.n_sentences, cfg.seed, cfg.held_out_percent)
        return
    path = Path(cfg.path or "")
    if cfg.source == "hf":
        if not path.is_dir():
            raise SlamError(f"synth.corpus.path {cfg.path!r} is not a folder; give one written by datasets' save_to_disk")
        yield from _hf_items(cfg, path)
        return
    if not path.is_file():
        raise SlamError(f"synth.corpus.path {cfg.path!r} is not a file; give a {cfg.source} file "
                        f"(synth.corpus.source: {cfg.source})")
    if cfg.source == "text":
        yield from _plain_items(path, cfg.unit)
    else:
        yield from _table_items(cfg, path)


def load_texts(cfg: CorpusConfig) -> tuple[list[str], dict[str, int]]:
    """Utterance texts in source order, and counts (items read, utterances cut, duplicates dropped)."""
    texts: list[str] = []
    seen: set[str] = set()
    counts = {"items": 0, "duplicates": 0, "too_short": 0}
    for item in raw_items(cfg):
        counts["items"] += 1
        for text in cut(item, cfg.split == "sentence", cfg.max_chars):
            if len(text) < cfg.min_chars:
                counts["too_short"] += 1
                continue
            if cfg.dedup:
                if text in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add(text)
            texts.append(text)
            if len(texts) >= cfg.n_sentences:
                return texts, counts
    return texts, counts
