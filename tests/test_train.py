from __future__ import annotations

import numpy as np
import pytest

from slam_ray.config import ScheduleConfig
from slam_ray.pack import pack_windows
from slam_ray.train import WindowBatches, lr_factor


def test_cosine_with_warmup_ends_at_min_lr():
    sched = ScheduleConfig(name="cosine", warmup_ratio=0.1, min_lr=1e-4)
    factors = [lr_factor(s, 100, 10, sched, 1e-3) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert lr_factor(100, 100, 10, sched, 1e-3) == pytest.approx(0.1)  # min_lr / lr


def test_inverse_sqrt_and_constant():
    inv = ScheduleConfig(name="inverse_sqrt", warmup_ratio=0.0)
    assert lr_factor(3, 100, 4, inv, 1.0) == pytest.approx(1.0)
    assert lr_factor(15, 100, 4, inv, 1.0) == pytest.approx(0.5)
    assert lr_factor(50, 100, 0, ScheduleConfig(name="constant"), 1.0) == 1.0


def test_ranks_see_disjoint_slices_of_each_global_batch():
    windows = np.arange(40 * 4).reshape(40, 4)
    r0 = WindowBatches(windows, 5, rank=0, world=2, seed=0)
    r1 = WindowBatches(windows, 5, rank=1, world=2, seed=0)
    assert r0.per_epoch == 4
    seen = []
    for i in range(r0.per_epoch):
        a, b = r0.batch(i)[:, 0], r1.batch(i)[:, 0]
        assert not set(a) & set(b)
        seen += list(a) + list(b)
    assert len(set(seen)) == 40  # one epoch covers every window once
    assert not np.array_equal(r0.batch(0), r0.batch(4))  # next epoch is reshuffled


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match="one global batch"):
        WindowBatches(np.zeros((3, 8)), 4, 0, 1, 0)


def test_packing_wastes_less_than_one_percent():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(2, 100, size=rng.integers(20, 80)).astype(np.int64) for _ in range(500)]
    windows, n_pad = pack_windows(seqs, 256)
    total = sum(len(s) for s in seqs)
    assert windows.shape[1] == 256 and windows.dtype == np.uint16
    assert windows.size - n_pad == total
    assert n_pad / windows.size < 0.01
    assert np.array_equal(windows.reshape(-1)[:total], np.concatenate(seqs))
