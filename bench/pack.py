"""Pack at corpus scale: throughput and memory of the streaming `pack` stage, and of a training worker's data path,
for two corpus sizes (memory must stay flat in corpus size).

For each size the bench writes seeded synthetic unit shards in extract's format (Parquet, utterances of 200-1,000
units, ~1M tokens per shard, marked as a complete extract output), runs the real `pack` stage (Ray Data, this
process as the driver) and samples every 50 ms the anonymous memory (`RssAnon` of /proc/PID/status: pages of a
memory-mapped file are page cache, not a copy) of the driver and of every Ray worker process it started. Its
time (`seconds`, the statistics and pack passes; `phases_s` splits them) includes Ray Data's first use in the
process, as a stand-alone `slam-ray pack` pays it; the stage then runs once more on the same inputs, its output
removed (`warm_seconds`: a pipeline's pack, whose driver already ran extract on Ray Data; its memory is not
sampled), and must write the same index and shards, byte for byte.
Then a training worker's data path runs in a fresh process: `PackedWindows` over the shards and the train stage's
`WindowBatches` reading one whole epoch of batches (each converted to int64 as the worker's `loss_on` does), and
its peak anonymous memory is sampled the same way. `--ray-data-reader` also streams the same windows through Ray
Data (`read_numpy` -> `iter_torch_batches` with a local shuffle buffer), the alternative reader, and reports its
time and memory (its own and its Ray workers'). The last line is one JSON object.

    .venv/bin/python bench/pack.py [--sizes 10e6 100e6] [--workers 2] [--shard-tokens 4194304] [--ray-data-reader]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOKENS_PER_INPUT_SHARD = 1_000_000


def anon_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


class PeakAnon:
    """Peak RssAnon of a process (this one by default) and, separately, of the Ray workers among its descendants."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid, self.driver, self.workers, self._stop = pid, 0, 0, threading.Event()

    def _sample(self) -> None:
        import psutil

        me = psutil.Process(self.pid or os.getpid())
        while not self._stop.is_set():
            self.driver = max(self.driver, anon_bytes(me.pid))
            # and every Ray worker among its descendants (a reader with its own Ray has some too)
            for child in me.children(recursive=True):
                try:
                    if child.name().startswith("ray::") or "default_worker.py" in " ".join(child.cmdline()):
                        self.workers = max(self.workers, anon_bytes(child.pid))
                except psutil.Error:
                    pass
            time.sleep(0.05)

    def __enter__(self) -> PeakAnon:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def write_extract_output(exp, n_tokens: int, seed: int = 0) -> int:
    """Synthetic extract output of about `n_tokens` packed tokens; returns the number of utterances."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from slam_ray.core.stage_io import stage_dir

    out = stage_dir(exp, "extract")
    (out.path / "units").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names, written, utterances = [], 0, 0
    while written < n_tokens:
        lengths = rng.integers(200, 1001, size=TOKENS_PER_INPUT_SHARD // 600)
        values = rng.integers(0, 500, size=int(lengths.sum())).astype(np.uint16)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        name = f"units/part-{len(names):05d}.parquet"
        ids = [f"utt-{utterances + i:09d}" for i in range(len(lengths))]
        table = pa.table({"id": ids, "units": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
                          "dataset": ["synthetic"] * len(lengths)})
        pq.write_table(table, out.path / name)
        names.append(name)
        written += int(lengths.sum()) + 2 * len(lengths)
        utterances += len(lengths)
    out.write_manifest({"status": "complete", "stage": "extract", "key": out.key, "outputs": {"units": names}})
    return utterances


TRAIN_READER = """
import json, sys, time
import numpy as np
from slam_ray.lm.packed import PackedWindows
from slam_ray.stages.train import WindowBatches
windows = PackedWindows(sys.argv[1], "train")
data = WindowBatches(windows, 16, rank=0, world=1, seed=0)
start = time.perf_counter()
for i in range(data.per_epoch):
    batch = data.batch(i).astype(np.int64)
print(json.dumps({"windows": len(windows), "batches": data.per_epoch, "seconds": time.perf_counter() - start}))
"""


# The alternative the data-path issue asked to measure: the same windows streamed by Ray Data into the worker
# (`iter_torch_batches` with a local shuffle buffer), in a process of its own with a local Ray.
RAY_DATA_READER = """
import json, sys, time
from pathlib import Path
import ray, ray.data
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
files = sorted(str(p) for p in (Path(sys.argv[1]) / "train").glob("part-*.npy") if not p.name.endswith(".starts.npy"))
ds = ray.data.read_numpy(files)
start, windows = time.perf_counter(), 0
for batch in ds.iter_torch_batches(batch_size=16, local_shuffle_buffer_size=4096, local_shuffle_seed=0):
    windows += len(batch["data"])
print(json.dumps({"windows": windows, "seconds": time.perf_counter() - start}))
"""


def reader_memory(script: str, pack_root: Path) -> tuple[int, int, dict]:
    """Run a reader script; its peak anonymous memory and that of any Ray worker it started."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(pack_root)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    with PeakAnon(proc.pid) as peak:
        out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"reader failed ({proc.returncode})")
    return peak.driver, peak.workers, json.loads(out.strip().splitlines()[-1])


def output_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of the index and of every training and validation shard."""
    import hashlib

    files = [folder / "index.json", *sorted((folder / "train").iterdir()), *sorted((folder / "val").iterdir())]
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def one_size(n_tokens: int, workers: int, shard_tokens: int, cores: int, ray_data_reader: bool) -> dict:
    from slam_ray.config import load_experiment
    from slam_ray.stages.pack import pack

    with tempfile.TemporaryDirectory() as tmp:
        exp = load_experiment("quickstart", [f"workdir={tmp}", "stages=[extract, pack]", "pack.context_len=1024",
                                             f"pack.num_workers={workers}", f"pack.shard_tokens={shard_tokens}"])
        utterances = write_extract_output(exp, n_tokens)
        import ray

        from slam_ray.core.runner import init_ray

        init_ray(exp)  # started before timing: a pipeline's pack finds Ray up (extract started it)
        with PeakAnon() as peak:
            out = pack(exp)
        manifest = json.loads(out.manifest_path.read_text())
        written = output_digest(out.path)
        # Again in this process, the output removed: Ray Data now warm, as in a pipeline's pack (extract used it
        # in the same driver). The first run paid Ray Data's first use in a process (~3 s here).
        shutil.rmtree(out.path)
        again = json.loads(pack(exp).manifest_path.read_text())
        if output_digest(out.path) != written:
            raise SystemExit("a second pack of the same inputs wrote other shards: pack is not deterministic")
        ray.shutdown()
        tokens = manifest["counts"]["train_tokens"] + manifest["counts"]["val_tokens"]
        seconds = manifest["timings"]["stats"] + manifest["timings"]["pack"]
        warm_seconds = again["timings"]["stats"] + again["timings"]["pack"]
        reader_peak, _, reader = reader_memory(TRAIN_READER, out.path)
        extra = {}
        if ray_data_reader:
            own, ray_workers, streamed = reader_memory(RAY_DATA_READER, out.path)
            extra = {"ray_data_reader_anon_mb": round(own / 2**20, 1),
                     "ray_data_reader_workers_anon_mb": round(ray_workers / 2**20, 1),
                     "ray_data_reader_s": round(streamed["seconds"], 2), "ray_data_reader_windows": streamed["windows"]}
        return {**extra, "tokens": tokens, "utterances": utterances, "shards": manifest["counts"]["shards"],
                "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds),
                "tokens_per_s_per_core": round(tokens / seconds / min(workers, cores)),
                "phases_s": {k: manifest["timings"][k] for k in ("stats", "pack")},
                "warm_seconds": round(warm_seconds, 2),
                "warm_tokens_per_s_per_core": round(tokens / warm_seconds / min(workers, cores)),
                "driver_anon_mb": round(peak.driver / 2**20, 1), "worker_anon_mb": round(peak.workers / 2**20, 1),
                "train_reader_anon_mb": round(reader_peak / 2**20, 1), "train_reader_windows": reader["windows"],
                "train_reader_s": round(reader["seconds"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[10e6, 100e6], help="corpus sizes in tokens")
    parser.add_argument("--workers", type=int, default=2, help="pack.num_workers")
    parser.add_argument("--shard-tokens", type=int, default=1 << 22, help="pack.shard_tokens")
    parser.add_argument("--ray-data-reader", action="store_true",
                        help="also stream the windows through Ray Data's iter_torch_batches (the alternative reader)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    results = {}
    for size in args.sizes:
        figures = one_size(int(size), args.workers, args.shard_tokens, cores, args.ray_data_reader)
        print(f"{size:.0e} tokens: {json.dumps(figures)}", flush=True)
        results[f"{size:.0e}"] = figures
    sizes = list(results.values())
    growth = {k: round(sizes[-1][k] / max(sizes[0][k], 1e-9), 3)
              for k in ("driver_anon_mb", "worker_anon_mb", "train_reader_anon_mb")}
    print(json.dumps({"sizes": results, "memory_ratio_largest_to_smallest": growth, "workers": args.workers,
                      "cores": cores, "shard_tokens": args.shard_tokens}))


if __name__ == "__main__":
    main()
