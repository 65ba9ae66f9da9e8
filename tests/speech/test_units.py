from __future__ import annotations

import json

import numpy as np
import pytest

from slam_ray.speech.units import (
    BOS_ID,
    EOS_ID,
    dedup,
    read_jsonl,
    repr_to_units,
    tokens_to_units,
    units_to_repr,
    units_to_tokens,
    vocab_size,
    write_jsonl,
)


def test_vocabulary_matches_slamkit():
    assert vocab_size(500) == 502
    tokens = units_to_tokens([0, 7, 499])
    assert tokens.tolist() == [BOS_ID, 2, 9, 501, EOS_ID]
    assert tokens_to_units(tokens).tolist() == [0, 7, 499]


def test_dedup_gives_run_lengths():
    units, durations = dedup([5, 5, 5, 2, 9, 9, 5])
    assert units.tolist() == [5, 2, 9, 5]
    assert durations.tolist() == [3, 1, 2, 1]
    empty_units, empty_durations = dedup([])
    assert empty_units.size == 0 and empty_durations.size == 0


def test_dedup_inverts_slamkit_features(fixtures):
    """Expanding slamkit's (units, duration) and de-duplicating again gives back exactly its file."""
    rows = list(read_jsonl(fixtures / "features.jsonl"))
    assert [sum(r["duration"]) for r in rows] == [352, 398] or sorted(sum(r["duration"]) for r in rows) == [352, 398]
    for row in rows:
        frames = np.repeat(row["units"], row["duration"])
        units, durations = dedup(frames)
        assert units.tolist() == row["units"]
        assert durations.tolist() == row["duration"]


def test_slamkit_files_round_trip_exactly(fixtures, tmp_path):
    for name in ("features.jsonl", "tokens.jsonl"):
        rows = list(read_jsonl(fixtures / name))
        write_jsonl(tmp_path / name, rows)
        assert (tmp_path / name).read_text() == (fixtures / name).read_text()


def test_tokens_repr_matches_features(fixtures):
    features = {json.dumps(r["file_name"]): r for r in read_jsonl(fixtures / "features.jsonl")}
    tokens = list(read_jsonl(fixtures / "tokens.jsonl"))
    assert len(tokens) == len(features) == 2
    for row in tokens:
        units = repr_to_units(row["audio_repr"])
        assert units_to_repr(units) == row["audio_repr"]
        assert units in [f["units"] for f in features.values()]


def test_repr_rejects_garbage():
    with pytest.raises(ValueError, match="audio_repr"):
        repr_to_units("<Un3>oops<Un4>")
