"""Sample quality without downloads: Fréchet distance in the feature space of a small offline network.

FID (Heusel et al. 2017) compares Gaussians fitted to Inception features of real and generated
images. Inception weights are a download; this metric, "FD-digitsnet", uses instead the 64-d
penultimate layer of a small CNN trained once, deterministically, to classify scikit-learn's
digits (the embedded default dataset), and cached. It ranks samplers and checkpoints of digit
models; its values are not comparable to FID. The number of images is part of every figure.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

METRIC_NAME = "FD-digitsnet"
FEATURE_NET_VERSION = 3  # bump when the net or its training changes: FD figures are only comparable within a version


class DigitsNet(nn.Module):
    """conv 32 -> conv 64 -> conv 64 -> global pool -> 64-d features -> 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.GELU(),
            nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def digits_feature_net(resolution: int, cache_dir: Path) -> DigitsNet:
    """The feature network for digits at this resolution: loaded from the cache, or trained (seconds on a CPU)."""
    path = cache_dir / "feature-nets" / f"digitsnet-{resolution}px-v{FEATURE_NET_VERSION}.safetensors"
    net = DigitsNet()
    if path.is_file():
        net.load_state_dict(load_file(path))
        return net.eval()
    from sklearn.datasets import load_digits

    from ddpm.config import DataConfig
    from ddpm.data import open_cache

    cache = open_cache(DataConfig(source="digits", resolution=resolution, cache_dir=str(cache_dir)), show_progress=False)
    images = cache.take(np.arange(len(cache)))
    labels = torch.from_numpy(load_digits().target).long()
    x = _to_input(images)
    # One thread: multi-threaded CPU kernels reduce in varying order, and the features (hence every FD
    # figure) must not depend on the run that trained the net. 20 epochs of 1,797 tiny images: seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = DigitsNet()  # initialised from the seed, not from whatever the global RNG held
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    order = torch.Generator().manual_seed(0)
    for _epoch in range(20):
        perm = torch.randperm(len(x), generator=order)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(net(x[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.set_num_threads(threads)
    with torch.no_grad():
        accuracy = (net(x).argmax(1) == labels).float().mean().item()
    log.info("trained the %s feature net at %dpx: %.1f%% training accuracy", METRIC_NAME, resolution, 100 * accuracy)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), path)
    return net.eval()


@torch.no_grad()
def features(net: DigitsNet, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    return np.concatenate([net.features(_to_input(images[i:i + batch_size])).double().numpy() for i in range(0, len(images), batch_size)])


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two feature sets."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: the usual FID remedy, a small diagonal offset
        offset = np.eye(len(s_a)) * 1e-6
        covmean = linalg.sqrtm((s_a + offset) @ (s_b + offset))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean.real))
