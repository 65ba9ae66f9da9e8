"""Frame features on real speech: log-mel, and tiny random HuBERTs saved by the tests and loaded by path through
the real `HubertModel.from_pretrained` code (one 50 Hz with a layer-norm conv front end, one with mHuBERT's
25 Hz conv strides and group norm)."""

from __future__ import annotations

import pytest
import torch

from slam_ray.audio import decode_audio
from slam_ray.errors import SlamError
from slam_ray.features import HubertFeatures, LogMelFeatures


def save_tiny_hubert(folder, rate: int, seed: int = 0) -> str:
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(seed)
    convs = 7 if rate == 50 else 8  # mHuBERT-25Hz: one more stride-2 conv, hop 640
    config = HubertConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16,) * convs, conv_stride=(5,) + (2,) * (convs - 1), conv_kernel=(10, 3, 3, 3, 3) + (2,) * (convs - 5),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        # the 50 Hz one is HuBERT-large-shaped (layer norm, pre-LN), the 25 Hz one base-shaped (group norm, post-LN)
        feat_extract_norm="layer" if rate == 50 else "group", do_stable_layer_norm=rate == 50,
    )
    HubertModel(config).eval().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_huberts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubert")
    return {rate: save_tiny_hubert(root / f"hubert{rate}", rate) for rate in (50, 25)}


@pytest.fixture(scope="module")
def speech(fixtures):
    return [decode_audio(fixtures / "audio1.flac"), decode_audio(fixtures / "audio2.flac")]


def test_logmel_frames_follow_mhubert_25hz_convention(speech):
    """352 and 398 frames: the frame counts slamkit's 25 Hz units of the same files sum to."""
    feats = LogMelFeatures(frame_rate=25, n_mels=80)
    f1, f2 = feats(speech[0]), feats(speech[1])
    assert f1.shape == (352, 80) and f2.shape == (398, 80)
    assert torch.isfinite(f1).all()


def test_too_short_audio_is_an_error(tiny_huberts):
    with pytest.raises(ValueError, match="shorter than one frame"):
        LogMelFeatures()(torch.zeros(100).numpy())
    hubert = HubertFeatures(tiny_huberts[25], layer=2)
    assert len(hubert(torch.zeros(hubert.min_samples).numpy())) == 1  # the receptive field exactly: one frame
    with pytest.raises(ValueError, match="shorter than one frame"):
        hubert(torch.zeros(hubert.min_samples - 1).numpy())


@pytest.mark.parametrize(("rate", "frames"), [(25, (352, 398)), (50, (704, 797))])
def test_hubert_frame_counts_on_the_fixtures(tiny_huberts, speech, rate, frames):
    feats = HubertFeatures(tiny_huberts[rate], layer=2)
    assert tuple(len(feats(a)) for a in speech) == frames
    assert feats(speech[0]).shape[1] == 32


@pytest.mark.parametrize("rate", [25, 50])
def test_only_the_layers_up_to_the_one_read_run_and_give_the_full_models_features(tiny_huberts, speech, rate):
    from transformers import HubertModel

    full = HubertModel.from_pretrained(tiny_huberts[rate]).eval()
    x = torch.from_numpy(speech[0])[None]
    with torch.no_grad():
        hidden = full(x, output_hidden_states=True).hidden_states
    for layer in (1, 2):
        feats = HubertFeatures(tiny_huberts[rate], layer=layer)
        assert len(feats.model.encoder.layers) == layer  # the layers above are gone, never computed
        torch.testing.assert_close(feats(speech[0]), hidden[layer][0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rate", [25, 50])
def test_features_of_a_file_do_not_depend_on_its_batch_mates(tiny_huberts, speech, rate):
    feats = HubertFeatures(tiny_huberts[rate], layer=3)
    assert feats.masked_batches == (rate == 50)  # group norm over time cannot be batched with padding
    short = speech[1][: 16_000 * 3]
    batched = feats.batch([speech[0], short, speech[1]])
    for audio, got in zip([speech[0], short, speech[1]], batched, strict=True):
        torch.testing.assert_close(got, feats(audio), rtol=1e-4, atol=1e-4)


def test_a_missing_model_or_layer_is_a_clear_error(tiny_huberts, tmp_path):
    with pytest.raises(SlamError, match="has 3 layers; choose 1..3"):
        HubertFeatures(tiny_huberts[25], layer=4)
    with pytest.raises(SlamError, match="cannot load HubertModel"):
        HubertFeatures(str(tmp_path / "nothing_here"), layer=1)
