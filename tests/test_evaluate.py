"""Metrics: the distances behave like distances, the offline feature net is the same in every run, `ddpm evaluate`
is repeatable, and the Inception path checks its weights and fails with a message naming the file it needs."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline

from ddpm.config import load_config
from ddpm.errors import UserError
from ddpm.evaluation.inception import WEIGHTS_FILE, InceptionFeatures, inception_weights
from ddpm.evaluation.metrics import digits_feature_net, distances, frechet_distance, kernel_distance
from ddpm.models.schedule import build_scheduler
from ddpm.models.unet import build_unet
from tests.conftest import TINY_MODEL, cli


def test_frechet_distance_is_zero_for_the_same_set_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    assert abs(frechet_distance(a, a)) < 1e-6
    near, far = frechet_distance(a, a + 0.1), frechet_distance(a, a + 1.0)
    assert near == np.float64(near) and 0 < near < far
    assert np.isclose(far, 8 * 1.0**2, rtol=1e-6)  # a pure mean shift of 1 in 8 dimensions: ||mu||^2 = 8


@pytest.mark.parametrize("num_images", [300, 1000])
def test_the_real_vs_real_floor_predicts_what_fresh_real_samples_score(num_images):
    """fd_floor sees only the reference, yet predicts the FD of new draws from the same distribution against it."""
    from ddpm.evaluation.metrics import fd_floor

    rng = np.random.default_rng(1)
    scale = np.linspace(0.5, 2.0, 16)
    reference = rng.standard_normal((1800, 16)) * scale
    fresh = [frechet_distance(rng.standard_normal((num_images, 16)) * scale, reference) for _ in range(30)]
    assert fd_floor(reference, num_images) == pytest.approx(np.mean(fresh), rel=0.1)
    assert fd_floor(reference, num_images) > fd_floor(reference, 4 * num_images)
    assert fd_floor(reference[:3], num_images) is None  # no two halves to compare: no floor rather than a guess


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


def test_kernel_distance_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same, _, size = kernel_distance(a, b)
    far, _, _ = kernel_distance(a, b + 1.0)
    assert size == 400 and abs(same) < 0.05 < far


@pytest.fixture(scope="module")
def random_pipeline(tmp_path_factory) -> Path:
    cfg = load_config(None, [*TINY_MODEL, "data.resolution=8"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("evaluate") / "pipeline"
    DDPMPipeline(unet=build_unet(cfg.model, 8), scheduler=build_scheduler(cfg.schedule)).save_pretrained(path)
    return path


def test_evaluate_gives_the_same_figures_twice_and_caches_the_reference(random_pipeline, tmp_path):
    env = {"DDPM_CACHE": str(tmp_path / "cache")}
    args = [
        "evaluate",
        "--pipeline",
        str(random_pipeline),
        "--reference",
        "digits",
        "--metric",
        "digitsnet",
        "--num-images",
        "16",
        "--steps",
        "3",
        "--reference-images",
        "300",
        "--no-wandb",
    ]
    first = cli(*args, "--out", str(tmp_path / "a.json"), env=env)
    assert first.returncode == 0, first.stderr
    assert "fd_digitsnet:" in first.stdout and "vs 300 reference images (digits at 8px)" in first.stdout
    assert "fd_digitsnet_floor:" in first.stdout  # what 16 real images would score, printed beside the score
    cached = list((tmp_path / "cache" / "reference-features").glob("digitsnet-*-300.npy"))
    assert len(cached) == 1 and np.load(cached[0]).shape == (300, 64)
    mtime = cached[0].stat().st_mtime_ns
    second = cli(*args, "--out", str(tmp_path / "b.json"), env=env)
    assert second.returncode == 0, second.stderr
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["fd_digitsnet"] > a["fd_digitsnet_floor"] > 0  # an untrained model is far above real images
    keys = ("fd_digitsnet", "kd_digitsnet", "fd_digitsnet_floor")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert cached[0].stat().st_mtime_ns == mtime, "the second evaluation reads the cached reference features"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fid_without_weights_names_the_file_it_needs(random_pipeline, tmp_path):
    env = {
        "DDPM_CACHE": str(tmp_path / "cache"),
        "DDPM_INCEPTION_URL": f"http://127.0.0.1:{_closed_port()}/{WEIGHTS_FILE}",
    }
    r = cli(
        "evaluate",
        "--pipeline",
        str(random_pipeline),
        "--reference",
        "digits",
        "--num-images",
        "4",
        "--no-wandb",
        env=env,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("ddpm evaluate: error: FID/KID need the Inception weights") and WEIGHTS_FILE in error
    assert str(tmp_path / "cache" / "weights" / WEIGHTS_FILE) in error and "--inception-weights" in error
    assert not list((tmp_path / "cache" / "weights").glob("*")), "no partial download is left behind"

    wrong = tmp_path / WEIGHTS_FILE
    wrong.write_bytes(b"not the weights")
    r = cli(
        "evaluate",
        "--pipeline",
        str(random_pipeline),
        "--reference",
        "digits",
        "--num-images",
        "4",
        "--no-wandb",
        "--inception-weights",
        str(wrong),
        env=env,
    )
    assert r.returncode == 2 and f"Inception weights {wrong}: SHA-256 mismatch" in r.stderr.strip().splitlines()[-1]


def test_inception_features_and_fid_kid_from_a_checked_weights_file(tmp_path, monkeypatch):
    """The real weights are a download CI cannot make: a file of random weights of the same network, checked
    against its own SHA-256, runs the whole path (resize to 299 px, 2048-d features, FID and KID columns)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf

    monkeypatch.setattr(tf.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    monkeypatch.setattr(tf, "load_state_dict_from_url", lambda *a, **k: {})
    torch.manual_seed(0)
    random_state = tf.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    monkeypatch.undo()
    path = tmp_path / "stand-in.pth"
    torch.save(random_state, path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()

    with pytest.raises(UserError, match="SHA-256 mismatch"):
        inception_weights(str(path))  # the real SHA-256 is expected by default
    space = InceptionFeatures(inception_weights(str(path), sha256=sha), torch.device("cpu"), sha256=sha)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    feats = space(images)
    assert feats.shape == (6, 2048) and np.isfinite(feats).all()
    scores = distances("inception", feats[:3], feats[3:])
    assert set(scores) == {"fid", "kid", "kid_std", "kid_subset_size"} and scores["kid_subset_size"] == 3
    assert abs(distances("inception", feats, feats)["fid"]) < 1e-3

    # the container image's bundled copy is found without a download, once its checksum holds
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    (bundled / WEIGHTS_FILE).write_bytes(path.read_bytes())
    monkeypatch.setenv("DDPM_BUNDLED_WEIGHTS", str(bundled))
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("DDPM_OFFLINE", "1")
    monkeypatch.delenv("DDPM_INCEPTION_WEIGHTS", raising=False)
    assert inception_weights(sha256=sha) == bundled / WEIGHTS_FILE
    with pytest.raises(UserError, match="DDPM_OFFLINE=1 forbids the download"):
        inception_weights()  # a bundled file that fails the real checksum is not used


def test_a_reference_or_metric_that_cannot_be_had_fails_before_sampling(random_pipeline, tmp_path):
    """The README's evaluation samples 50,000 images with DDPM's 1,000 steps: hours lost if the error came after."""
    env = {"DDPM_CACHE": str(tmp_path / "cache"), "DDPM_INCEPTION_URL": f"http://127.0.0.1:{_closed_port()}/x"}
    common = ("evaluate", "--pipeline", str(random_pipeline), "--num-images", "4", "--no-wandb")
    for args, says in (
        (("--metric", "digitsnet", "--reference", f"folder:{tmp_path / 'nothing'}"), "does not exist"),
        (("--metric", "inception", "--reference", "digits"), "FID/KID need the Inception weights"),
    ):
        r = cli(*common, *args, env=env)
        assert r.returncode == 2 and says in r.stderr.strip().splitlines()[-1], r.stderr
        assert "sampling 4 images" not in r.stderr  # the progress bar of the sampling never started
