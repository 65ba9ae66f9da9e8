"""Frame features on real speech: log-mel, and tiny random HuBERTs saved by the tests and loaded by path through
the real `HubertModel.from_pretrained` code (one 50 Hz with a layer-norm conv front end, one with mHuBERT's
25 Hz conv strides and group norm)."""

from __future__ import annotations

import pytest
import torch
from helpers import save_tiny_hubert

from slam_ray.errors import SlamError
from slam_ray.speech.audio import decode_audio
from slam_ray.speech.features import HubertFeatures, LogMelFeatures


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

    for layer in (1, 2):
        feats = HubertFeatures(tiny_huberts[rate], layer=layer)
        full = HubertModel.from_pretrained(tiny_huberts[rate]).eval().to(feats.device)  # same device, same kernels
        with torch.no_grad():
            hidden = full(torch.from_numpy(speech[0])[None].to(feats.device), output_hidden_states=True).hidden_states
        assert len(feats.model.encoder.layers) == layer  # the layers above are gone, never computed
        torch.testing.assert_close(feats(speech[0]), hidden[layer][0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rate", [25, 50])
def test_features_of_a_file_do_not_depend_on_its_batch_mates(tiny_huberts, speech, rate):
    """One padded forward for all three (the 25 Hz model's group norm over time included), and each file's
    features (and units) equal to its own forward's."""
    from slam_ray.config import TokenizerConfig
    from slam_ray.speech.tokenizer import UnitTokenizer

    feats = HubertFeatures(tiny_huberts[rate], layer=3, batched=True)  # the GPU's way, here on CPU
    short = speech[1][: 16_000 * 12]
    files = [speech[0], short, speech[1], speech[1][: 16_000 * 3]]
    forwards = []
    feats.model.register_forward_hook(lambda module, args, out: forwards.append(tuple(args[0].shape)))
    batched = feats.batch(files)
    # longest first; the 3 s file is under MIN_FILL of the longest, so it waits for a batch of its own (on a GPU,
    # where this runs there: widths rounded up to whole seconds, rows to fours, files down to half the longest)
    if feats.device.type == "cuda":
        assert forwards == [(4, -(-len(speech[1]) // 16_000) * 16_000), (4, 16_000 * 3)]
    else:
        assert forwards == [(3, len(speech[1])), (1, 16_000 * 3)]
    for audio, got in zip(files, batched, strict=True):
        torch.testing.assert_close(got, feats(audio), rtol=1e-4, atol=1e-4)
    # the plain padded forward (slamkit's way) does change a group-norm model's features
    if rate == 25:
        with torch.no_grad():
            x = torch.zeros(2, len(speech[0]))
            x[0], x[1, : len(short)] = torch.from_numpy(speech[0]), torch.from_numpy(short)
            plain = feats.model(x.to(feats.device)).last_hidden_state[1, : len(batched[1])]
        assert (plain - batched[1]).abs().max() > 1e-2
    centroids = torch.randn(50, 32).numpy()
    tok = UnitTokenizer(TokenizerConfig(kind="hubert", model=tiny_huberts[rate], layer=3, n_units=50), centroids,
                        torch.zeros(32).numpy(), torch.ones(32).numpy())
    tok.features.batched = True
    for one, together in zip((tok.encode(a) for a in files), tok.encode_batch(files), strict=True):
        assert one["units"].tolist() == together["units"].tolist()


def test_gpu_batch_shapes_keep_each_files_features(tiny_huberts, speech):
    """The GPU's batch shapes (widths to whole seconds, rows to multiples of 4 with silent filler rows, files
    down to half the longest), here on CPU: still each file's own features."""
    feats = HubertFeatures(tiny_huberts[25], layer=3, batched=True)
    feats.width_quantum, feats.row_quantum, feats.min_fill = 16_000, 4, 0.5
    files = [speech[0], speech[1][: 16_000 * 9], speech[1], speech[1][: 16_000 * 3]]
    forwards = []
    feats.model.register_forward_hook(lambda module, args, out: forwards.append(tuple(args[0].shape)))
    batched = feats.batch(files)
    assert forwards == [(4, 16 * 16_000), (4, 3 * 16_000)]  # 15.9 s -> 16 s wide; the 3 s file plus 3 fillers
    for audio, got in zip(files, batched, strict=True):
        torch.testing.assert_close(got, feats(audio), rtol=1e-4, atol=1e-4)


def test_gpu_batch_seconds_bounds_each_forward_and_keeps_each_files_units(tiny_huberts, speech, tmp_path):
    """`extract.gpu_batch_seconds` reaches the encoding actor's padded batches (here batched on CPU, as on a
    GPU): no forward holds more files than fit in it, and every segment keeps the units it has alone."""
    import pandas as pd

    from slam_ray.config import TokenizerConfig
    from slam_ray.parallel.encode import EncodeActor
    from slam_ray.speech.tokenizer import UnitTokenizer

    cfg = TokenizerConfig(kind="hubert", model=tiny_huberts[25], layer=3, n_units=50)
    tok = UnitTokenizer(cfg, torch.randn(50, 32).numpy(), torch.zeros(32).numpy(), torch.ones(32).numpy())
    tok.save(tmp_path / "tok")
    actor = EncodeActor(str(tmp_path / "tok"), gpu_batch_seconds=20)
    feats = actor.tokenizer.features
    assert feats.max_batch_samples == 20 * 16_000
    feats.batched = True
    feats.width_quantum, feats.row_quantum = 16_000, 4  # the GPU's shapes (whole seconds, rows in fours)
    files = [speech[0][: 16_000 * s] for s in (9, 8, 7, 6, 5)]
    forwards = []
    feats.model.register_forward_hook(lambda module, args, out: forwards.append(tuple(args[0].shape)))
    rows = pd.DataFrame([{"id": str(i), "audio": a.tobytes(), "error": None} for i, a in enumerate(files)])
    encoded = actor(rows)
    # 20 s of the 9 s width: 2 files, no filler row (4 rows would hold 36 s); then 2 of 7 s; then the 5 s file
    # with 3 filler rows (4 x 5 s fit)
    assert forwards == [(2, 16_000 * 9), (2, 16_000 * 7), (4, 16_000 * 5)]
    for audio, units in zip(files, encoded.units, strict=True):
        assert list(units) == tok.encode(audio)["units"].tolist()
    # 40 s: rows in fours that still fit (4 x 9 s, 4 x 6 s), filler rows included
    forwards.clear()
    feats.max_batch_samples = 40 * 16_000
    actor(rows)
    assert [n for n, _ in forwards] == [4, 4] and all(n * width <= 40 * 16_000 for n, width in forwards)


def test_a_missing_model_or_layer_is_a_clear_error(tiny_huberts, tmp_path):
    with pytest.raises(SlamError, match="has 3 layers; choose 1..3"):
        HubertFeatures(tiny_huberts[25], layer=4)
    with pytest.raises(SlamError, match="cannot load HubertModel"):
        HubertFeatures(str(tmp_path / "nothing_here"), layer=1)
