"""Units -> waveform: the unit HiFi-GAN ("CodeHiFiGAN") of speech-resynthesis / textlesslib / slamkit.

Loads their checkpoints by path: a folder holding `config.json` and the generator weights (`g_<step>`, or any
`*.pt` / `*.pth`; a dict with a `generator` entry or a bare state dict), or the weights file itself with
`config.json` beside it. Weight-normalised convolutions (`weight_g`/`weight_v`) are folded into plain weights
on load, which is what inference does anyway. Supported: unit embedding, optional duration predictor (for
de-duplicated units), optional speaker embedding (speaker 0 by default); f0-conditioned vocoders are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from slam_ray.errors import SlamError

LRELU_SLOPE = 0.1


def _padding(kernel: int, dilation: int = 1) -> int:
    return (kernel * dilation - dilation) // 2


class ResBlock(nn.Module):
    """HiFi-GAN's ResBlock1: three dilated convolutions, each followed by a plain one, with residuals."""

    def __init__(self, channels: int, kernel: int, dilations: list[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, 1, dilation=d, padding=_padding(kernel, d))
                                    for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, 1, padding=_padding(kernel))
                                    for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2, strict=True):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class DurationPredictor(nn.Module):
    """Log-duration per unit (two conv + layer-norm blocks and a projection), as in textlesslib."""

    def __init__(self, embed_dim: int, hidden: int, kernel: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv1d(embed_dim, hidden, kernel, padding=(kernel - 1) // 2), nn.ReLU())
        self.ln1 = nn.LayerNorm(hidden)
        self.conv2 = nn.Sequential(nn.Conv1d(hidden, hidden, kernel, padding=1), nn.ReLU())
        self.ln2 = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T)
        x = self.ln1(self.conv1(x.transpose(1, 2)).transpose(1, 2))
        x = self.ln2(self.conv2(x.transpose(1, 2)).transpose(1, 2))
        return self.proj(x).squeeze(-1)


class UnitHifiGan(nn.Module):
    """The CodeHiFiGAN generator; parameter names match the released checkpoints."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        if cfg.get("f0"):
            raise SlamError("this vocoder is conditioned on f0, which unit LMs do not generate: use a units-only one")
        self.cfg = cfg
        channels = cfg["upsample_initial_channel"]
        self.dict = nn.Embedding(cfg["num_embeddings"], cfg["embedding_dim"])
        self.spkr = nn.Embedding(cfg.get("num_speakers", 200), cfg["embedding_dim"]) if cfg.get("multispkr") else None
        dur = cfg.get("dur_predictor_params")
        self.dur_predictor = (DurationPredictor(dur["encoder_embed_dim"], dur["var_pred_hidden_dim"],
                                                dur["var_pred_kernel_size"]) if dur else None)
        self.conv_pre = nn.Conv1d(cfg.get("model_in_dim", cfg["embedding_dim"]), channels, 7, 1, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(channels // 2**i, channels // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg["upsample_rates"], cfg["upsample_kernel_sizes"], strict=True)))
        self.resblocks = nn.ModuleList(
            ResBlock(channels // 2 ** (i + 1), k, d) for i in range(len(self.ups))
            for k, d in zip(cfg["resblock_kernel_sizes"], cfg["resblock_dilation_sizes"], strict=True))
        self.conv_post = nn.Conv1d(channels // 2 ** len(self.ups), 1, 7, 1, padding=3)
        self.n_kernels = len(cfg["resblock_kernel_sizes"])

    @property
    def sample_rate(self) -> int:
        return int(self.cfg.get("sampling_rate", 16_000))

    @torch.no_grad()
    def forward(self, units: torch.Tensor, speaker: int = 0) -> torch.Tensor:
        """units (T,) long -> waveform (samples,) in [-1, 1]."""
        x = self.dict(units[None]).transpose(1, 2)  # (1, C, T)
        if self.dur_predictor is not None:  # de-duplicated units: repeat each by its predicted duration
            repeats = torch.clamp(torch.round(torch.exp(self.dur_predictor(x.transpose(1, 2))) - 1).long(), min=1)
            x = torch.repeat_interleave(x, repeats.view(-1), dim=2)
        if self.spkr is not None:
            x = torch.cat([x, self.spkr(torch.tensor([[speaker]])).transpose(1, 2).expand(-1, -1, x.shape[-1])], 1)
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            x = sum(self.resblocks[i * self.n_kernels + j](x) for j in range(self.n_kernels)) / self.n_kernels
        return torch.tanh(self.conv_post(F.leaky_relu(x)))[0, 0]


def fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`<name>.weight_g` + `<name>.weight_v` -> `<name>.weight = g * v / |v|` (norm over all but dim 0)."""
    out = {}
    for key, value in state.items():
        if key.endswith(".weight_v"):
            name = key[: -len(".weight_v")]
            g = state[f"{name}.weight_g"]
            norm = value.flatten(1).norm(dim=1).view(-1, *([1] * (value.dim() - 1)))
            out[f"{name}.weight"] = value * (g / norm)
        elif not key.endswith(".weight_g"):
            out[key] = value
    return out


def load_vocoder(path: str | Path) -> UnitHifiGan:
    path = Path(path).expanduser()
    folder = path if path.is_dir() else path.parent
    config = folder / "config.json"
    if not config.is_file():
        raise SlamError(f"vocoder {path}: no config.json beside the weights (a CodeHiFiGAN config is needed)")
    if path.is_dir():
        weights = sorted([*folder.glob("g_*"), *folder.glob("*.pt"), *folder.glob("*.pth")])
        if not weights:
            raise SlamError(f"vocoder {path}: no generator weights (g_<step>, *.pt or *.pth) in the folder")
        path = weights[-1]
    model = UnitHifiGan(json.loads(config.read_text()))
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("generator", state)
    try:
        missing, unexpected = model.load_state_dict(fold_weight_norm(state), strict=False)
    except RuntimeError as e:  # shapes differ
        raise SlamError(f"vocoder {path} does not match its config.json: {e}") from None
    if missing or unexpected:
        raise SlamError(f"vocoder {path} does not match its config.json: missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}")
    return model.eval()


def vocode(model: UnitHifiGan, units: list[int]) -> np.ndarray:
    if not units:
        return np.zeros(0, dtype=np.float32)
    vocab = model.dict.num_embeddings
    if max(units) >= vocab:
        raise SlamError(f"unit {max(units)} is outside the vocoder's {vocab} units: was it trained on these units?")
    return model(torch.tensor(units, dtype=torch.long)).numpy().astype(np.float32)
