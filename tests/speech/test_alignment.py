"""Word alignments (`slam_ray/speech/alignment.py`): the shapes real sources write, errors that name the word at
fault, and a long file's segments getting the words inside them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slam_ray.speech.alignment import alignment_json, parse_alignment, segment_alignment

WORDS = [(" the", 0.1, 0.3), (" cat", 0.35, 0.7), (" sat", 0.9, 1.2)]


def test_every_source_shape_gives_the_same_words():
    triples = [list(w) for w in WORDS]
    objects = [{"word": w, "start": s, "end": e, "probability": 0.9} for w, s, e in WORDS]
    whisper = {"text": " the cat sat", "segments": [{"id": 0, "start": 0.0, "end": 0.8, "words": objects[:2]},
                                                    {"id": 1, "start": 0.8, "end": 1.3, "words": objects[2:]}]}
    for value in (triples, json.dumps(triples), objects, {"words": objects}, {"aligned_text": triples}, whisper,
                  json.dumps(whisper).encode()):
        assert parse_alignment(value) == WORDS
    assert parse_alignment(alignment_json(WORDS)) == WORDS  # what synth's index and the unit shards hold
    for missing in (None, float("nan"), "", "  "):
        assert parse_alignment(missing) is None
    assert parse_alignment([]) == []


@pytest.mark.parametrize(("value", "message"), [
    ("[[' a', 0.1", "not valid JSON"),
    ([[" a", 0.5, 0.2]], "0 <= start <= end"),
    ([[" a", -1, 0.2]], "0 <= start <= end"),
    ([[" a", "soon", 0.2]], "must be seconds"),
    ([[1, 0.1, 0.2]], "must be text"),
    ([[" a", 0.1]], "give [word, start_s, end_s]"),
    ([{"word": " a", "start": 0.1}], "has no end"),
    ([[" a", 0.5, 0.6], [" b", 0.1, 0.2]], "words must be in time order"),
    ({"segments": [{"text": "no words"}]}, "--word_timestamps True"),
    ({"transcript": "x"}, "needs `words`"),
    (42, "a list of [word, start_s, end_s]"),
])
def test_a_malformed_alignment_names_what_is_wrong(value, message):
    with pytest.raises(ValueError) as e:
        parse_alignment(value)
    assert message in str(e.value)


def test_segments_get_the_words_inside_them_in_their_own_time():
    words = [(" a", 0.0, 0.4), (" b", 0.5, 1.0), (" c", 1.9, 2.3), (" d", 2.5, 3.0)]
    assert segment_alignment(words, 0.0, 2.1) == [(" a", 0.0, 0.4), (" b", 0.5, 1.0)]  # c crosses the cut: neither
    assert segment_alignment(words, 2.1, 3.0) == [(" d", 0.4, 0.9)]
    assert segment_alignment(words, 2.4, 3.0) == [(" d", 0.1, 0.6)]
    # a word touching the cut within the tolerance (times rounded to the frame) stays, clipped to the segment
    assert segment_alignment(words, 0.0, 0.99) == [(" a", 0.0, 0.4), (" b", 0.5, 0.99)]
    # random cuts: a word is in at most one segment, and in one exactly when no cut falls inside it
    rng = np.random.default_rng(0)
    starts = np.cumsum(rng.uniform(0.05, 0.6, size=200))
    words = [(f" w{i}", round(s, 3), round(s + rng.uniform(0.05, 0.4), 3)) for i, s in enumerate(starts)]
    cuts = np.concatenate([[0.0], np.sort(rng.uniform(0, words[-1][2], size=12)), [words[-1][2] + 1]])
    seen: dict[str, int] = {}
    for a, b in zip(cuts, cuts[1:], strict=False):
        for w, s, e in segment_alignment(words, a, b):
            original = next(x for x in words if x[0] == w)
            assert s == pytest.approx(max(original[1] - a, 0.0), abs=1e-6) and e <= b - a + 1e-6
            seen[w] = seen.get(w, 0) + 1
    assert max(seen.values()) == 1
    for w, s, e in words:  # (words last >= 0.05 s, more than the tolerance on both sides)
        crossed = any(s + 0.02 < c < e - 0.02 for c in cuts)
        assert seen.get(w, 0) == (0 if crossed else 1), (w, s, e)
    assert 0 < sum(seen.values()) < len(words)  # the cuts did split some words


def test_a_sidecar_of_another_tools_metadata_is_no_alignment_but_a_broken_one_is_reported(tmp_path):
    """Libri-Light keeps a metadata `<name>.json` beside every file: that is no alignment (no error line), while a
    sidecar that tries to be one and fails, or a file a manifest names, is reported."""
    from slam_ray.speech.alignment import holds_words
    from slam_ray.stages.extract import _file_words

    metadata = tmp_path / "librilight.json"
    metadata.write_text(json.dumps({"speaker": "100", "book_meta": {"title": "x"}, "snr": 12.1, "voice_activity": [[0.1, 2.3]]}))
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"words": [{"word": " a", "start": 2.0, "end": 1.0}]}))
    assert not holds_words(metadata.read_text()) and holds_words(broken.read_text()) and holds_words("[")
    assert _file_words({"alignment_file": str(metadata), "sidecar": True}) is None
    with pytest.raises(ValueError, match="0 <= start <= end"):
        _file_words({"alignment_file": str(broken), "sidecar": True})
    with pytest.raises(ValueError, match="needs `words`"):  # named by a manifest: it must be an alignment
        _file_words({"alignment_file": str(metadata)})
