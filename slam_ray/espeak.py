"""espeak-ng through its C library (libespeak-ng.so.1, installed with the Debian package), via ctypes.

The library, not the CLI: one process per utterance cost ~25 ms, the library speaks a sentence in ~3 ms, and only
its synthesis callback reports word events (character position and sample index of every word), which give
word alignments for free. The library is one global engine per process, so calls are serialised by a lock;
Ray Data runs one actor per process, so actors still run in parallel.

Found the hard way: the library keeps its glottal phase and flutter counters from one utterance to the next
(re-initialising does not reset them; only a fresh process does), so the same text comes out a few samples
(< 1 ms) apart depending on what the process spoke before. The CLI is bit-exact per call because each call is
a fresh process, and it appends ~0.5 s of silence; the library's first utterance equals the CLI's audio
without that tail.
"""

from __future__ import annotations

import ctypes
import re
import threading

import numpy as np

# espeak_EVENT_TYPE values (speak_lib.h)
_EV_LIST_TERMINATED, _EV_WORD, _EV_END, _EV_MSG_TERMINATED = 0, 1, 5, 6
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER, _CHARS_UTF8 = 1, 1
_RATE, _PITCH = 1, 3


class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


class EspeakError(RuntimeError):
    pass


class _Engine:
    """The process's espeak-ng engine; `speak` returns (int16 samples, [(char_pos, n_chars, sample)] words,
    end sample of each clause)."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libespeak-ng.so.1")
        except OSError as e:
            raise EspeakError("libespeak-ng.so.1 not found: install espeak-ng (`apt-get install espeak-ng`)") from e
        self.sample_rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, 0)
        if self.sample_rate <= 0:
            raise EspeakError("espeak-ng failed to initialise (is espeak-ng-data installed?)")
        self._chunks: list[bytes] = []
        self._events: list[tuple[int, int, int, int]] = []
        self._callback = _CALLBACK(self._on_audio)  # kept referenced: the library calls it later
        self.lib.espeak_SetSynthCallback(self._callback)
        self.lock = threading.Lock()

    def _on_audio(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(ctypes.string_at(wav, n * 2))
        i = 0
        while events[i].type not in (_EV_LIST_TERMINATED, _EV_MSG_TERMINATED):
            e = events[i]
            self._events.append((e.type, e.text_position, e.length, e.sample))
            i += 1
        return 0

    def speak(self, text: str, voice: str, rate: int, pitch: int | None) -> tuple[np.ndarray, list, list]:
        with self.lock:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise EspeakError(f"espeak-ng has no voice {voice!r} (list them with `espeak-ng --voices`)")
            self.lib.espeak_SetParameter(_RATE, int(rate), 0)
            if pitch is not None:
                self.lib.espeak_SetParameter(_PITCH, int(pitch), 0)
            self._chunks, self._events = [], []
            data = text.encode()
            status = self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            if status != 0:
                raise EspeakError(f"espeak-ng could not speak this text (error {status})")
            audio = np.frombuffer(b"".join(self._chunks), dtype=np.int16)
            words = [(pos, length, sample) for kind, pos, length, sample in self._events if kind == _EV_WORD]
            ends = [sample for kind, _, _, sample in self._events if kind == _EV_END]
            return audio, words, ends


_engine: _Engine | None = None
_engine_lock = threading.Lock()


def engine() -> _Engine:
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = _Engine()
        return _engine


def word_spans(text: str, words: list[tuple[int, int, int]], ends: list[int], n_samples: int,
               sample_rate: int) -> list[list]:
    """slamkit's `aligned_text` ([[word, start_s, end_s], ...]) from espeak's word events: a word starts at its
    event and ends at the next word or clause end (the engine reports no word ends; a clause end marks the
    pause). Words carry a leading space, as slamkit's aligned_text does (its interleaving joins them with
    ''). Events inside one whitespace-separated token (a number read as several words: "42" gives events at
    "4" and "2") are merged into that token, punctuation stripped."""
    tokens = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    merged: list[list] = []  # [token index, start sample]
    for pos, _, sample in words:
        at = pos - 1  # 1-based character positions
        index = next((i for i, (a, b) in enumerate(tokens) if a <= at < b), None)
        if index is None or (merged and merged[-1][0] == index):
            continue
        merged.append([index, sample])
    spans = []
    for i, (index, start) in enumerate(merged):
        nxt = merged[i + 1][1] if i + 1 < len(merged) else n_samples
        end = min([s for s in ends if s > start] + [nxt, n_samples])
        a, b = tokens[index]
        word = re.sub(r"^\W+|\W+$", "", text[a:b]) or text[a:b]
        spans.append([" " + word, round(start / sample_rate, 3), round(max(end, start) / sample_rate, 3)])
    return spans
