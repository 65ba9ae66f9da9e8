"""Auto-BLEU, WER, GenPPL on known strings; the offline ASR engine on real TTS speech."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import TEXT_LM_WORDS, plain_text_nll, save_tiny_text_lm, save_tiny_whisper

from slam_ray.lm.textmetrics import Transcriber, auto_bleu, generative_summary, text_nll, word_error_rate


def test_auto_bleu_counts_repeated_bigrams():
    assert auto_bleu("the cat sat on the mat") == 0.0
    # bigrams: (the dog) (dog the) (the dog) (dog ran): "the dog" occurs twice -> 2 of 4
    assert auto_bleu("the dog the dog ran") == pytest.approx(0.5)
    assert auto_bleu("a a a a") == 1.0
    assert auto_bleu("hello") is None and auto_bleu("") is None
    assert auto_bleu("a b a b a", n=3) == pytest.approx(2 / 3)  # (a b a) x2, (b a b) once


def test_word_error_rate_is_word_levenshtein():
    assert word_error_rate("the cat sat", "the cat sat") == (0, 3)
    assert word_error_rate("the cat sat", "the bat sat down") == (2, 3)  # one substitution, one insertion
    assert word_error_rate("The Cat, sat!", "the cat sat") == (0, 3)  # case and punctuation do not count
    assert word_error_rate("a b c", "") == (3, 3)


@pytest.fixture(scope="module")
def text_lm(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = save_tiny_text_lm(tmp_path_factory.mktemp("text_lm"))
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_genppl_matches_a_plain_forward_pass_and_skips_empty_transcripts(text_lm):
    model, tok = text_lm
    texts = ["the dog runs", "a cat sat the dog", "the cat"]
    nlls = text_nll(model, tok, texts, batch_size=2)  # padded batches
    for text, nll in zip(texts, nlls, strict=True):
        assert nll == pytest.approx(plain_text_nll(model, tok, text), rel=1e-4)
    summary = generative_summary([*texts, "", "  "], [*nlls, None, None])
    assert summary["transcripts"] == 5 and summary["empty_transcripts"] == 2
    assert summary["genppl"] == pytest.approx(math.exp(np.mean(nlls)))
    assert not math.isnan(summary["auto_bleu_2"])
    assert generative_summary(["", ""], [None, None]) == {"transcripts": 2, "empty_transcripts": 2}


def test_offline_asr_transcribes_piper_speech(tmp_path):
    from slam_ray.parallel.tts import make_backend

    text = "the quick brown fox jumps over the lazy dog"
    audio = make_backend("piper").synthesize(text, "joe", 100)  # speed 100 = piper's length_scale 1
    asr = Transcriber("pocketsphinx")
    hypothesis = asr(audio)
    edits, n = word_error_rate(text, hypothesis)
    print(f"pocketsphinx on piper speech: {hypothesis!r}, WER {edits / n:.2f}")
    assert n == 9 and edits / n <= 0.5, hypothesis
    assert asr(np.zeros(0, dtype=np.float32)) == ""


def test_a_whisper_checkpoint_loads_by_path_and_transcribes_without_special_tokens(tmp_path):
    """`eval.generation.asr` as a Whisper HF id or folder: a tiny random Whisper saved with its tokenizer and
    feature extractor (as the Hub's are) loads through the transformers pipeline and returns plain words."""
    asr = Transcriber(str(save_tiny_whisper(tmp_path / "whisper")))
    audio = np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1
    heard = asr(audio).split()
    assert heard and set(heard) <= set(TEXT_LM_WORDS)  # no <|notimestamps|> and the like in the text
    assert asr(np.zeros(0, dtype=np.float32)) == ""
