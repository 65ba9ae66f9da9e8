"""Frame features of speech, behind one interface: `features(audio) -> (frames, dim)` float32 torch tensor on
the extractor's device, and `features.batch([audio, ...])` for several utterances at once.

- `logmel`: log-mel frames at `frame_rate` Hz (25 Hz = hop 640 at 16 kHz). Needs no download; GSLM evaluated
  exactly such a log-mel + k-means baseline.
- `hubert`: the output of transformer layer `layer` of any transformers `HubertModel` (HF id or local path;
  `slprl/mhubert-base-25hz` layer 11 is the recipe's). The layers above the one read are removed, so they are
  never computed. fp16/bf16 on GPU. A file's features never depend on its batch mates: models whose conv
  front end uses layer norm (HuBERT large) run padded batches with attention masks (the conv frames of a file
  see only its own samples); models with group norm over time (HuBERT/mHuBERT base) would normalise over the
  padding too, so they run one utterance per forward pass.

Frame count convention (mHuBERT's): 14.085 s at 25 Hz -> 352 frames; the conv stack's own arithmetic for HuBERT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from slam_ray.audio import TARGET_SAMPLE_RATE
from slam_ray.config import TokenizerConfig
from slam_ray.errors import SlamError

if TYPE_CHECKING:
    import torch


class LogMelFeatures:
    def __init__(self, frame_rate: int = 25, n_mels: int = 80, sample_rate: int = TARGET_SAMPLE_RATE) -> None:
        import torch
        import torchaudio

        self.device = torch.device("cpu")
        self.hop = sample_rate // frame_rate
        self.transform = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=max(1024, 2 * self.hop), hop_length=self.hop, n_mels=n_mels, center=True
        )

    def __call__(self, audio: np.ndarray) -> torch.Tensor:
        import torch

        n_frames = len(audio) // self.hop
        if n_frames == 0:
            raise ValueError(f"audio is shorter than one frame ({len(audio)} samples < hop {self.hop})")
        with torch.no_grad():
            mel = self.transform(torch.from_numpy(audio))  # (n_mels, n_frames + 1) with center=True
        return torch.log(mel[:, :n_frames] + 1e-6).T.contiguous()

    def batch(self, audios: list[np.ndarray]) -> list[torch.Tensor]:
        return [self(a) for a in audios]


class HubertFeatures:
    def __init__(self, model: str, layer: int, dtype: str = "float32", device: str | None = None,
                 max_batch_samples: int = 16_000 * 200) -> None:
        import torch
        from transformers import HubertModel

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            hubert = HubertModel.from_pretrained(model)
        except OSError as e:
            raise SlamError(f"cannot load HubertModel {model!r} (an HF id in the local cache, or a folder): {e}") from e
        n_layers = hubert.config.num_hidden_layers
        if layer > n_layers:
            raise SlamError(f"extract.tokenizer.layer={layer} but {model} has {n_layers} layers; choose 1..{n_layers}")
        hubert.encoder.layers = hubert.encoder.layers[:layer]  # never compute the layers above the one read
        if hubert.config.do_stable_layer_norm and layer < n_layers:
            hubert.encoder.layer_norm = torch.nn.Identity()  # pre-LN models norm only the last layer's output
        # half precision only where it is fast (GPU); on CPU it would be slower and change the units
        self.dtype = getattr(torch, dtype) if self.device.type == "cuda" else torch.float32
        self.model = hubert.eval().to(self.device, self.dtype)
        self.masked_batches = hubert.config.feat_extract_norm == "layer"
        self.max_batch_samples = max_batch_samples
        # the conv stack's receptive field: shorter input gives no frame
        self.min_samples, stride = 0, 1
        for kernel, step in zip(hubert.config.conv_kernel, hubert.config.conv_stride, strict=True):
            self.min_samples += (kernel - 1) * stride
            stride *= step
        self.min_samples += 1

    def _check(self, audio: np.ndarray) -> None:
        if len(audio) < self.min_samples:
            raise ValueError(f"audio is shorter than one frame ({len(audio)} samples < {self.min_samples})")

    def __call__(self, audio: np.ndarray) -> torch.Tensor:
        import torch

        self._check(audio)
        with torch.inference_mode():
            x = torch.from_numpy(audio).to(self.device, self.dtype)[None]
            return self.model(x).last_hidden_state[0].float()

    def batch(self, audios: list[np.ndarray]) -> list[torch.Tensor]:
        """Features of several utterances: padded batches (longest first, at most `max_batch_samples` padded
        samples each) for layer-norm models, one forward per utterance otherwise."""
        import torch

        if not self.masked_batches:
            return [self(a) for a in audios]
        for a in audios:
            self._check(a)
        out: list[torch.Tensor | None] = [None] * len(audios)
        order = sorted(range(len(audios)), key=lambda i: -len(audios[i]))
        while order:
            width = len(audios[order[0]])
            take = order[: max(1, self.max_batch_samples // width)]
            order = order[len(take) :]
            x = torch.zeros(len(take), width, dtype=self.dtype)
            mask = torch.zeros(len(take), width, dtype=torch.long)
            for row, i in enumerate(take):
                x[row, : len(audios[i])] = torch.from_numpy(audios[i])
                mask[row, : len(audios[i])] = 1
            with torch.inference_mode():
                hidden = self.model(x.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
            lengths = self.model._get_feat_extract_output_lengths(mask.sum(1))
            for row, i in enumerate(take):
                out[i] = hidden[row, : int(lengths[row])].float()
        return out  # type: ignore[return-value]


def make_features(cfg: TokenizerConfig) -> LogMelFeatures | HubertFeatures:
    if cfg.kind == "logmel":
        return LogMelFeatures(cfg.frame_rate, cfg.n_mels)
    assert cfg.model is not None and cfg.layer is not None
    return HubertFeatures(cfg.model, cfg.layer, cfg.dtype)
