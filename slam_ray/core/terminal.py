"""What reaches the user's terminal: the stages' own progress and results, and real warnings, not Ray's internals.

Ray's C++ core worker writes one known-harmless error line per actor whose constructor arguments sit in the object
store while it may restart ("... has constructor arguments in the object store and max_restarts > 0 ...",
ray-project/ray#53727): Ray Data's actor pools pass their location tracker that way, and Train V2's controller its
PreemptionWatcher. The driver's own copy goes straight to file descriptor 2, below Python, so no logging filter
reaches it. `quiet_ray_noise` puts a filter on descriptor 2 for the length of a command: complete lines matching
`NOISE` are dropped, and so are the weight-loading bars of workers (see `_WORKER_WEIGHT_BAR`); everything else
passes through as it comes (a progress bar's partial line at once). On a terminal the filter is a pseudo-terminal
of the same size, so tqdm and Ray still see a terminal. `SLAM_RAY_RAW_STDERR=1` turns it off.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator

NOISE = re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store "
                   rb"and max_restarts > 0")
# transformers 5 draws a bar each time a process loads or saves weights: from every actor and Train worker (each
# checkpoint) that is a screenful of bars per stage. Such a line forwarded from a worker ("(Name pid=N) \rLoading
# weights: ...", \r-redrawn) is dropped whole; the driver's own bars pass as they are drawn.
_WORKER_WEIGHT_BAR = re.compile(rb"^(\x1b\[\d+m)?\(.*? pid=\d+(, ip=[^)]*)?\)(\x1b\[0m)? \r?"
                                rb"(Loading weights|Writing model shards):")
_WEIGHT_BAR_REDRAW = re.compile(rb"^\s*((Loading weights|Writing model shards):.*)?$")
# A part of a partial line that may be the start of a Ray log line ("[2026-..." or a worker's "(Name pid=...)"
# prefix, maybe coloured) waits for its newline; anything before it (a progress bar redrawn with \r) is passed on
# at once.
_MAYBE_RAY = re.compile(rb"^(\x1b\[\d+m)?(\[\d|\()|^(\x1b(\[\d*m?)?|\[)$")  # (or too short to tell yet)


def filter_stream(read_fd: int, write_fd: int) -> None:
    """Copy `read_fd` to `write_fd` until end of file, dropping complete lines that match NOISE."""
    pending = b""
    while True:
        try:
            chunk = os.read(read_fd, 65536)
        except OSError:  # a pseudo-terminal whose other side closed reads EIO, not end of file
            chunk = b""
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        out = b"".join(_without_noise(line) for line in lines)
        # A partial line is passed on up to its first \r-separated part that may start a Ray line, which waits for
        # its newline (one read can hold a bar's redraw and the first bytes of a noise line after it).
        parts = pending.split(b"\r")
        held = next((i for i, part in enumerate(parts) if _MAYBE_RAY.match(part)), len(parts))
        if held == len(parts):
            out, pending = out + pending, b""
        elif held:
            out, pending = out + b"\r".join(parts[:held]) + b"\r", b"\r".join(parts[held:])
        if out:
            _write_all(write_fd, out)
    if pending and not NOISE.search(pending):
        _write_all(write_fd, pending)
    os.close(read_fd)
    os.close(write_fd)


def _without_noise(line: bytes) -> bytes:
    """A line (its \\n not included) with its \\n, less any \\r-separated part that is the noise: a progress bar
    redrawn with \\r shares a line with whatever is printed next."""
    parts = line.split(b"\r")
    if _WORKER_WEIGHT_BAR.match(line) and all(_WEIGHT_BAR_REDRAW.match(part) for part in parts[1:]):
        return b""
    ends = [b"\r"] * (len(parts) - 1) + [b"\n"]
    out, dropped = [], False
    for part, end in zip(parts, ends, strict=True):
        if NOISE.search(part) or (dropped and not part):  # a terminal's \r\n goes with the dropped line
            dropped = bool(part)
            continue
        dropped = False
        out.append(part + end)
    return b"".join(out)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


@contextlib.contextmanager
def quiet_ray_noise() -> Iterator[None]:
    """Filter descriptor 2 (see the module docstring) while the block runs."""
    try:
        sys.stderr.flush()
        original = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real descriptor 2 (an embedding host): nothing to filter
        yield
        return
    if os.environ.get("SLAM_RAY_RAW_STDERR") == "1":
        os.close(original)
        yield
        return
    if os.isatty(original):
        import fcntl
        import pty
        import termios

        read_fd, write_end = pty.openpty()
        with contextlib.suppress(OSError):  # the same size: tqdm sizes its bars from it
            fcntl.ioctl(write_end, termios.TIOCSWINSZ, fcntl.ioctl(original, termios.TIOCGWINSZ, b"\0" * 8))
    else:
        read_fd, write_end = os.pipe()
    pump = threading.Thread(target=filter_stream, args=(read_fd, os.dup(original)), daemon=True,
                            name="slam-ray-stderr-filter")
    pump.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)  # descriptor 2 is the terminal again; the pump drains what was written before
        os.close(original)
        pump.join(timeout=2.0)  # processes started meanwhile (Ray's) may hold the filter open: do not wait for them
