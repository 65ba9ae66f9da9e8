"""Speech tokenisers: frame features (`slam_ray/features.py`) -> nearest k-means centroid -> de-duplicated units.

Centroids are fitted here (k-means++ and Lloyd in torch on a sample of standardised frames) or loaded from
`.npy`, safetensors, or slamkit/fairseq's sklearn k-means `.bin` (a pickle: only with `trust_pickle: true`);
pre-fitted centroids are applied to raw features, as TWIST/slamkit do. Units are assigned as one matmul-argmin
on the extractor's device. A fitted tokeniser is a folder: `tokenizer.json` (its config), `centroids.npy`,
`feature_norm.npz`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from slam_ray.audio import TARGET_SAMPLE_RATE
from slam_ray.config import TokenizerConfig
from slam_ray.errors import SlamError
from slam_ray.features import make_features
from slam_ray.storage import localize
from slam_ray.units import dedup

PICKLE_SUFFIXES = {".bin", ".pkl", ".pickle", ".joblib"}


def load_centroids(cfg: TokenizerConfig) -> np.ndarray:
    """(n_units, dim) float32 centroids from `cfg.centroids`: .npy, .safetensors (tensor `centroids`, or its only
    tensor), or a pickled sklearn KMeans (slamkit/fairseq's `km.bin`; needs `trust_pickle`)."""
    assert cfg.centroids is not None
    path = Path(cfg.centroids)
    if not path.is_file():
        raise SlamError(f"extract.tokenizer.centroids {cfg.centroids!r} is not an existing file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        centroids = np.load(path, allow_pickle=False)
    elif suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(path)
        if "centroids" not in tensors and len(tensors) != 1:
            raise SlamError(f"{path} holds tensors {sorted(tensors)}; name the centroids tensor 'centroids'")
        centroids = tensors.get("centroids", next(iter(tensors.values())))
    elif suffix in PICKLE_SUFFIXES:
        if not cfg.trust_pickle:
            raise SlamError(f"{path} is a pickle (slamkit/fairseq's sklearn k-means): loading it runs code stored in the "
                            "file. Set extract.tokenizer.trust_pickle=true only for a file you trust, or convert it "
                            "once to .npy (np.save('km.npy', joblib.load('km.bin').cluster_centers_))")
        import joblib

        kmeans = joblib.load(path)
        if not hasattr(kmeans, "cluster_centers_"):
            raise SlamError(f"{path} holds a {type(kmeans).__name__}, not a fitted sklearn k-means (no cluster_centers_)")
        centroids = kmeans.cluster_centers_
    else:
        raise SlamError(f"extract.tokenizer.centroids {path.name!r}: unknown format; give .npy, .safetensors or a "
                        f"sklearn k-means pickle ({', '.join(sorted(PICKLE_SUFFIXES))})")
    centroids = np.asarray(centroids, dtype=np.float32)
    if centroids.ndim != 2 or centroids.shape[0] != cfg.n_units:
        raise SlamError(f"{path} holds centroids of shape {centroids.shape} but extract.tokenizer.n_units={cfg.n_units}")
    return centroids


def _nearest(x, centroids, chunk: int = 65_536):
    """(index, squared distance) of every row's nearest centroid: one matmul-argmin per chunk of rows."""
    import torch

    c_sq = (centroids**2).sum(1)
    index, dist = [], []
    for part in x.split(chunk):
        best = (c_sq[None, :] - 2.0 * part @ centroids.T).min(1)  # |x|^2 is constant per row: added after
        index.append(best.indices)
        dist.append((best.values + (part**2).sum(1)).clamp(min=0))
    return torch.cat(index), torch.cat(dist)


def _cluster_sums(x, assign, n_units: int, chunk: int = 65_536):
    """Per-cluster sums of the rows of `x`. On CPU `index_add_`; on GPU its atomic adds would make a seeded fit
    differ run to run in the last bits (seen on an H200), so there one-hot matmuls, which are deterministic."""
    import torch

    if x.device.type == "cpu":
        return torch.zeros(n_units, x.shape[1], dtype=x.dtype).index_add_(0, assign, x)
    sums = torch.zeros(n_units, x.shape[1], dtype=x.dtype, device=x.device)
    for part, labels in zip(x.split(chunk), assign.split(chunk), strict=True):
        sums += torch.nn.functional.one_hot(labels, n_units).to(x.dtype).T @ part
    return sums


def fit_kmeans(features: list[np.ndarray], cfg: TokenizerConfig, device: str | None = None,
               max_iter: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit (centroids, mean, std) on a seeded sample of `fit_frames` standardised frames: k-means++ seeding,
    then Lloyd iterations as batched matmul-argmins in torch (on `device`: a GPU when there is one). Plain torch
    also keeps scikit-learn out of the driver: importing it sets KMP_DUPLICATE_LIB_OK / KMP_INIT_AT_FORK in the
    environment, and a process started with those (a Ray job driver was) aborts at its first torch op with
    "oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"."""
    import torch

    frames = np.concatenate(features).astype(np.float32)
    rng = np.random.default_rng(cfg.seed)
    if len(frames) > cfg.fit_frames:
        frames = frames[rng.choice(len(frames), cfg.fit_frames, replace=False)]
    if len(frames) < cfg.n_units:
        raise SlamError(f"only {len(frames)} frames to fit {cfg.n_units} k-means units; give more audio or fewer units")
    mean = frames.mean(0)
    std = frames.std(0) + 1e-5
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.from_numpy((frames - mean) / std).to(device)
    generator = torch.Generator().manual_seed(cfg.seed)
    # k-means++: each new centroid drawn with probability proportional to its squared distance to the chosen ones
    centroids = x[torch.randint(len(x), (1,), generator=generator).to(device)]
    dist = _nearest(x, centroids)[1]
    for _ in range(cfg.n_units - 1):
        pick = torch.multinomial((dist + 1e-12).cpu(), 1, generator=generator).to(device)
        centroids = torch.cat([centroids, x[pick]])
        dist = torch.minimum(dist, _nearest(x, centroids[-1:])[1])
    for _ in range(max_iter):
        assign, dist = _nearest(x, centroids)
        counts = torch.bincount(assign, minlength=cfg.n_units)
        sums = _cluster_sums(x, assign, cfg.n_units)
        updated = sums / counts.clamp(min=1)[:, None]
        empty = (counts == 0).nonzero().flatten()
        if len(empty):  # re-seed an empty cluster with the frames farthest from their centroids
            updated[empty] = x[dist.topk(len(empty)).indices]
        shift = (updated - centroids).norm(dim=1).max().item()
        centroids = updated
        if shift < 1e-4:
            break
    return centroids.cpu().numpy().astype(np.float32), mean.astype(np.float32), std.astype(np.float32)


class UnitTokenizer:
    """features -> standardise -> nearest centroid (a matmul-argmin on the features' device) -> de-duplication."""

    def __init__(self, cfg: TokenizerConfig, centroids: np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
        import torch

        self.cfg, self.features = cfg, make_features(cfg)
        self.centroids, self.mean, self.std = centroids, mean, std
        device = self.features.device
        self._c = torch.from_numpy(centroids).to(device)
        self._mean, self._std = torch.from_numpy(mean).to(device), torch.from_numpy(std).to(device)

    def assign(self, feats) -> np.ndarray:
        """Nearest centroid of every frame (`feats`: a (frames, dim) tensor or array)."""
        import torch

        x = (torch.as_tensor(feats, device=self._c.device) - self._mean) / self._std
        return _nearest(x, self._c)[0].cpu().numpy()

    def _units(self, frames: np.ndarray) -> dict[str, np.ndarray | int]:
        units, durations = dedup(frames) if self.cfg.dedup else (frames, np.ones_like(frames))
        return {"units": units.astype(np.uint16), "durations": durations.astype(np.uint16), "n_frames": len(frames)}

    def encode(self, audio: np.ndarray) -> dict[str, np.ndarray | int]:
        return self._units(self.assign(self.features(audio)))

    def encode_batch(self, audios: list[np.ndarray]) -> list[dict[str, np.ndarray | int]]:
        """The same units as `encode` on each, with the features computed in batches where the model allows."""
        import torch

        features = self.features.batch(audios)
        if not features:
            return []
        # one matmul-argmin and one copy to the host for the whole batch (a copy per file would stall the GPU)
        frames = self.assign(torch.cat(features))
        return [self._units(part) for part in np.split(frames, np.cumsum([len(f) for f in features])[:-1])]

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "centroids.npy", self.centroids)
        np.savez(folder / "feature_norm.npz", mean=self.mean, std=self.std)
        (folder / "tokenizer.json").write_text(self.cfg.model_dump_json(indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> UnitTokenizer:
        folder = Path(folder)
        cfg = TokenizerConfig.model_validate(json.loads((folder / "tokenizer.json").read_text()))
        norm = np.load(folder / "feature_norm.npz")
        return cls(cfg, np.load(folder / "centroids.npy"), norm["mean"], norm["std"])

    @classmethod
    def from_centroids(cls, cfg: TokenizerConfig) -> UnitTokenizer:
        """Pre-fitted centroids from `cfg.centroids`, applied to unstandardised features (as TWIST/slamkit do)."""
        centroids = load_centroids(cfg)
        dim = centroids.shape[1]
        return cls(cfg, centroids, np.zeros(dim, np.float32), np.ones(dim, np.float32))


# --- parallel encoding (Ray Data: decoding tasks -> encoding actors), shared by `extract`, `eval` and `dpo` -----

_FILE_FIELDS = ("id", "path", "text", "speaker", "dataset")


def decode_rows(batch, max_segment_seconds: float | None = None, segmenter: str = "vad"):
    """Ray Data task (CPU): input rows -> one row per segment, 16 kHz float32 samples as bytes in `audio`, or one
    error row for a file that cannot be decoded. Segments are yielded as they are read (a long file never sits
    in memory whole), each held until the next is known, so `n_segments` is set on a file's last row only (0 on
    the others); an error row closes its file too (`n_segments` = segments before it + 1)."""
    import pandas as pd

    from slam_ray.tts import row_segments

    for row in batch.to_dict("records"):
        base = {k: (row.get(k) if isinstance(row.get(k), str) else "") for k in _FILE_FIELDS}
        base["input_id"] = row["id"]
        held, k = None, 0
        try:
            for start, end, audio in row_segments(row, max_segment_seconds, segmenter):
                if held is not None:
                    yield pd.DataFrame([{**held, "id": f"{row['id']}@{k - 1:04d}", "n_segments": 0}])
                held = {**base, "seg_start": start, "seg_end": end, "audio_seconds": end - start,
                        "audio": audio.astype(np.float32, copy=False).tobytes(), "error": None}
                k += 1
        except Exception as e:
            if held is not None:  # segments before the failure still count, so the driver can close the file
                yield pd.DataFrame([{**held, "id": f"{row['id']}@{k - 1:04d}", "n_segments": 0}])
            yield pd.DataFrame([{**base, "seg_start": 0.0, "seg_end": 0.0, "audio_seconds": 0.0, "audio": b"",
                                 "error": str(e) or type(e).__name__, "n_segments": k + 1}])
            continue
        yield pd.DataFrame([{**held, "id": f"{row['id']}@{k - 1:04d}" if k > 1 else row["id"], "n_segments": k}])


class EncodeActor:
    """Ray Data actor: decoded segment rows -> the same rows with `units`, `durations`, `n_frames` (audio dropped).
    Segments are encoded in batches of about `flush_seconds` of audio (the model sees padded batches whose
    results equal each segment alone); a segment that fails is an error row and every other still comes through."""

    def __init__(self, tokenizer_dir: str, flush_seconds: float | None = None,
                 gpu_batch_seconds: float | None = None) -> None:
        from slam_ray.parallel import limit_threads

        limit_threads()
        self.tokenizer = UnitTokenizer.load(localize(tokenizer_dir))  # fetched to this node from a bucket
        features = self.tokenizer.features
        if flush_seconds is None:  # a GPU needs big batches to choose from (bench/gpu.py)
            flush_seconds = 800.0 if features.device.type == "cuda" else 200.0
        if gpu_batch_seconds is not None and hasattr(features, "max_batch_samples"):  # HuBERT's padded batches
            features.max_batch_samples = int(gpu_batch_seconds * TARGET_SAMPLE_RATE)
        self.flush_samples = int(flush_seconds * TARGET_SAMPLE_RATE)

    def _encode(self, audios: list[np.ndarray]) -> list[dict | str]:
        try:
            return self.tokenizer.encode_batch(audios)
        except Exception:  # find the culprit(s): one at a time
            out: list[dict | str] = []
            for audio in audios:
                try:
                    out.append(self.tokenizer.encode(audio))
                except Exception as e:
                    out.append(str(e) or type(e).__name__)
            return out

    def __call__(self, batch):  # pandas DataFrame in and out
        import pandas as pd

        rows = batch.to_dict("records")
        todo = [i for i, r in enumerate(rows) if not isinstance(r.get("error"), str)]
        results: dict[int, dict | str] = {}
        group: list[int] = []
        samples = 0
        for n, i in enumerate(todo):
            group.append(i)
            samples += len(rows[i]["audio"]) // 4  # float32 bytes
            if samples >= self.flush_samples or n == len(todo) - 1:
                audios = [np.frombuffer(rows[j]["audio"], dtype=np.float32).copy() for j in group]  # writable for torch
                results.update(zip(group, self._encode(audios), strict=True))
                group, samples = [], 0
        out = []
        for i, row in enumerate(rows):
            row = {k: v for k, v in row.items() if k != "audio"}
            enc = results.get(i, row.get("error"))
            if isinstance(enc, dict):
                out.append({**row, "units": enc["units"].tolist(), "durations": enc["durations"].tolist(),
                            "n_frames": enc["n_frames"], "error": None})
            else:
                out.append({**row, "units": [], "durations": [], "n_frames": 0, "error": enc})
        return pd.DataFrame(out)


def iter_encoded(exp, rows: list[dict], tokenizer_dir: str | Path, num_actors: int, batch_size: int,
                 num_gpus: float = 0.0) -> Iterator[dict]:
    """Stream encoded files as they complete: a file's rows (`id`, `path`, `text`, `speaker`, `dataset`,
    `input_id`, `seg_start`, `seg_end`, `audio_seconds`, `units`, `durations`, `n_frames`, `n_segments`,
    `error` None), one per segment — a file longer than `extract.max_segment_seconds` is `<id>@0000`, ... — or
    one error row (`error`: the reason) when any part of it fails. Decoding runs as Ray tasks on CPUs, feeding
    the encoding actors (on GPUs with `num_gpus`)."""
    from slam_ray.parallel import map_rows

    decode = {"max_segment_seconds": exp.extract.max_segment_seconds, "segmenter": exp.extract.segmenter}
    parts: dict[str, list[dict]] = {}
    expected: dict[str, int] = {}
    actor = {"tokenizer_dir": str(tokenizer_dir), "gpu_batch_seconds": exp.extract.gpu_batch_seconds}
    for df in map_rows(exp, rows, EncodeActor, actor, num_actors, batch_size,
                       num_gpus, prepare=(decode_rows, decode, exp.extract.decode_cpus)):
        for rec in df.to_dict("records"):
            uid = rec["input_id"]
            parts.setdefault(uid, []).append(rec)
            if int(rec["n_segments"]):
                expected[uid] = int(rec["n_segments"])
            if len(parts[uid]) != expected.get(uid):
                continue
            done = sorted(parts.pop(uid), key=lambda r: r["seg_start"])
            del expected[uid]
            failed = next((r for r in done if isinstance(r.get("error"), str)), None)
            if failed is not None:
                yield {**failed, "id": uid, "n_segments": 1, "units": [], "durations": [], "audio_seconds": 0.0}
                continue
            for r in done:
                yield {**r, "n_segments": len(done), "error": None, "units": [int(u) for u in r["units"]],
                       "durations": [int(d) for d in r["durations"]]}


def encode_files(exp, rows: list[dict], tokenizer_dir: str | Path, num_actors: int, batch_size: int,
                 num_gpus: float = 0.0) -> tuple[list[dict], list[dict]]:
    """Units for every row (`id`, `path`, `text`, `speaker`); returns (good rows, error rows)."""
    good, bad = [], []
    for rec in iter_encoded(exp, rows, tokenizer_dir, num_actors, batch_size, num_gpus):
        (bad if rec["error"] else good).append(rec)
    return good, bad


def encode_spoken(exp, items: list[dict], tokenizer_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """Units of texts spoken with the experiment's synth engine — items with `id`, `text`, `voice`, `speed` (and
    optionally `noise`, `seed`) — in one Ray Data pass: each text is spoken inside a decoding task straight
    into memory (a 16-bit FLAC round trip, so its units are those of the file synth would write) and encoded by
    the actors; no audio file is written. The `hf` backend wants its GPU actors: its items (which then need a
    `path`) are spoken into files first. Returns (good rows, error rows) as `encode_files` does."""
    from slam_ray.tts import check_backend, speak_items

    synth = exp.synth
    if synth.backend == "hf":
        spoken, unspoken = speak_items(exp, items, synth.backend, synth.sample_rate, synth.num_actors, synth.batch_size)
        good, bad = encode_files(exp, spoken, tokenizer_dir, exp.extract.num_actors, exp.extract.batch_size,
                                 exp.extract.num_gpus_per_actor)
        return good, unspoken + bad
    check_backend(synth.backend, synth.sample_rate)  # a missing engine fails here, not once per row
    rows = []
    for item in items:
        plan = {"backend": synth.backend, "text": item["text"], "voice": item["voice"], "speed": item["speed"],
                "noise": float(item.get("noise") or 0.0), "seed": int(item.get("seed") or 0),
                "sample_rate": synth.sample_rate}
        rows.append({"id": item["id"], "path": "", "text": item["text"], "speaker": item.get("speaker") or item["voice"],
                     "speak": json.dumps(plan)})
    return encode_files(exp, rows, tokenizer_dir, exp.extract.num_actors, exp.extract.batch_size,
                        exp.extract.num_gpus_per_actor)
