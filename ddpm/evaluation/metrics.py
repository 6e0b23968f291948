"""Sample-quality metrics: Fréchet distance and kernel distance to a reference dataset, in one of two feature spaces.

- "inception": FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) exactly as torch-fidelity
  computes them, on its Inception-v3 (ddpm.evaluation.inception; weights are a checked download).
- "digitsnet": the same two distances in the 64-d penultimate layer of a small CNN trained once,
  deterministically, to classify scikit-learn's digits (the embedded default dataset), and cached.
  Needs no download; it ranks samplers and checkpoints of digit models, and its values are not
  comparable to FID, so its columns carry its own name (fd_digitsnet, kd_digitsnet).

Reference features are computed once per feature space, dataset, resolution and image count and
cached beside the data cache. The number of generated images and their seeds are part of every
figure: FID falls as the number of images grows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ddpm.config import DataConfig
from ddpm.errors import UserError
from ddpm.files import unique_suffix

log = logging.getLogger(__name__)

METRIC_NAME = "FD-digitsnet"
# feature space -> (Fréchet distance column, kernel distance column)
METRICS = {"inception": ("fid", "kid"), "digitsnet": ("fd_digitsnet", "kd_digitsnet")}
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 2020  # torch-fidelity's defaults
FEATURE_NET_VERSION = 3  # bump when the net or its training changes: FD figures are only comparable within a version


class DigitsNet(nn.Module):
    """conv 32 -> conv 64 -> conv 64 -> global pool -> 64-d features -> 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2),
            nn.GELU(),
            nn.Conv2d(64, 64, 3, padding=1, stride=2),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _to_input(images: np.ndarray) -> torch.Tensor:
    from ddpm.data.images import as_rgb

    return torch.from_numpy(np.ascontiguousarray(as_rgb(images))).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def digits_feature_net(resolution: int, cache_dir: Path) -> DigitsNet:
    """The feature network for digits at this resolution: loaded from the cache, or trained (seconds on a CPU)."""
    path = cache_dir / "feature-nets" / f"digitsnet-{resolution}px-v{FEATURE_NET_VERSION}.safetensors"
    net = DigitsNet()
    if path.is_file():
        net.load_state_dict(load_file(path))
        return net.eval()
    from sklearn.datasets import load_digits

    from ddpm.data.cache import open_cache

    cache = open_cache(
        DataConfig(source="digits", resolution=resolution, cache_dir=str(cache_dir / "datasets")), show_progress=False
    )
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
            idx = perm[i : i + 64]
            loss = F.cross_entropy(net(x[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.set_num_threads(threads)
    with torch.no_grad():
        accuracy = (net(x).argmax(1) == labels).float().mean().item()
    log.info("trained the %s feature net at %dpx: %.1f%% training accuracy", METRIC_NAME, resolution, 100 * accuracy)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{unique_suffix()}.tmp")
    save_file(net.state_dict(), tmp)
    os.replace(tmp, path)  # shards training it at once: each rename is whole, and the nets are identical
    return net.eval()


@torch.no_grad()
def features(net: DigitsNet, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    return np.concatenate(
        [
            net.features(_to_input(images[i : i + batch_size])).double().numpy()
            for i in range(0, len(images), batch_size)
        ]
    )


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two feature sets
    (torch-fidelity's code)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    stats = [fid_features_to_statistics(torch.from_numpy(np.asarray(x, dtype=np.float64))) for x in (a, b)]
    return float(fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID])


def kernel_distance(a: np.ndarray, b: np.ndarray) -> tuple[float, float, int]:
    """KID: unbiased MMD^2 with a cubic polynomial kernel, mean and std over random subsets; also the subset size."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(KID_SUBSET_SIZE, len(a), len(b))
    out = kid_features_to_metric(
        torch.from_numpy(np.asarray(a, dtype=np.float64)),
        torch.from_numpy(np.asarray(b, dtype=np.float64)),
        kid_subsets=KID_SUBSETS,
        kid_subset_size=size,
        rng_seed=KID_SEED,
        verbose=False,
    )
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD]), size


def distances(space: str, generated: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """The two distances of a feature space under that space's column names."""
    if len(generated) < 2 or len(reference) < 2:
        raise UserError(
            f"FID/KID need at least 2 generated and 2 reference images, got {len(generated)} and {len(reference)}"
        )
    fd_name, kd_name = METRICS[space]
    kd, kd_std, subset = kernel_distance(generated, reference)
    return {
        fd_name: frechet_distance(generated, reference),
        kd_name: kd,
        f"{kd_name}_std": kd_std,
        "kid_subset_size": subset,
    }


def fd_floor(reference: np.ndarray, num_images: int, repeats: int = 3, seed: int = 0) -> float | None:
    """The Fréchet distance that `num_images` images drawn from the reference's own distribution would score
    against `reference`: the metric's real-vs-real floor, under which no score can be trusted to go, and the scale
    of a difference that means something at this image count.

    The FD of two finite samples of one distribution is its estimation bias alone, which falls as 1/n + 1/m (Chong
    & Forsyth 2020, "Effectively Unbiased FID and Inception Score and where to find them", sec. 3: FID is linear in
    1/N). Independent real images beyond the reference are not at hand, so the floor is measured between disjoint
    random halves of the reference at three sizes (`repeats` splits each), fitted as FD = a (1/n + 1/m), and given
    at (num_images, len(reference)). None for fewer than 4 reference images (no two halves to compare)."""
    rng = np.random.default_rng(seed)
    half = len(reference) // 2
    if half < 2:
        return None
    xs, ys = [], []
    for n in sorted({max(2, half // 4), max(2, half // 2), half}):
        for _ in range(repeats):
            order = rng.permutation(len(reference))
            xs.append(2 / n)
            ys.append(frechet_distance(reference[order[:n]], reference[order[n : 2 * n]]))
    a = float(np.dot(xs, ys) / np.dot(xs, xs))
    return a * (1 / num_images + 1 / len(reference))


def metric_columns(metric: str) -> list[str]:
    """The columns a metric ("none": images only) adds to a result row, the headline first."""
    if metric == "none":
        return ["seconds_per_image"]
    fd, kd = METRICS[metric]
    return [fd, kd, f"{kd}_std", f"{fd}_floor", "seconds_per_image"]


# --------------------------------------------------------------------------------------
# Feature spaces and the reference side.


class DigitsFeatures:
    name = "digitsnet"

    def __init__(self, resolution: int, cache_dir: Path):
        self.net = digits_feature_net(resolution, cache_dir)
        self.id = f"digitsnet-v{FEATURE_NET_VERSION}-{resolution}px"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return features(self.net, images)

    classes = [str(d) for d in range(10)]  # what its head tells apart: it classifies a model of these classes only

    @torch.no_grad()
    def classify(self, feats: np.ndarray) -> np.ndarray:
        """The digit the net's head assigns to each image, from the features it computed for the distances."""
        return self.net.head(torch.from_numpy(feats).float()).argmax(1).numpy()


def feature_space(
    name: str, resolution: int, device: torch.device, inception_weights: str = ""
) -> Callable[[np.ndarray], np.ndarray]:
    """A callable from uint8 (N, H, W, 3) images to float64 features, with `.name` and `.id` (for cache keys)."""
    if name == "digitsnet":
        return DigitsFeatures(resolution, metrics_cache_dir())
    if name == "inception":
        from ddpm.evaluation.inception import InceptionFeatures
        from ddpm.evaluation.inception import inception_weights as weights

        return InceptionFeatures(weights(inception_weights), device)
    raise UserError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")


def metrics_cache_dir() -> Path:
    return Path(os.environ.get("DDPM_CACHE", Path.home() / ".cache" / "ddpm"))


def reference_data(spec: str, resolution: int, run_dir: Path | None = None) -> DataConfig:
    """The reference dataset at the model's resolution.

    spec: "" (the training data of the run the model comes from), "digits", "folder:PATH",
    "hf:NAME" or "hf:NAME:SPLIT", or a training config YAML whose data section is used."""
    from ddpm.config import load_config

    if not spec:
        if run_dir is None or not (run_dir / "config.yaml").is_file():
            raise UserError(
                "no reference dataset: give one (digits, folder:PATH, hf:NAME[:SPLIT] or a config YAML); "
                "it can be left out only for models inside a run directory"
            )
        data = load_config(run_dir / "config.yaml").data
    elif spec == "digits":
        data = DataConfig(source="digits")
    elif spec.startswith("folder:"):
        data = DataConfig(source="folder", path=spec.removeprefix("folder:"))
    elif spec.startswith("hf:"):
        name, _, split = spec.removeprefix("hf:").partition(":")
        data = DataConfig(source="hf", path=name, split=split or "train")
    elif spec.endswith((".yaml", ".yml")):
        data = load_config(spec).data
    else:
        raise UserError(f"reference {spec!r}: expected digits, folder:PATH, hf:NAME[:SPLIT] or a config .yaml file")
    return dataclasses.replace(data, resolution=resolution, random_flip=False)


def describe_reference(data: DataConfig) -> str:
    """The reference dataset in a result row: the same words for the same data, whoever scored."""
    where = {
        "digits": "digits",
        "folder": f"folder:{data.path}",
        "hf": f"hf:{data.path}:{data.split}",
        "webdataset": f"webdataset:{data.path}",
    }[data.source]
    return f"{where} at {data.resolution}px"


def reference_features(space, data: DataConfig, num_images: int = 0, warn: bool = True) -> np.ndarray:
    """Features of `num_images` (0: all) reference images, a fixed random subset; cached on disk. `warn`: say so
    when the dataset has fewer images than asked (not for a cap such as train.eval_reference_images)."""
    from ddpm.data.cache import cache_root, open_cache
    from ddpm.data.images import as_rgb

    if data.source == "webdataset":  # streamed data has no cache: the first images of the shards, by name
        from ddpm.data.shards import first_images, open_shards

        shards = open_shards(data)
        n = len(shards) if num_images <= 0 else min(num_images, len(shards))
        which = json.dumps([str(shards.root.resolve()), shards.names, shards.counts, data.image_channels])
        name = f"webdataset-{hashlib.sha256(which.encode()).hexdigest()[:16]}"
        path = cache_root(data).parent / "reference-features" / f"{space.id}-{name}-{data.resolution}px-{n}.npy"
        if path.is_file():
            return np.load(path)
        images = first_images(data, n)
        take = images.__getitem__
        indices = np.arange(len(images))
        n = len(images)
    else:
        cache = open_cache(data)
        n = len(cache) if num_images <= 0 else min(num_images, len(cache))
        if warn and num_images > len(cache):
            log.warning(
                "the reference has %d images, fewer than the %d asked for; using all of them", len(cache), num_images
            )
        path = cache_root(data).parent / "reference-features" / f"{space.id}-{cache.path.name}-{n}.npy"
        if path.is_file():
            return np.load(path)
        indices = np.sort(np.random.default_rng(0).permutation(len(cache))[:n])
        take = cache.take
    chunks = []
    for i in tqdm(
        range(0, n, 1000), desc=f"reference features ({space.name}, {n} images)", unit="chunk", mininterval=1.0
    ):
        chunks.append(space(as_rgb(take(indices[i : i + 1000]))))
    feats = np.concatenate(chunks)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{unique_suffix()}.tmp.npy")
    np.save(tmp, feats)
    os.replace(tmp, path)  # concurrent shards may both compute it; each rename is whole
    return feats
