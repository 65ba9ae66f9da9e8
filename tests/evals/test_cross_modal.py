"""Cross-modal comparisons (`slam_ray/evals/cross_modal.py`): the sequence of each direction, token by token."""

from __future__ import annotations

import pytest
from helpers import save_tiny_qwen25

from slam_ray.evals.cross_modal import cross_modal_comparisons, cross_modal_sequence
from slam_ray.lm.preferences import TextPreference
from slam_ray.lm.vocabulary import MergedVocabulary


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = save_tiny_qwen25(tmp_path_factory.mktemp("lm") / "lm", ["the dog runs", "the dogs run fast"])
    return AutoTokenizer.from_pretrained(folder)


def test_each_direction_is_context_then_continuation_with_a_marker_only_at_a_switch(tokenizer):
    vocab = MergedVocabulary.of(tokenizer, 10)
    prompt, rest = ("the dog", [1, 2]), ("runs", [3, 4, 5])
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    units = lambda u: [vocab.unit_offset + x for x in u]  # noqa: E731
    t, s = vocab.text_marker, vocab.speech_marker
    bos, eos = vocab.bos_id, vocab.eos_id
    expected = {
        ("text", "text"): ([bos, t, *enc("the dog"), *enc(" runs"), eos], 2 + len(enc("the dog"))),
        ("text", "speech"): ([bos, t, *enc("the dog"), s, *units([3, 4, 5]), eos], 3 + len(enc("the dog"))),
        ("speech", "text"): ([bos, s, *units([1, 2]), t, *enc(" runs"), eos], 5),
        ("speech", "speech"): ([bos, s, *units([1, 2]), *units([3, 4, 5]), eos], 4),
    }
    for (context, continuation), want in expected.items():
        assert cross_modal_sequence(context, continuation, prompt, rest, tokenizer, vocab) == want
    # the text pieces read back as the sentence
    tokens, first = expected[("text", "text")]
    assert tokenizer.decode(tokens[2:-1]) == "the dog runs" and tokenizer.decode(tokens[first:-1]) == " runs"


def test_comparisons_pair_the_grammatical_rest_against_the_corrupted_one_and_drop_unspoken_triples(tokenizer):
    vocab = MergedVocabulary.of(tokenizer, 10)
    triples = [TextPreference("a", "word_order", "the dog", "runs fast", "fast runs"),
               TextPreference("b", "agreement", "the dogs", "run", "runs")]
    units = {f"a-{p}": [1, 2] for p in ("prompt", "chosen", "rejected")}  # b was not spoken
    comparisons, sequences = cross_modal_comparisons(triples, units, "speech", "text", tokenizer, vocab)
    assert list(comparisons["item"]) == ["a"] and list(comparisons["kind"]) == ["word_order"]
    chosen, rejected = comparisons["positive"][0], comparisons["negatives"][0][0]
    assert sequences[chosen][1] == sequences[rejected][1]  # the same context, scored from the same index
    assert tokenizer.decode(sequences[chosen][0][sequences[chosen][1]:-1]) == " runs fast"
    text_only, _ = cross_modal_comparisons(triples, units, "text", "text", tokenizer, vocab)
    assert list(text_only["item"]) == ["a", "b"]  # text needs no speech
    with pytest.raises(ValueError, match="one of"):
        cross_modal_comparisons(triples, units, "audio", "text", tokenizer, vocab)


def _story_folder(root, parts_of: dict[str, dict[str, str]]):
    """A cross-modal StoryCloze folder: `parts_of[story][part]` = the text; a `.flac` (real speech from the
    fixtures) beside every part but story 2's endings."""
    import shutil

    from helpers import FIXTURES

    root.mkdir(parents=True, exist_ok=True)

    audio = sorted(FIXTURES.glob("*.flac"))
    for story, parts in parts_of.items():
        for i, (part, text) in enumerate(parts.items()):
            (root / f"{story}_{part}.txt").write_text(text + "\n")
            if story != "2" or part == "mutual":
                shutil.copy(audio[i % len(audio)], root / f"{story}_{part}.flac")
    (root / "notes.txt").write_text("not a story")  # ignored
    return root


STORIES = {"1": {"mutual": "the dog sees a ball", "correct": "the dog runs", "incorrect": "the dogs run fast"},
           "2": {"mutual": "the dogs run", "correct": "the dog runs fast", "incorrect": "dog the runs"}}


def test_storycloze_folder_reads_each_direction_and_scores_whole_sequences(tokenizer, tmp_path):
    from slam_ray.errors import SlamError
    from slam_ray.evals.cross_modal import read_story_parts, storycloze_comparisons

    folder = _story_folder(tmp_path / "cm_sc", STORIES)
    vocab = MergedVocabulary.of(tokenizer, 10)
    stories, incomplete = read_story_parts(folder, "text", "text")
    assert list(stories) == ["1", "2"] and incomplete == []
    comparisons, sequences = storycloze_comparisons(stories, "text", "text", {}, tokenizer, vocab, "cm_sc_t2t")
    assert list(comparisons["item"]) == ["1", "2"] and comparisons["positive"][0] == "cm_sc_t2t:1:correct"
    tokens, first = sequences[comparisons["positive"][0]]
    assert first == 1  # the whole sequence after BOS is scored, as slamkit scores it
    assert tokens[:2] == [vocab.bos_id, vocab.text_marker] and tokens[-1] == vocab.eos_id
    assert tokenizer.decode(tokens[2:-1]) == "the dog sees a ball the dog runs"

    stories, incomplete = read_story_parts(folder, "text", "speech")
    assert list(stories) == ["1"] and incomplete == ["2"]  # story 2 has no spoken endings
    units = {"1/correct": [3, 4], "1/incorrect": [5]}
    comparisons, sequences = storycloze_comparisons(stories, "text", "speech", units, tokenizer, vocab, "t2s")
    tokens, first = sequences[comparisons["negatives"][0][0]]
    enc = tokenizer.encode("the dog sees a ball", add_special_tokens=False)
    assert (tokens, first) == ([vocab.bos_id, vocab.text_marker, *enc, vocab.speech_marker,
                                vocab.unit_offset + 5, vocab.eos_id], 1)
    assert storycloze_comparisons(stories, "text", "speech", {"1/correct": [3]}, tokenizer, vocab, "t2s")[0].empty  # untokenised

    with pytest.raises(SlamError, match="does not exist"):
        read_story_parts(tmp_path / "nowhere", "text", "text")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlamError, match="no <n>_mutual"):
        read_story_parts(tmp_path / "empty", "text", "text")
    with pytest.raises(SlamError, match=r"no story .* has <n>_mutual.wav"):
        read_story_parts(_text_only(tmp_path), "speech", "speech")


def _text_only(tmp_path):
    folder = tmp_path / "text_only"
    folder.mkdir()
    for part, text in STORIES["1"].items():
        (folder / f"1_{part}.txt").write_text(text)
    return folder


def test_speech_to_speech_joins_the_context_audio_to_each_ending_first(tokenizer, tmp_path):
    import numpy as np

    from slam_ray.evals.cross_modal import join_story_audio, read_story_parts, storycloze_comparisons
    from slam_ray.speech.audio import decode_audio

    folder = _story_folder(tmp_path / "cm_sc", STORIES)
    stories, incomplete = read_story_parts(folder, "speech", "speech")
    assert list(stories) == ["1"] and incomplete == ["2"]
    joined, errors = join_story_audio(stories, tmp_path / "cache")
    assert sorted(joined) == ["1/correct", "1/incorrect"] and errors == []
    for ending in ("correct", "incorrect"):
        expected = np.concatenate([decode_audio(folder / "1_mutual.flac"), decode_audio(folder / f"1_{ending}.flac")])
        np.testing.assert_array_equal(decode_audio(joined[f"1/{ending}"]), expected)  # the samples exactly
    stamp = joined["1/correct"].stat().st_mtime_ns
    assert join_story_audio(stories, tmp_path / "cache")[0]["1/correct"].stat().st_mtime_ns == stamp  # made once
    # a story whose audio cannot be decoded is left out with a line saying so; the others come through
    broken = _story_folder(tmp_path / "broken", {"1": STORIES["1"], "3": STORIES["2"]})
    (broken / "3_incorrect.flac").write_bytes(b"not audio")
    joined, errors = join_story_audio(read_story_parts(broken, "speech", "speech")[0], tmp_path / "cache")
    assert sorted(joined) == ["1/correct", "1/incorrect"]
    assert len(errors) == 1 and errors[0]["error"].startswith("story 3: cannot decode audio")
    vocab = MergedVocabulary.of(tokenizer, 10)
    comparisons, sequences = storycloze_comparisons(stories, "speech", "speech", {"1/correct": [1, 2], "1/incorrect": [3]},
                                                    tokenizer, vocab, "cm_sc_s2s")
    assert sequences[comparisons["positive"][0]] == ([vocab.bos_id, vocab.speech_marker, vocab.unit_offset + 1,
                                                      vocab.unit_offset + 2, vocab.eos_id], 1)
