"""`make test`: the whole suite as two pytest processes side by side, one per lane.

- the `ray` lane: every test marked `ray` (real Ray instances, `slam-ray` subprocesses, Ray Train runs) and neither
  `local_ray` nor `own_ray` — the session's Ray and the shared pipeline —, in one process, in file order, its output
  on the terminal;
- the other lane: everything else (unit tests, in-process stages, torch.compile, the docs build), in a second
  process whose output is kept in a file and printed when it ends; then, in the same lane, one pytest after the
  other, the `ray` tests marked `local_ray` (they need a local Ray and nothing of the shared pipeline: they get a
  session Ray of their own in that process), then those marked `own_ray` (they start Ray clusters of their own —
  the two-node `ray job submit` test, the stale cluster file, the `slam` recipe in miniature — and use none of the
  session's fixtures).

Why two: a Ray test leaves about a quarter of two cores idle (its processes start one after another, each
importing torch on one core; a one-worker run trains on one core), and the other lane's work is CPU-bound in one
process, so part of it runs in that idle time: measured, its ~350 s of work made the `ray` lane ~126 s longer (the
lanes save ~150-200 s against one after the other). It runs at a lower CPU priority (nice 10), so a core both lanes
want goes to the `ray` lane, most of the suite's wall time (its first tests: ~307 s beside the other lane at equal
priority, ~250 s at nice 10, 181 s alone). Two lanes of Ray tests do not help while both are busy: they fight over
the same two cores (docs/testing.md has the measurements) — but the `ray` lane alone leaves ~30% of the cores idle
once the other lane's tests are done (~390 s of the `ray` lane's ~1,000 s at 16 min 38 s, 2026-12-04), and the
`local_ray` and `own_ray` tests, at the other lane's lower priority, run in that idle time without touching the
session's Ray (a Ray start of their own costs ~18 s of CPU). Extra arguments go to every pytest command. The exit
code is the worst of them; a pytest run that collects no test fails (pytest's exit code 5 never passes silently).

This machine's speed moves by up to ~1.6x between hours (the same tests, unchanged, 16 and 26 min), so the summary
also prints what the two cores did while the suite ran (busy CPU seconds from /proc/stat, all processes: on a
machine that runs nothing else, the suite's own work) and a speed probe taken before it (`import torch` in a fresh
interpreter, the cost a Ray worker or `slam-ray` process pays at its start): figures from different days compare
through them.

    python tests/lanes.py [pytest args...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
NO_TESTS = 5  # pytest's exit code when it collected nothing
OTHER_LANE_NICENESS = 10  # Linux CFS: ~10% of a contended core, not starved; any idle core in full


def verdict(name: str, code: int) -> int:
    if code == NO_TESTS:
        print(f"[lanes] the {name} lane collected no tests: failing on purpose")
        return 1
    return code


def busy_cpu_seconds() -> float:
    """CPU seconds all cores spent outside idle and iowait since boot (/proc/stat; Linux only, else 0)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def torch_import_seconds() -> float:
    """The faster of two `import torch` in a fresh interpreter (the first may read from disk), wall seconds."""
    times = []
    for _ in range(2):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        times.append(time.perf_counter() - start)
    return min(times)


# The second lane's pytest runs, one after the other: (name in the summary, marker selection, what a failure says)
SECOND_LANE = (("others", "not ray", "non-`ray`"), ("local_ray", "ray and local_ray", "`local_ray`"),
               ("own_ray", "ray and own_ray", "`own_ray`"))
RAY_LANE = "ray and not own_ray and not local_ray"


class OtherLane(threading.Thread):
    """The second lane: the SECOND_LANE runs one after the other, each at a lower priority (their exit codes in
    `codes`). `stop()` ends the running one and starts no other."""

    def __init__(self, pytest: list[str], log, env: dict[str, str]) -> None:  # noqa: ANN001
        super().__init__(daemon=True)
        self.pytest, self.log, self.env = pytest, log, env
        self.codes: list[int] = []
        self.proc: subprocess.Popen | None = None
        self.stopped = False

    def run(self) -> None:
        for _, selection, _ in SECOND_LANE:
            if self.stopped:
                return
            self.proc = subprocess.Popen([*self.pytest, "-m", selection, "-p", "no:cacheprovider"], stdout=self.log,
                                         stderr=subprocess.STDOUT, env=self.env,
                                         preexec_fn=lambda: os.nice(OTHER_LANE_NICENESS))
            if selection == SECOND_LANE[0][1]:
                niceness = os.getpriority(os.PRIO_PROCESS, self.proc.pid) - os.getpriority(os.PRIO_PROCESS, 0)
                print(f"[lanes] tests not marked `ray`, then the `local_ray` and `own_ray` ones, run beside this lane (pid "
                      f"{self.proc.pid}, niceness +{niceness}); their output follows at the end", flush=True)
            self.codes.append(self.proc.wait())

    def stop(self) -> None:
        self.stopped = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


def main(args: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest", str(TESTS), *args]
    probe = torch_import_seconds()
    print(f"[lanes] speed probe: `import torch` takes {probe:.2f} s here now", flush=True)
    start, busy_start = time.time(), busy_cpu_seconds()
    with tempfile.NamedTemporaryFile("w+", prefix="slam-ray-tests-", suffix=".log") as log:
        # -p no:cacheprovider: the processes would otherwise write the same .pytest_cache
        # One inductor compile thread: on a cold cache the compile tests would otherwise run a g++ on each core.
        other = OtherLane(pytest, log, {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1"})
        other.start()
        try:
            ray_code = subprocess.run([*pytest, "-m", RAY_LANE]).returncode
            ray_s = time.time() - start
            other.join()
        finally:
            if other.is_alive():  # interrupted: stop the lane this script started
                other.stop()
                other.join()
        log.seek(0)
        print("\n[lanes] ---- tests not marked `ray`, then the `local_ray` and the `own_ray` tests ----")
        print(log.read(), end="", flush=True)
    total, busy = time.time() - start, busy_cpu_seconds() - busy_start
    codes = dict(zip((name for name, _, _ in SECOND_LANE), other.codes, strict=True))
    print(f"[lanes] whole suite {total // 60:.0f} min {total % 60:.0f} s (the `ray` lane {ray_s:.0f} s; exit codes: "
          f"ray {ray_code}, " + ", ".join(f"{name} {code}" for name, code in codes.items()) + f"); CPU busy {busy:.0f} s of "
          f"{total * os.cpu_count():.0f} core-seconds ({busy / (total * os.cpu_count()):.0%}); speed probe {probe:.2f} s")
    labels = {name: label for name, _, label in SECOND_LANE}
    return max(verdict("`ray`", ray_code), *(verdict(labels[name], code) for name, code in codes.items()))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
