"""FD-digitsnet: the distance behaves like a distance, and its feature net is the same in every run."""

from __future__ import annotations

import numpy as np
import torch

from ddpm.evaluate import digits_feature_net, frechet_distance


def test_frechet_distance_is_zero_for_the_same_set_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    assert abs(frechet_distance(a, a)) < 1e-6
    near, far = frechet_distance(a, a + 0.1), frechet_distance(a, a + 1.0)
    assert near == np.float64(near) and 0 < near < far
    assert np.isclose(far, 8 * 1.0**2, rtol=1e-6)  # a pure mean shift of 1 in 8 dimensions: ||mu||^2 = 8


def test_feature_net_is_trained_deterministically_and_cached(tmp_path):
    first = digits_feature_net(8, tmp_path / "a")
    torch.rand(10)  # the global RNG state must not matter
    second = digits_feature_net(8, tmp_path / "b")
    for (name, p), q in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(p, q), name
    cached = sorted((tmp_path / "a" / "feature-nets").iterdir())
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    digits_feature_net(8, tmp_path / "a")
    assert cached[0].stat().st_mtime_ns == mtime, "the second call loads, it does not retrain"
