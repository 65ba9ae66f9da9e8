"""Where the cores go: CPU seconds per kind of process (a Ray actor's title, a daemon's or a script's name) on the
whole machine while a command runs, and the share of the machine's cores that was busy.

Every process is sampled every `--interval` seconds and its last reading kept, so processes that start and end
while the command runs count (one that lives less than an interval may be missed: a fraction of a second of CPU
each). The sampling process counts too, under its own name: the cost of sampling. An exiting process has no
command line (nor CPU times, once reaped) left to read; it keeps the kind and time it was last seen with. Ray
cuts long titles to the room its worker's command line had (`ray::RayTrainWo`); one is counted under the full
title it abbreviates when only one title seen starts with it (`ray::MapWorker(` could be any map actor: it
stays as it is).

    .venv/bin/python bench/cpu_profile.py [--interval 0.5] [--top 40] -- make test

Used by `bench/train.py --profile`; docs/testing.md has the suite's profile. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

DAEMONS = ("gcs_server", "raylet", "dashboard.py", "dashboard/agent.py", "log_monitor.py", "runtime_env",
           "default_worker.py", "monitor.py")


class CpuProfile:
    """CPU seconds per kind of process on the machine while the block runs (see the module's docstring)."""

    def __init__(self, interval_s: float = 1.0) -> None:
        import psutil

        self.psutil, self.interval_s, self.stop = psutil, interval_s, threading.Event()
        self.first = {self._key(p): self._cpu(p) or 0.0 for p in psutil.process_iter()}
        self.last: dict[tuple[int, float], tuple[str, float]] = {}

    @staticmethod
    def _key(proc) -> tuple[int, float]:  # noqa: ANN001
        try:
            return proc.pid, proc.create_time()
        except Exception:  # gone
            return proc.pid, 0.0

    @staticmethod
    def _cpu(proc) -> float | None:  # noqa: ANN001
        try:
            t = proc.cpu_times()
            return t.user + t.system
        except Exception:  # gone, or not ours to read
            return None

    @staticmethod
    def _kind(proc) -> str | None:  # noqa: ANN001
        """Its Ray title, daemon or script name; None when its command line cannot be read (exiting)."""
        try:
            cmd = proc.cmdline()
        except Exception:
            return None
        if not cmd:
            return None
        title = " ".join(cmd)
        if title.startswith("ray::"):
            return re.sub(r"[\s.].*", "", title)  # `ray::RayTrainWorker.poll_status` is a RayTrainWorker
        for name in DAEMONS:
            if name in title:
                return name
        program = Path(cmd[0]).name
        if program.startswith("python") and len(cmd) > 1:  # the script or module it runs
            rest = cmd[1:]
            while len(rest) > 1 and rest[0].startswith("-") and rest[0] not in ("-m", "-c"):  # -u, -B, -S, …
                rest = rest[1:]
            if rest[0] == "-m":
                return " ".join(rest[:2])
            if rest[0] == "-c":
                return "python -c"
            program, cmd = Path(rest[0]).name, rest
        # with its subcommand, if any: `ray job`, `ray start`, `slam-ray run`
        return program + (f" {cmd[1]}" if len(cmd) > 1 and re.fullmatch(r"[a-z][\w-]*", cmd[1]) else "")

    def _sample(self) -> None:
        while True:
            for proc in self.psutil.process_iter():
                key = self._key(proc)
                seen_kind, seen_cpu = self.last.get(key, ("?", 0.0))
                cpu = self._cpu(proc)  # None once it is gone: its last reading stands
                self.last[key] = (self._kind(proc) or seen_kind, seen_cpu if cpu is None else cpu)
            if self.stop.wait(self.interval_s):
                return

    def __enter__(self) -> CpuProfile:
        self.started = time.time()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self.stop.set()
        self.thread.join()
        self.wall_s = time.time() - self.started
        kinds = {kind for kind, _ in self.last.values()}
        full = {}
        for kind in kinds:
            longer = [f for f in kinds if f.startswith(kind) and f != kind] if kind.startswith("ray::") else []
            full[kind] = longer[0] if len(longer) == 1 else kind
        self.by_kind: dict[str, float] = defaultdict(float)
        self.count: dict[str, int] = defaultdict(int)
        for key, (kind, cpu) in self.last.items():
            self.by_kind[full[kind]] += max(0.0, cpu - self.first.get(key, 0.0))
            self.count[full[kind]] += key not in self.first

    @property
    def total_s(self) -> float:
        return sum(self.by_kind.values())

    def table(self, top: int = 40) -> str:
        rows = sorted(self.by_kind.items(), key=lambda kv: -kv[1])[:top]
        return "\n".join(f"  {cpu:8.1f} s  {cpu / self.total_s:5.1%}  {self.count[kind]:4d} new  {kind}"
                         for kind, cpu in rows if cpu >= 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--top", type=int, default=40, help="kinds to list")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to profile after --")
    with CpuProfile(args.interval) as profile:
        rc = subprocess.call(command)
    cores = os.cpu_count() or 1
    print(f"\nwall {profile.wall_s:.0f} s, CPU {profile.total_s:.0f} s: {profile.total_s / profile.wall_s / cores:.0%} "
          f"of {cores} cores busy; CPU seconds by kind of process (new: processes started meanwhile)")
    print(profile.table(args.top))
    print(json.dumps({"wall_s": round(profile.wall_s), "cpu_s": round(profile.total_s), "cores": cores,
                      "busy": round(profile.total_s / profile.wall_s / cores, 3), "returncode": rc,
                      "by_kind": {k: round(v, 1) for k, v in sorted(profile.by_kind.items(), key=lambda kv: -kv[1])}}))
    sys.exit(rc)


if __name__ == "__main__":
    main()
