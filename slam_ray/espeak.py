"""espeak-ng through its C library (libespeak-ng.so.1, installed with the Debian package), via ctypes.

The library, not the CLI: one process per utterance cost ~25 ms, the library speaks a sentence in ~3 ms, and only
its synthesis callback reports word events (character position and sample index of every word), which give
word alignments for free. The library is one global engine per process, so calls are serialised by a lock;
Ray Data runs one actor per process, so actors still run in parallel.

Found the hard way: the library carries state from one utterance to the next (glottal phase, flutter, and more:
the same sentence came out up to 43 ms longer or shorter depending on what the process had spoken before), and
re-initialising does not reset it; only a fresh process does. So every utterance is spoken in a forked child of
a process whose engine is initialised but has never spoken: bit-exact whatever came before, at ~25 ms per
utterance (the fork), like the CLI it replaces. The CLI appends ~0.5 s of silence; otherwise a fresh engine's
audio equals the CLI's sample for sample.
"""

from __future__ import annotations

import ctypes
import os
import pickle
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


class _VoiceSelect(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_char_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
                ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]


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

    def _set_voice(self, voice: str) -> bool:
        # as the CLI's -v does: a voice file name ("en-us", "gmw/en"), else a language ("en-gb", "en-gb+f3")
        if self.lib.espeak_SetVoiceByName(voice.encode()) == 0:
            return True
        select = _VoiceSelect(languages=voice.encode())
        return self.lib.espeak_SetVoiceByProperties(ctypes.byref(select)) == 0

    def speak(self, text: str, voice: str, rate: int, pitch: int | None) -> tuple[np.ndarray, list, list]:
        """Speak in a forked child, so the engine's state is always the fresh one (see the module doc)."""
        with self.lock:
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # child: speak, send the result (or the error) back, exit without cleanup
                os.close(read)
                try:
                    samples, words, ends = self._speak(text, voice, rate, pitch)
                    data = pickle.dumps((samples.tobytes(), words, ends))
                except BaseException as e:  # noqa: BLE001  (any failure goes back to the parent)
                    data = pickle.dumps(EspeakError(str(e)))
                with os.fdopen(write, "wb") as f:
                    f.write(data)
                os._exit(0)
            os.close(write)
            with os.fdopen(read, "rb") as f:
                data = f.read()
            _, status = os.waitpid(pid, 0)
        if not data:
            raise EspeakError(f"espeak-ng crashed on this text (exit status {status})")
        result = pickle.loads(data)  # our own child's bytes
        if isinstance(result, EspeakError):
            raise result
        samples, words, ends = result
        return np.frombuffer(samples, dtype=np.int16), words, ends

    def _speak(self, text: str, voice: str, rate: int, pitch: int | None) -> tuple[np.ndarray, list, list]:
        if not self._set_voice(voice):
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
    """slamkit's `aligned_text` ([[" word", start_s, end_s], ...]) from espeak's word events: a word starts at
    its event and ends at the next word or clause end (the engine reports no word ends; a clause end marks the
    pause). Words carry a leading space, as slamkit's aligned_text does (its interleaving joins them with '').

    Events and text words are not one to one, both ways: a number gives an event per spoken word ("42": at "4"
    and at "2"), merged here into its text word; and espeak joins some function words to the next word without
    an event ("in the sun": no event at "the"), so "in the" becomes one entry. Either way every text word lands
    in exactly one entry, in order, punctuation stripped at the entry's edges."""
    tokens = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    starts: list[list[int]] = []  # [first token index, start sample]
    for pos, _, sample in words:
        at = pos - 1  # 1-based character positions
        index = next((i for i, (a, b) in enumerate(tokens) if a <= at < b), None)
        if index is None or (starts and starts[-1][0] >= index):
            continue
        starts.append([index, sample])
    spans = []
    for i, (index, start) in enumerate(starts):
        last = starts[i + 1][0] if i + 1 < len(starts) else len(tokens)
        nxt = starts[i + 1][1] if i + 1 < len(starts) else n_samples
        end = min([s for s in ends if s > start] + [nxt, n_samples])
        chunk = text[tokens[index][0] : tokens[last - 1][1]]
        word = re.sub(r"^\W+|\W+$", "", chunk) or chunk
        spans.append([" " + word, round(start / sample_rate, 3), round(max(end, start) / sample_rate, 3)])
    return spans
