"""espeak-ng through its C library (libespeak-ng.so.1, installed with the Debian package), via ctypes.

The library, not the CLI, because only its synthesis callback reports word events (character position and
sample index of every word), which give word alignments for free.

Found the hard way: the library carries state from one utterance to the next (glottal phase, flutter, and more:
the same sentence came out up to 43 ms longer or shorter depending on what the process had spoken before), and
re-initialising does not reset it; only a fresh process does. So every utterance is spoken in a forked child of
a small server process (`python -m slam_ray.speech.espeak`) whose engine is initialised but never speaks: bit-exact
whatever was spoken before. An utterance costs 7.8 ms this way (a grammar sentence, speaking included; the CLI
took 8.7 ms; forking the Ray actor itself, which holds torch, took ~30 ms). With the end-of-text sentence pause the CLI
asks for (espeakENDPAUSE), a fresh engine's audio equals the CLI's sample for sample (tested).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import re
import struct
import subprocess
import sys
import threading

import numpy as np

# espeak_EVENT_TYPE values (speak_lib.h)
_EV_LIST_TERMINATED, _EV_WORD, _EV_END, _EV_MSG_TERMINATED = 0, 1, 5, 6
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER, _CHARS_UTF8, _ENDPAUSE = 1, 1, 0x1000
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
    """The server's espeak-ng engine; `_speak` returns (int16 samples, [(char_pos, n_chars, sample)] words,
    end sample of each clause) and is only ever called in a forked child."""

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

    def speak_forked(self, request: tuple) -> bytes:
        """The pickled result of `_speak(*request)` (or of the error it raised), spoken in a forked child."""
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: speak, send the result back, exit without cleanup
            os.close(read)
            try:
                samples, words, ends = self._speak(*request)
                data = pickle.dumps(("ok", samples.tobytes(), words, ends))
            except BaseException as e:  # noqa: BLE001  (any failure goes back to the parent)
                data = pickle.dumps(("error", str(e)))
            with os.fdopen(write, "wb") as f:
                f.write(data)
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        return data or pickle.dumps(("error", f"espeak-ng crashed on this text (exit status {status})"))

    def _speak(self, text: str, voice: str, rate: int, pitch: int | None) -> tuple[np.ndarray, list, list]:
        if not self._set_voice(voice):
            raise EspeakError(f"espeak-ng has no voice {voice!r} (list them with `espeak-ng --voices`)")
        self.lib.espeak_SetParameter(_RATE, int(rate), 0)
        if pitch is not None:
            self.lib.espeak_SetParameter(_PITCH, int(pitch), 0)
        self._chunks, self._events = [], []
        data = text.encode()
        # ENDPAUSE: the sentence pause at the end, as the CLI adds it (the walking skeleton's corpus, sample for sample)
        status = self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8 | _ENDPAUSE, None, None)
        if status != 0:
            raise EspeakError(f"espeak-ng could not speak this text (error {status})")
        audio = np.frombuffer(b"".join(self._chunks), dtype=np.int16)
        words = [(pos, length, sample) for kind, pos, length, sample in self._events if kind == _EV_WORD]
        ends = [sample for kind, _, _, sample in self._events if kind == _EV_END]
        return audio, words, ends


def _send(stream, data: bytes) -> None:
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream) -> bytes:
    head = stream.read(8)
    if len(head) < 8:
        raise EspeakError("the espeak-ng server stopped")
    return stream.read(struct.unpack("<Q", head)[0])


def serve() -> None:
    """The server's loop: one request (pickled (text, voice, rate, pitch)) in, one pickled result out:
    ("ok", int16 bytes, words, clause ends) or ("error", message); the first message is the sample rate."""
    try:
        engine = _Engine()
        _send(sys.stdout.buffer, pickle.dumps(("ok", engine.sample_rate)))
    except EspeakError as e:
        _send(sys.stdout.buffer, pickle.dumps(("error", str(e))))
        return
    while True:
        try:
            request = pickle.loads(_receive(sys.stdin.buffer))  # from our own client
        except EspeakError:
            return  # the client went away
        _send(sys.stdout.buffer, engine.speak_forked(request))


class EspeakClient:
    """This process's handle on its espeak-ng server; `speak` is serialised by a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        # the server computes nothing with numpy: no BLAS thread pools in a process that forks per utterance
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "slam_ray.speech.espeak"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        hello = pickle.loads(_receive(self.proc.stdout))  # our own server's bytes
        if hello[0] != "ok":
            raise EspeakError(hello[1])
        self.sample_rate = int(hello[1])

    def speak(self, text: str, voice: str, rate: int, pitch: int | None) -> tuple[np.ndarray, list, list]:
        """(int16 samples, word events (char_pos, n_chars, sample), clause-end samples) of a fresh engine."""
        with self.lock:
            if self.proc.poll() is not None:
                self._start()
            _send(self.proc.stdin, pickle.dumps((text, voice, rate, pitch)))
            result = pickle.loads(_receive(self.proc.stdout))  # our own server's bytes
        if result[0] != "ok":
            raise EspeakError(result[1])
        _, samples, words, ends = result
        return np.frombuffer(samples, dtype=np.int16), words, ends


_client: EspeakClient | None = None
_client_lock = threading.Lock()


def engine() -> EspeakClient:
    global _client
    with _client_lock:
        if _client is None:
            _client = EspeakClient()
        return _client


def word_spans(text: str, words: list[tuple[int, int, int]], ends: list[int], samples: np.ndarray,
               sample_rate: int) -> list[list]:
    """slamkit's `aligned_text` ([[" word", start_s, end_s], ...]) from espeak's word events: a word starts at
    its event and ends at the next word or clause end (the engine reports no word ends), less the silence at
    its tail (a clause's pause, the end-of-text pause): the end is 10 ms after its last sample above 1% of the
    utterance's peak. Words carry a leading space, as slamkit's aligned_text does (its interleaving joins them
    with '').

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
    n_samples = len(samples)
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > 0.01 * max(1, int(np.abs(samples.astype(np.int32)).max())))
    spans = []
    for i, (index, start) in enumerate(starts):
        last = starts[i + 1][0] if i + 1 < len(starts) else len(tokens)
        nxt = starts[i + 1][1] if i + 1 < len(starts) else n_samples
        end = min([s for s in ends if s > start] + [nxt, n_samples])
        inside = loud[(loud >= start) & (loud < end)]
        if len(inside):  # trim the silent tail (pauses belong to no word)
            end = min(end, int(inside[-1]) + sample_rate // 100)
        chunk = text[tokens[index][0] : tokens[last - 1][1]]
        word = re.sub(r"^\W+|\W+$", "", chunk) or chunk
        spans.append([" " + word, round(start / sample_rate, 3), round(max(end, start) / sample_rate, 3)])
    return spans


if __name__ == "__main__":
    serve()
