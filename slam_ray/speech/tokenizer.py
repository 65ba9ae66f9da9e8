"""Speech tokenisers: frame features (`slam_ray/speech/features.py`) -> nearest k-means centroid -> de-duplicated units.

Centroids are fitted here (k-means++ and Lloyd in torch on a sample of standardised frames) or loaded from
`.npy`, safetensors, or slamkit/fairseq's sklearn k-means `.bin` (a pickle: only with `trust_pickle: true`);
pre-fitted centroids are applied to raw features, as TWIST/slamkit do. Units are assigned as one matmul-argmin
on the extractor's device. A fitted tokeniser is a folder: `tokenizer.json` (its config), `centroids.npy`,
`feature_norm.npz`. Encoding many files in parallel (Ray Data) is `slam_ray/parallel/encode.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slam_ray.config import TokenizerConfig
from slam_ray.errors import SlamError
from slam_ray.speech.features import make_features
from slam_ray.speech.units import dedup

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
        best = torch.addmm(c_sq, part, centroids.T, alpha=-2.0).min(1)  # |x|^2 is constant per row: added after
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
