"""Speech tokenisers: frame features -> k-means units, behind one interface.

- `logmel`: log-mel frames at `frame_rate` Hz (25 Hz = hop 640 at 16 kHz), standardised per dimension. Needs
  no download; GSLM evaluated exactly such a log-mel + k-means baseline.
- `hubert`: hidden states of layer `layer` of any transformers `HubertModel` (HF id or local path), running
  only the layers up to the one read.

Frame count convention (mHuBERT's): `n_frames = n_samples // hop`, so 14.085 s at 25 Hz -> 352 frames.
A fitted tokeniser is a folder: `tokenizer.json` (its config), `centroids.npy`, `feature_norm.npz`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from slam_ray.audio import TARGET_SAMPLE_RATE
from slam_ray.config import TokenizerConfig
from slam_ray.errors import SlamError
from slam_ray.units import dedup


class LogMelFeatures:
    def __init__(self, frame_rate: int = 25, n_mels: int = 80, sample_rate: int = TARGET_SAMPLE_RATE) -> None:
        import torchaudio

        self.hop = sample_rate // frame_rate
        self.transform = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=max(1024, 2 * self.hop), hop_length=self.hop, n_mels=n_mels, center=True
        )

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        import torch

        n_frames = len(audio) // self.hop
        if n_frames == 0:
            raise ValueError(f"audio is shorter than one frame ({len(audio)} samples < hop {self.hop})")
        with torch.no_grad():
            mel = self.transform(torch.from_numpy(audio))  # (n_mels, n_frames + 1) with center=True
        return torch.log(mel[:, :n_frames] + 1e-6).T.numpy()


class HubertFeatures:
    def __init__(self, model: str, layer: int, device: str | None = None) -> None:
        import torch
        from transformers import HubertModel

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            hubert = HubertModel.from_pretrained(model)
        except OSError as e:
            raise SlamError(f"cannot load HubertModel {model!r} (HF id in the local cache, or a folder): {e}") from e
        if layer > hubert.config.num_hidden_layers:
            raise SlamError(f"tokenizer.layer={layer} but {model} has {hubert.config.num_hidden_layers} layers")
        hubert.encoder.layers = hubert.encoder.layers[:layer]  # never compute the layers above the one read
        self.model = hubert.eval().to(self.device)
        self.layer = layer

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(audio).to(self.device)[None]
            hidden = self.model(x, output_hidden_states=True).hidden_states[self.layer]
        return hidden[0].float().cpu().numpy()


def make_features(cfg: TokenizerConfig):
    if cfg.kind == "logmel":
        return LogMelFeatures(cfg.frame_rate, cfg.n_mels)
    assert cfg.model is not None and cfg.layer is not None
    return HubertFeatures(cfg.model, cfg.layer)


def fit_kmeans(features: list[np.ndarray], cfg: TokenizerConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit (centroids, mean, std) on a sample of frames with scikit-learn's MiniBatchKMeans."""
    from sklearn.cluster import MiniBatchKMeans

    frames = np.concatenate(features).astype(np.float32)
    rng = np.random.default_rng(cfg.seed)
    if len(frames) > cfg.fit_frames:
        frames = frames[rng.choice(len(frames), cfg.fit_frames, replace=False)]
    if len(frames) < cfg.n_units:
        raise SlamError(f"only {len(frames)} frames to fit {cfg.n_units} k-means units; give more audio or fewer units")
    mean = frames.mean(0)
    std = frames.std(0) + 1e-5
    kmeans = MiniBatchKMeans(n_clusters=cfg.n_units, random_state=cfg.seed, batch_size=4096, n_init=3,
                             max_iter=100, reassignment_ratio=0.01)
    kmeans.fit((frames - mean) / std)
    return kmeans.cluster_centers_.astype(np.float32), mean.astype(np.float32), std.astype(np.float32)


class UnitTokenizer:
    """features -> standardise -> nearest centroid (a matmul-argmin) -> optional de-duplication."""

    def __init__(self, cfg: TokenizerConfig, centroids: np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
        self.cfg, self.features = cfg, make_features(cfg)
        self.centroids, self.mean, self.std = centroids, mean, std
        self._c_sq = (centroids**2).sum(1)

    def assign(self, feats: np.ndarray) -> np.ndarray:
        x = (feats - self.mean) / self.std
        dist = self._c_sq[None, :] - 2.0 * x @ self.centroids.T  # |x|^2 is constant per row
        return dist.argmin(1)

    def encode(self, audio: np.ndarray) -> dict[str, np.ndarray | int]:
        frames = self.assign(self.features(audio))
        units, durations = dedup(frames) if self.cfg.dedup else (frames, np.ones_like(frames))
        return {"units": units.astype(np.uint16), "durations": durations.astype(np.uint16), "n_frames": len(frames)}

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
        """Pre-fitted centroids from `cfg.centroids` (.npy, features used unstandardised, as TWIST/slamkit do)."""
        assert cfg.centroids is not None
        path = Path(cfg.centroids)
        if path.suffix != ".npy" or not path.is_file():
            raise SlamError(f"extract.tokenizer.centroids {cfg.centroids!r} is not an existing .npy file")
        centroids = np.load(path).astype(np.float32)
        if centroids.shape[0] != cfg.n_units:
            raise SlamError(f"{path} holds {centroids.shape[0]} centroids but tokenizer.n_units={cfg.n_units}")
        dim = centroids.shape[1]
        return cls(cfg, centroids, np.zeros(dim, np.float32), np.ones(dim, np.float32))


# --- parallel encoding (Ray Data actors), shared by `extract` and by `eval` for its spoken pairs ----------------


class EncodeActor:
    def __init__(self, tokenizer_dir: str) -> None:
        from slam_ray.parallel import limit_threads

        limit_threads()
        self.tokenizer = UnitTokenizer.load(tokenizer_dir)

    def __call__(self, batch):  # pandas DataFrame in and out
        import pandas as pd

        from slam_ray.audio import decode_audio
        from slam_ray.parallel import error_row

        out = []
        for row in batch.to_dict("records"):
            base = {k: row.get(k, "") for k in ("id", "path", "text", "speaker", "dataset")}
            try:
                audio = decode_audio(row["path"])
                enc = self.tokenizer.encode(audio)
                seconds = len(audio) / TARGET_SAMPLE_RATE
                out.append({**base, "units": enc["units"].tolist(), "durations": enc["durations"].tolist(),
                            "n_frames": enc["n_frames"], "audio_seconds": seconds, "seg_start": 0.0,
                            "seg_end": seconds, "error": None})
            except Exception as e:
                out.append({**error_row(base, e), "units": [], "durations": [], "n_frames": 0,
                            "audio_seconds": 0.0, "seg_start": 0.0, "seg_end": 0.0})
        return pd.DataFrame(out)


def iter_encoded(exp, rows: list[dict], tokenizer_dir: str | Path, num_actors: int, batch_size: int,
                 num_gpus: float = 0.0) -> Iterator[dict]:
    """Stream encoded rows (`id`, `path`, `text`, `speaker` plus units, ... and `error`: None or the reason)."""
    from slam_ray.parallel import map_rows

    for df in map_rows(exp, rows, EncodeActor, {"tokenizer_dir": str(tokenizer_dir)}, num_actors, batch_size, num_gpus):
        for rec in df.to_dict("records"):
            if not isinstance(rec.get("error"), str):
                rec["error"] = None
                rec["units"] = [int(u) for u in rec["units"]]
                rec["durations"] = [int(d) for d in rec["durations"]]
            yield rec


def encode_files(exp, rows: list[dict], tokenizer_dir: str | Path, num_actors: int, batch_size: int,
                 num_gpus: float = 0.0) -> tuple[list[dict], list[dict]]:
    """Units for every row (`id`, `path`, `text`, `speaker`); returns (good rows, error rows)."""
    good, bad = [], []
    for rec in iter_encoded(exp, rows, tokenizer_dir, num_actors, batch_size, num_gpus):
        (bad if rec["error"] else good).append(rec)
    return good, bad
