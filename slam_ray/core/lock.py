"""The lock that keeps two processes from building one stage output or cache at once.

A local workdir (or a shared filesystem) uses `fcntl.flock` on a file beside the output: it holds between
processes of one machine (concurrent sweep trials), and the kernel drops it when its holder dies.

A workdir in S3 (or an S3-compatible server) is shared by drivers on different nodes, so the lock is a *lease*
object beside the output, `WORKDIR/<stage>/<key>.lock`:
- taken by creating it only if absent (`If-None-Match: *`, S3's conditional write; moto 5 and MinIO have it):
  of two drivers racing, exactly one succeeds;
- kept alive by its holder, which rewrites it every `expiry / 4` seconds (a heartbeat thread), each rewrite
  conditional on the ETag of its own last write (`If-Match`), so a holder learns when it lost the lease;
- taken over by a waiter that has seen the same ETag for `expiry` seconds of its own clock (a dead holder's
  lease stops changing; no clocks are compared across machines), with a write conditional on that ETag, so of
  several waiters one takes it;
- deleted on release (conditional on its ETag: never someone else's lease).
`expiry` is `$SLAM_RAY_LEASE_SECONDS` (default 120): how long a resubmitted driver waits on a dead one's lease.
gs:// has no S3 conditional writes through this layer: there the lock holds per machine only (as said once).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slam_ray.core.storage import is_remote, local_path, s3_client
from slam_ray.errors import SlamError

DEFAULT_LEASE_SECONDS = 120.0
_warned_gs = False


def lease_seconds() -> float:
    return float(os.environ.get("SLAM_RAY_LEASE_SECONDS") or DEFAULT_LEASE_SECONDS)


class LeaseLost(SlamError):
    """This driver's S3 lease went to another driver (this one stalled past the expiry): the output is theirs."""


class Held:
    """What `exclusive_lock` yields: `lost` / `check()` say whether the lock is still this process's. A file lock
    is held until released; an S3 lease can be lost (a stalled driver's, taken over), and then the holder must
    publish nothing: check before every write that makes an output visible."""

    def __init__(self, lease: S3Lease | None = None) -> None:
        self.lease = lease

    @property
    def lost(self) -> bool:
        return self.lease is not None and self.lease.lost

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(f"[{self.lease.what}] lost the lease {self.lease.location}: this driver stalled past "
                            f"{self.lease.expiry:.0f} s and another took over its output; nothing of this driver's "
                            "was published. Run the command again to reuse (or wait for) the other driver's output")


@contextlib.contextmanager
def exclusive_lock(location: str, what: str) -> Iterator[Held]:
    """Hold the lock at `location` (a local file, or an object in a bucket) for the block; `what` names the
    output in the message printed while waiting."""
    if location.startswith("s3://"):
        lease = S3Lease(location, what)
        lease.acquire()
        try:
            yield Held(lease)
        finally:
            lease.release()
        return
    if is_remote(location):
        global _warned_gs
        if not _warned_gs:
            print(f"[lock] {location.partition('://')[0]}:// workdirs are locked per machine only: two drivers on "
                  "two nodes must not build one stage at once")
            _warned_gs = True
    with _file_lock(local_path(location), what):
        yield Held()


@contextlib.contextmanager
def _file_lock(path: Path, what: str) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[{what}] another process holds {path}: it is building this output; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


# 412: the condition failed; 409: S3 answers a conditional write racing another write on the same key so
_CONFLICT = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_GONE = {"NoSuchKey", "404"}


class S3Lease:
    """A lease object in S3 (see the module docstring)."""

    def __init__(self, location: str, what: str, expiry: float | None = None) -> None:
        self.client, self.bucket, self.key = s3_client(location)
        self.location, self.what = location, what
        self.expiry = expiry or lease_seconds()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "heartbeat": time.time(), "expiry_s": self.expiry}).encode()

    def _put(self, **condition: str) -> bool:
        """Write the lease under a condition; False when the condition failed."""
        from botocore.exceptions import ClientError

        try:
            self.etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), **condition)["ETag"]
            return True
        except ClientError as e:
            if _code(e) in _CONFLICT | _GONE:
                return False
            raise

    def _read(self) -> tuple[str, dict[str, Any]] | None:
        from botocore.exceptions import ClientError

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if _code(e) in _GONE:
                return None
            raise
        try:
            holder = json.loads(got["Body"].read())
        except ValueError:
            holder = {}
        return got["ETag"], holder

    def acquire(self) -> None:
        seen: tuple[str, float] | None = None  # (ETag, when this process first saw it)
        announced = False
        poll = min(5.0, self.expiry / 6)
        while True:
            if self._put(IfNoneMatch="*"):
                break
            current = self._read()
            if current is None:
                continue  # released between the two requests: try again at once
            etag, holder = current
            if seen is None or seen[0] != etag:
                seen = (etag, time.monotonic())
            elif time.monotonic() - seen[1] > self.expiry:
                if self._put(IfMatch=etag):  # exactly the lease we watched go stale
                    print(f"[{self.what}] took over the lease of {holder.get('owner', '?')} (unchanged for "
                          f"{self.expiry:.0f} s: its driver is gone)")
                    break
                seen = None
                continue
            if not announced:
                print(f"[{self.what}] another driver ({holder.get('owner', '?')}) holds {self.location}: it is "
                      "building this output; waiting for it")
                announced = True
            time.sleep(poll)
        self._beater = threading.Thread(target=self._beat, name=f"lease {self.key}", daemon=True)
        self._beater.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.expiry / 4):
            try:
                if not self._put(IfMatch=self.etag or ""):
                    self.lost = True
                    print(f"[{self.what}] lost the lease {self.location} (this driver stalled past "
                          f"{self.expiry:.0f} s and another took over)")
                    return
            except Exception as e:  # a network blip: the next beat tries again, well within the expiry
                print(f"[{self.what}] lease heartbeat failed ({type(e).__name__}: {e}); retrying")

    def release(self) -> None:
        from botocore.exceptions import ClientError

        self._stop.set()
        if self._beater is not None:
            self._beater.join()
        if self.lost or self.etag is None:
            return
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except ClientError as e:
            if _code(e) not in _CONFLICT | _GONE:
                raise
