"""Word alignments of an utterance: `[(word, start_s, end_s), ...]`, slamkit's `aligned_text`.

Where they come from: synth's index (espeak's and piper's word events), a column of an extract manifest, or a
JSON file beside an audio file. `parse_alignment` accepts the shapes those sources write — a list of
`[word, start, end]` triples (slamkit, slam_ray's synth), a list of `{"word", "start", "end"}` objects, an object
holding either under `words` / `aligned_text`, or openai-whisper's `--word_timestamps True` JSON (`segments[].words`)
— and says what is wrong with anything else. `segment_alignment` gives a segment of a long file (extract cuts
those in pauses) the words inside it, in the segment's own time. No Ray, no model.
"""

from __future__ import annotations

import json
import math
from typing import Any

Word = tuple[str, float, float]

# espeak's and whisper's times are rounded to the millisecond or the frame: a word may touch a cut by that much
EDGE_TOLERANCE_S = 0.02


def _word(item: Any, index: int) -> Word:
    if isinstance(item, dict):
        missing = {"word", "start", "end"} - set(item)
        if missing:
            raise ValueError(f"word {index} has no {', '.join(sorted(missing))} (an object needs word, start, end)")
        word, start, end = item["word"], item["start"], item["end"]
    elif isinstance(item, (list, tuple)) and len(item) == 3:
        word, start, end = item
    else:
        raise ValueError(f"word {index} is {item!r}: give [word, start_s, end_s] or {{word, start, end}}")
    if not isinstance(word, str):
        raise ValueError(f"word {index}: the word must be text, got {word!r}")
    try:
        start, end = float(start), float(end)
    except (TypeError, ValueError):
        raise ValueError(f"word {index} ({word!r}): start and end must be seconds, got {start!r}, {end!r}") from None
    if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end < start:
        raise ValueError(f"word {index} ({word!r}): times must satisfy 0 <= start <= end, got {start}, {end}")
    return word, start, end


def _items(value: Any) -> list:
    if isinstance(value, dict):
        if "segments" in value:  # openai-whisper's JSON output with word timestamps
            if not all(isinstance(s, dict) and "words" in s for s in value["segments"]):
                raise ValueError("a whisper JSON needs word timestamps (segments[].words): run it with "
                                 "--word_timestamps True")
            return [w for s in value["segments"] for w in s["words"]]
        for key in ("aligned_text", "words"):
            if key in value:
                return _items(value[key])
        raise ValueError(f"an alignment object needs `words`, `aligned_text` or whisper's `segments`; it has "
                         f"{', '.join(sorted(map(str, value))) or 'no keys'}")
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(f"an alignment is a list of [word, start_s, end_s], not {type(value).__name__}")


def parse_alignment(value: Any) -> list[Word] | None:
    """An alignment from any of the shapes above (or its JSON text); None for a missing one (None, NaN, "").
    Words must be in time order (starts never decrease). Raises ValueError naming the word at fault."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, (bytes, str)):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"the alignment is not valid JSON ({e})") from None
    words = [_word(item, i) for i, item in enumerate(_items(value))]
    for i in range(1, len(words)):
        if words[i][1] < words[i - 1][1] - 1e-9:
            raise ValueError(f"word {i} ({words[i][0]!r}) starts at {words[i][1]} s, before word {i - 1} "
                             f"({words[i - 1][0]!r}) at {words[i - 1][1]} s: words must be in time order")
    return words


def holds_words(text: str | bytes) -> bool:
    """Whether a JSON file's text looks like an alignment at all (a list, or an object with `words`,
    `aligned_text` or whisper's `segments`): a `<name>.json` beside an audio file may be another tool's metadata
    (Libri-Light writes one beside every file), which is no alignment rather than a malformed one."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True  # broken JSON where an alignment was expected: report it
    return isinstance(value, list) or (isinstance(value, dict) and bool({"words", "aligned_text", "segments"} & set(value)))


def segment_alignment(words: list[Word], start: float, end: float) -> list[Word]:
    """The words inside [start, end] (to `EDGE_TOLERANCE_S`), in the segment's own time (shifted by `start`,
    clipped to it). A word across a cut belongs to neither segment: extract cuts long files in pauses, so that is
    a word the cutter split, and its units are not all in either segment."""
    inside = [(w, s, e) for w, s, e in words if s >= start - EDGE_TOLERANCE_S and e <= end + EDGE_TOLERANCE_S]
    return [(w, round(max(s - start, 0.0), 6), round(min(e, end) - start, 6)) for w, s, e in inside]


def alignment_json(words: list[Word] | None) -> str | None:
    """The JSON form stored in unit shards and synth's index (slamkit's `aligned_text`)."""
    return None if words is None else json.dumps([list(w) for w in words], ensure_ascii=False)
