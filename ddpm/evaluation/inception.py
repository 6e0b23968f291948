"""The Inception-v3 network behind FID and KID, and its weights, checked before use.

FID and KID figures are comparable only when computed with the same network and the same code:
torch-fidelity's port of the TensorFlow Inception graph used by the reference FID implementation.
Its weights (95.6 MB) are fetched once into the cache and checked against their SHA-256; compute
nodes without internet are given the file with `inception_weights` / `--inception-weights` or the
DDPM_INCEPTION_WEIGHTS variable; the container image carries a copy (DDPM_BUNDLED_WEIGHTS names its folder).
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpm.errors import UserError
from ddpm.files import unique_suffix
from ddpm.models.checkpoint import sha256_file

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"


def weights_cache_dir() -> Path:
    return Path(os.environ.get("DDPM_CACHE", Path.home() / ".cache" / "ddpm")) / "weights"


def local_inception_weights(sha256: str = WEIGHTS_SHA256) -> Path | None:
    """The checked weights already on this machine (DDPM_INCEPTION_WEIGHTS, the cache, the image's copy), or None:
    no download, no error."""
    places = [
        os.environ.get("DDPM_INCEPTION_WEIGHTS", ""),
        str(weights_cache_dir() / WEIGHTS_FILE),
        str(Path(os.environ.get("DDPM_BUNDLED_WEIGHTS", "/nonexistent")) / WEIGHTS_FILE),
    ]
    for place in places:
        if place and Path(place).is_file() and sha256_file(Path(place)) == sha256:
            return Path(place)
    return None


def inception_weights(explicit: str = "", sha256: str = WEIGHTS_SHA256) -> Path:
    """The checked weights file: the given path (or DDPM_INCEPTION_WEIGHTS), else the cached copy, else a download."""
    given = explicit or os.environ.get("DDPM_INCEPTION_WEIGHTS", "")
    if given:
        path = Path(given)
        if not path.is_file():
            raise UserError(
                f"Inception weights {path}: no such file (expected {WEIGHTS_FILE}, SHA-256 {sha256[:16]}...)"
            )
        if sha256_file(path) != sha256:
            raise UserError(
                f"Inception weights {path}: SHA-256 mismatch, not {WEIGHTS_FILE} (SHA-256 {sha256[:16]}...)"
            )
        return path
    path = weights_cache_dir() / WEIGHTS_FILE
    if path.is_file():
        if sha256_file(path) == sha256:
            return path
        log.warning("cached Inception weights %s fail their SHA-256 check; fetching them again", path)
    bundled = Path(os.environ.get("DDPM_BUNDLED_WEIGHTS", "/nonexistent")) / WEIGHTS_FILE  # the container image's copy
    if bundled.is_file() and sha256_file(bundled) == sha256:
        return bundled
    url = os.environ.get("DDPM_INCEPTION_URL", WEIGHTS_URL)  # a mirror, for sites that block GitHub
    how = (  # both ways work for every job (ddpm train has no flag for it; evaluate and sweeps also take a path)
        f"copy {WEIGHTS_FILE} (SHA-256 {sha256[:16]}...) to {path} or set DDPM_INCEPTION_WEIGHTS=PATH "
        "(ddpm evaluate: --inception-weights PATH)"
    )
    if os.environ.get("DDPM_OFFLINE") == "1":
        raise UserError(f"FID/KID need the Inception weights and DDPM_OFFLINE=1 forbids the download: {how}")
    try:
        _download(url, path, sha256)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise UserError(f"FID/KID need the Inception weights; the download from {url} failed ({e}): {how}") from None
    return path


def _download(url: str, path: Path, sha256: str) -> None:
    """Into a temporary file beside the target, checked, then renamed: never a half file under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{unique_suffix()}.part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {path.name}", mininterval=1.0) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
        if sha256_file(tmp) != sha256:
            raise OSError(f"the file from {url} fails its SHA-256 check")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class InceptionFeatures:
    """2048-d pool features of uint8 (N, H, W, 3) images; torch-fidelity resizes them to 299 px itself."""

    name = "inception"

    def __init__(self, weights: Path, device: torch.device, batch_size: int = 64, sha256: str = WEIGHTS_SHA256):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # torch.load of a pickle: safe here because the file passed its SHA-256 check above.
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights)
        ).to(device)
        self.device, self.batch_size = device, batch_size
        self.id = f"inception-{sha256[:12]}"  # inception_weights() checked the file against this

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = (
                torch.from_numpy(np.ascontiguousarray(images[i : i + self.batch_size]))
                .permute(0, 3, 1, 2)
                .to(self.device)
            )
            out.append(self.net(x)[0].double().cpu().numpy())
        return np.concatenate(out)
