"""Frame features of speech, behind one interface: `features(audio) -> (frames, dim)` float32 torch tensor on
the extractor's device, and `features.batch([audio, ...])` for several utterances at once.

- `logmel`: log-mel frames at `frame_rate` Hz (25 Hz = hop 640 at 16 kHz). Needs no download; GSLM evaluated
  exactly such a log-mel + k-means baseline.
- `hubert`: the output of transformer layer `layer` of any transformers `HubertModel` (HF id or local path;
  `slprl/mhubert-base-25hz` layer 11 is the recipe's). The layers above the one read are removed, so they are
  never computed. fp16/bf16 on GPU. On GPU, padded batches of similar lengths with attention masks (on CPU a
  batch costs what its files cost one by one plus the padding, so files go one per forward there). A file's
  features never depend on its batch mates: the conv frames of a file see only its own samples, and in models
  whose first conv is followed by a group norm over time (HuBERT/mHuBERT base, where slamkit's padded batches
  change the units) that norm's statistics are taken over each file's own frames only (`masked_group_norm`).

Frame count convention (mHuBERT's): 14.085 s at 25 Hz -> 352 frames; the conv stack's own arithmetic for HuBERT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from slam_ray.config import TokenizerConfig
from slam_ray.errors import SlamError
from slam_ray.speech.audio import TARGET_SAMPLE_RATE

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


MIN_FILL = 0.75  # padded batches (on CPU) hold files of at least this share of the longest one's length


def masked_group_norm(norm: torch.nn.GroupNorm) -> torch.nn.Module:
    """HuBERT-base's first-conv GroupNorm (one group per channel, statistics over time) restricted to each
    row's valid frames, so padding never leaks into a file's features. Its `valid` (frames per row) is set
    around each padded forward; with `valid` None it is the plain GroupNorm."""
    import torch

    class MaskedGroupNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.valid = norm, None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.valid is None:
                return self.norm(x)
            n = self.valid.to(x.device)[:, None, None]
            mask = torch.arange(x.shape[-1], device=x.device)[None, None] < n
            xf = x.float()
            mean = (xf * mask).sum(-1, keepdim=True) / n
            var = (((xf - mean) * mask) ** 2).sum(-1, keepdim=True) / n
            y = (xf - mean) * torch.rsqrt(var + self.norm.eps)
            return (y * self.norm.weight.float()[:, None] + self.norm.bias.float()[:, None]).to(x.dtype)

    return MaskedGroupNorm()


class HubertFeatures:
    def __init__(self, model: str, layer: int, dtype: str = "float32", device: str | None = None,
                 max_batch_samples: int = 16_000 * 200, batched: bool | None = None) -> None:
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
        self.group_norm = None
        if hubert.config.feat_extract_norm == "group":
            first = hubert.feature_extractor.conv_layers[0]
            self.group_norm = first.layer_norm = masked_group_norm(first.layer_norm)
        self.model = hubert.eval().to(self.device, self.dtype)
        self.max_batch_samples = max_batch_samples
        gpu = self.device.type == "cuda"
        self.batched = gpu if batched is None else batched
        # GPU batches: widths rounded up to whole seconds and rows to multiples of 4 so that shapes repeat (a
        # shape new to cuDNN costs plan building; autotuning, cudnn.benchmark, costs far more), and files down to
        # half the longest one's length. bench/gpu.py on an H100 measures these settings (docs/performance.md).
        self.width_quantum, self.row_quantum = (TARGET_SAMPLE_RATE, 4) if gpu else (1, 1)
        self.min_fill = 0.5 if gpu else MIN_FILL
        self.use_cudnn, self.cudnn_benchmark = True, False
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
        """Features of several utterances, the same as one forward per utterance: on GPU (or `batched`) in
        padded batches, longest first, at most `max_batch_samples` padded samples each (filler rows included,
        unless one file alone is longer), and no file shorter than `min_fill` of its batch's longest (bounded
        padding waste)."""
        import torch

        if not self.batched:
            return [self(a) for a in audios]
        conv = self.model.feature_extractor.conv_layers[0].conv
        for a in audios:
            self._check(a)
        out: list[torch.Tensor | None] = [None] * len(audios)
        order = sorted(range(len(audios)), key=lambda i: -len(audios[i]))
        while order:
            longest = len(audios[order[0]])
            width = -(-longest // self.width_quantum) * self.width_quantum
            # filler rows count too: a forward's padded samples (rows x width) stay within max_batch_samples
            fit = max(1, self.max_batch_samples // width)
            if fit >= self.row_quantum:
                fit -= fit % self.row_quantum
            take = [i for i in order[:fit] if len(audios[i]) >= self.min_fill * longest]
            order = order[len(take) :]
            rows = -(-len(take) // self.row_quantum) * self.row_quantum
            if rows > fit:  # under one quantum of rows fits: no filler
                rows = len(take)
            x = torch.zeros(rows, width, dtype=self.dtype)
            mask = torch.ones(rows, width, dtype=torch.long)  # filler rows: silence of the full width
            for row, i in enumerate(take):
                x[row, : len(audios[i])] = torch.from_numpy(audios[i])
                mask[row, len(audios[i]) :] = 0
            if self.group_norm is not None:
                self.group_norm.valid = (mask.sum(1) - conv.kernel_size[0]) // conv.stride[0] + 1
            try:
                with torch.inference_mode(), torch.backends.cudnn.flags(
                        enabled=self.use_cudnn, benchmark=self.cudnn_benchmark,
                        deterministic=torch.backends.cudnn.deterministic, allow_tf32=torch.backends.cudnn.allow_tf32):
                    hidden = self.model(x.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
            finally:
                if self.group_norm is not None:
                    self.group_norm.valid = None
            lengths = self.model._get_feat_extract_output_lengths(mask.sum(1))
            for row, i in enumerate(take):
                out[i] = hidden[row, : int(lengths[row])].float()
        return out  # type: ignore[return-value]


def make_features(cfg: TokenizerConfig) -> LogMelFeatures | HubertFeatures:
    if cfg.kind == "logmel":
        return LogMelFeatures(cfg.frame_rate, cfg.n_mels)
    assert cfg.model is not None and cfg.layer is not None
    return HubertFeatures(cfg.model, cfg.layer, cfg.dtype)
