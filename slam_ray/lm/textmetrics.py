"""Text-side metrics of generated speech: ASR engines, Auto-BLEU, GenPPL and word error rate.

ASR: `pocketsphinx` (CMU's offline engine; its English model ships in the PyPI wheel) or any Whisper checkpoint
through transformers (`openai/whisper-large-v3-turbo` in the paper). GenPPL: perplexity of the transcripts under
a text LM (`meta-llama/Llama-3.2-1B` in the paper) = exp(mean over transcripts of each one's mean token NLL), as
slamkit computes it. Empty transcripts are counted and left out of both means, never turned into NaN.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from slam_ray.errors import SlamError

_WORD = re.compile(r"[\w']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def auto_bleu(text: str, n: int = 2) -> float | None:
    """Share of the text's word n-grams that occur more than once in it (0: no repetition); None without n-grams."""
    tokens = words(text)
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return None
    counts = Counter(grams)
    return sum(counts[g] > 1 for g in grams) / len(grams)


def word_error_rate(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word edits, reference words): Levenshtein distance over words."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)


def text_nll(model: Any, tokenizer: Any, texts: Sequence[str], device: str = "cpu", batch_size: int = 8) -> list[float]:
    """Mean next-token NLL of each text under a causal text LM (the first token is context only)."""
    import torch

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    out: list[float] = []
    model.eval()
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, enc["input_ids"][:, 1:, None])[..., 0]
        mask = enc["attention_mask"][:, 1:].float()
        out += (-(logp * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
    return out


def generative_summary(transcripts: Sequence[str], nlls: Sequence[float | None], n: int = 2) -> dict[str, float]:
    """GenPPL and Auto-BLEU over the non-empty transcripts, with how many were empty."""
    kept = [i for i, t in enumerate(transcripts) if words(t)]
    bleus = [b for i in kept if (b := auto_bleu(transcripts[i], n)) is not None]
    ppl_nlls = [nlls[i] for i in kept if nlls[i] is not None]
    return {"transcripts": len(transcripts), "empty_transcripts": len(transcripts) - len(kept),
            **({"genppl": math.exp(float(np.mean(ppl_nlls)))} if ppl_nlls else {}),
            **({f"auto_bleu_{n}": float(np.mean(bleus))} if bleus else {})}


def check_asr(engine: str) -> None:
    """A clear error on the driver when the ASR engine cannot load (Whisper weights load in the actors)."""
    if engine == "pocketsphinx":
        try:
            import pocketsphinx  # noqa: F401
        except ImportError as e:
            raise SlamError("eval.generation.asr: pocketsphinx is not installed (pip install pocketsphinx==5.1.1), "
                            "or give a Whisper HF id/path") from e


class Transcriber:
    """`pocketsphinx` or a Whisper HF id/path -> `__call__(audio_16k) -> text`."""

    def __init__(self, engine: str, device: str = "cpu") -> None:
        self.engine = engine
        if engine == "pocketsphinx":
            from pocketsphinx import Decoder

            self.decoder = Decoder(samprate=16_000, loglevel="FATAL")
        else:
            from transformers import pipeline

            self.pipe = pipeline("automatic-speech-recognition", model=engine, device=device)

    def __call__(self, audio: np.ndarray) -> str:
        if audio.size == 0:
            return ""
        if self.engine == "pocketsphinx":
            pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16).tobytes()
            self.decoder.start_utt()
            self.decoder.process_raw(pcm, full_utt=True)
            self.decoder.end_utt()
            hyp = self.decoder.hyp()
            return hyp.hypstr if hyp else ""
        return self.pipe({"raw": audio, "sampling_rate": 16_000})["text"].strip()
