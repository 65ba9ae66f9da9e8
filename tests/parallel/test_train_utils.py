from __future__ import annotations

import pytest

from slam_ray.parallel.train_utils import flops_per_token, peak_tflops


def test_flops_per_token_counts_weights_and_attention():
    # the 358M slam config at context 1024: 6 N plus 12 L H T
    assert flops_per_token(358_000_000, 24, 896, 1024) == 6 * 358_000_000 + 12 * 24 * 896 * 1024
    assert flops_per_token(1000, 2, 8, 16) == 6000 + 3072


@pytest.mark.parametrize(("name", "tflops"), [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                              ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                              ("NVIDIA RTX A5000", 111.0), ("NVIDIA L4", 121.0),
                                              ("Some Future GPU", None)])
def test_peak_tflops_by_device_name(name, tflops):
    assert peak_tflops(name) == tflops
