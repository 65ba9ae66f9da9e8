"""The unit HiFi-GAN loads a textlesslib-style checkpoint (weight-normalised convolutions, `generator` key)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import TINY_HIFIGAN as TINY
from helpers import save_weight_normed

from slam_ray.errors import SlamError
from slam_ray.speech.vocoder import UnitHifiGan, load_vocoder, vocode


@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
@pytest.mark.parametrize("dur", [False, True])
def test_loads_weight_normed_checkpoint_and_matches_its_forward(tmp_path, dur):
    cfg = {**TINY, **({"dur_predictor_params": {"encoder_embed_dim": 16, "var_pred_hidden_dim": 16,
                                               "var_pred_kernel_size": 3, "var_pred_dropout": 0.5}} if dur else {})}
    torch.manual_seed(0)
    normed = save_weight_normed(UnitHifiGan(cfg), tmp_path / "voc").eval()
    loaded = load_vocoder(tmp_path / "voc")
    units = [3, 7, 7, 1, 19, 0, 4]
    wav = vocode(loaded, units)
    expected = normed(torch.tensor(units)).numpy()
    np.testing.assert_allclose(wav, expected, atol=1e-5)
    assert np.abs(wav).max() <= 1.0
    if not dur:  # one frame per unit, 20 samples per frame (5 x 4)
        assert wav.shape == (len(units) * 20,)
    assert loaded.sample_rate == 16000


@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
def test_bad_vocoders_are_refused_clearly(tmp_path):
    torch.manual_seed(0)
    save_weight_normed(UnitHifiGan(TINY), tmp_path / "voc")
    loaded = load_vocoder(tmp_path / "voc" / "g_00001000")  # the weights file itself works too
    with pytest.raises(SlamError, match="outside the vocoder's 20 units"):
        vocode(loaded, [1, 25])
    (tmp_path / "voc" / "config.json").write_text(json.dumps({**TINY, "embedding_dim": 8, "model_in_dim": 8}))
    with pytest.raises(SlamError, match="does not match its config.json|size mismatch"):
        load_vocoder(tmp_path / "voc")
    with pytest.raises(SlamError, match="no config.json"):
        load_vocoder(tmp_path / "elsewhere")
    with pytest.raises(SlamError, match="f0"):
        UnitHifiGan({**TINY, "f0": True})
