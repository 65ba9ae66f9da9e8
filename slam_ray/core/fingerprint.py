"""What a stage key knows of an input given by path: its content or its listing, so an input edited in place
(a task YAML, a JSONL, a folder of audio, a model folder) changes the key of every stage that reads it.

- a local file: the SHA-256 of its content up to `CONTENT_LIMIT` bytes (a copy or `git checkout` that keeps
  the content keeps the key); a larger one by size and modification time;
- a local folder or glob: a digest of its listing (relative path, size, mtime of every file), walked once,
  streaming: O(files) (72k files: 2 s on a busy 2-core machine, metadata cached);
- in a bucket (s3:// / gs://): a digest of the listing pyarrow gives (size and modification time of every
  object under it; pyarrow exposes no ETags);
- absent: `{"path": ..., "absent": true}`, so a key is computable before its data exists. A model given as an
  HF id (`Qwen/Qwen2.5-0.5B`) is not a local path either: it is keyed by its name alone (the snapshot a
  download resolves to is not pinned; give a local folder to pin it).

Inside `snapshot()` (every CLI command and sweep trial) each location is fingerprinted once and remembered,
so a command walks a large folder once however many stage keys read it; outside one nothing is remembered,
so an edit is always seen.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slam_ray.core.storage import is_remote, listing

CONTENT_LIMIT = 64 << 20  # bytes: a larger file is keyed by size and mtime (hashing GBs per command is too slow)

_memo: dict[str, dict[str, Any]] | None = None  # location -> fingerprint, inside snapshot() only


@contextlib.contextmanager
def snapshot() -> Iterator[None]:
    """Fingerprint each input once inside this block (one command): its inputs are taken as they were when
    first keyed. Re-entrant: an inner block shares the outer one's memory."""
    global _memo
    if _memo is not None:
        yield
        return
    _memo = {}
    try:
        yield
    finally:
        _memo = None


def fingerprint(location: str) -> dict[str, Any]:
    """The fingerprint of a file, folder, glob or bucket location (see the module docstring)."""
    memo_key = location if is_remote(location) else os.path.abspath(os.path.expanduser(location))
    if _memo is not None and memo_key in _memo:
        return dict(_memo[memo_key])
    found = {"path": location, **_measure(location)}
    if _memo is not None:
        _memo[memo_key] = found
    return dict(found)


def _measure(location: str) -> dict[str, Any]:
    if is_remote(location):
        found = listing(location)
        return {"absent": True} if found is None else _digest(found)
    location = os.path.expanduser(location)  # `~/data` is read as the readers read it, not taken as absent
    path = Path(location)
    if path.is_file():
        st = path.stat()
        if st.st_size > CONTENT_LIMIT:
            return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return {"sha256": h.hexdigest()}
    if path.is_dir():
        return _digest(_walk(path, ""))
    if any(c in location for c in "*?["):
        return _digest(_glob(location))
    return {"absent": True}


def _walk(folder: Path, prefix: str, seen: frozenset[str] = frozenset()) -> Iterator[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every file under `folder`, depth first in name order, streamed. A
    symlinked folder is followed as the readers follow it (`data/salmon/bg_alone -> /mnt/...`: its files were
    left out, so replacing them kept the key); a link back to a folder being walked is not (no cycle)."""
    seen = seen | {os.path.realpath(folder)}
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        relative = prefix + entry.name
        if entry.is_dir():
            if os.path.realpath(entry.path) not in seen:
                yield from _walk(Path(entry.path), relative + "/", seen)
        elif entry.is_file():  # follows a symlink to its file (an HF cache snapshot links to its blobs)
            st = entry.stat()
            yield relative, st.st_size, st.st_mtime_ns


def _glob(pattern: str) -> Iterator[tuple[str, int, int]]:
    for name in sorted(glob.glob(pattern, recursive=True)):
        if os.path.isfile(name):
            st = os.stat(name)
            yield name, st.st_size, st.st_mtime_ns


def _digest(files: Any) -> dict[str, Any]:
    h, n, total = hashlib.sha256(), 0, 0
    for relative, size, mtime_ns in files:
        h.update(f"{relative}\t{size}\t{mtime_ns}\n".encode())
        n, total = n + 1, total + size
    return {"files": n, "bytes": total, "listing": h.hexdigest()}


def fingerprints(locations: list[str]) -> list[dict[str, Any]]:
    return [fingerprint(loc) for loc in locations]


def stat_digest(paths: list[str]) -> str:
    """A digest of the size and mtime of each local file of a list (a cache keyed by a file list sees files
    rewritten in place); files in a bucket and missing ones count by name only (a request per object would
    cost more than the cache saves)."""
    h = hashlib.sha256()
    for path in paths:
        st = None if is_remote(path) else _stat(path)
        h.update(f"{path}\t{st.st_size if st else -1}\t{st.st_mtime_ns if st else -1}\n".encode())
    return h.hexdigest()


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None
