"""`ddpm upload`: the folder check, the staged commit and the card for real; the Hub calls against a local server
(tests/hub_server.py) through HF_ENDPOINT, as huggingface_hub makes them: in a child process, since huggingface_hub
reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HOME when it is imported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from ddpm.config import DEFAULT_SAMPLER
from jobs.cli import main
from tests.conftest import cli, copy_of_tiny_run, report, run_cli
from tests.hub_server import PUBLIC, HubServer

TOKEN = "hf_secret_value_1234567890"
PIPELINE_FILES = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
}
COMMIT = PIPELINE_FILES | {"README.md", "training_config.yaml", "samples.png"}


@pytest.fixture(scope="module")
def pipeline(tiny_run, tmp_path_factory) -> Path:
    """A tiny digits run's exported pipeline (6 steps), with the clutter a run directory gathers beside it."""
    path = copy_of_tiny_run(tiny_run, tmp_path_factory.mktemp("upload")) / "pipeline"
    # what the diffusers example scripts leave in their output folder, and editors and caches leave anywhere
    (path / "checkpoint-500").mkdir()
    (path / "checkpoint-500" / "optimizer.bin").write_bytes(b"o" * 1000)
    (path / "unet" / ".cache").mkdir()
    (path / "unet" / ".cache" / "x.lock").write_text("")
    (path / "wandb").mkdir()
    (path / "wandb" / "debug.log").write_text("log")
    return path


def hub_env(hub: HubServer, tmp_path: Path, token: str | None = TOKEN) -> dict:
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    return {**env, "HF_TOKEN": token} if token else {**env, "HF_TOKEN": ""}


def test_dry_run_lists_the_commit_and_prints_a_model_card(pipeline):
    r = cli(
        "upload", "--pipeline", str(pipeline), "--repo-id", "someone/tiny-digits", "--dry-run", env={"HF_TOKEN": TOKEN}
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(
        "dry run, nothing sent: would upload to someone/tiny-digits@main (public if created): 7 files,"
    )
    listed = {line.split("  (")[0].strip() for line in r.stdout.splitlines() if line.startswith("  ")}
    assert listed == COMMIT  # never the checkpoint, optimizer, W&B or cache files beside the pipeline
    card = r.stdout.split("--- README.md ---\n", 1)[1]
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "diffusers" and front["pipeline_tag"] == "unconditional-image-generation"
    assert front["license"] == "mit" and "ddpm" in front["tags"]
    assert (
        'DDPMPipeline.from_pretrained("someone/tiny-digits")' in card
        and "- steps: 6;" in card
        and "![samples](samples.png)" in card
    )
    assert TOKEN not in r.stdout + r.stderr


def test_the_model_cards_usage_code_runs_the_default_sampler_as_ddpm_sample_does(pipeline):
    """A diffusers user who pastes the card's code gets the scheduler `ddpm sample` would use, setting for setting."""
    from diffusers import DDPMPipeline

    from ddpm.config import DEFAULT_SAMPLER
    from ddpm.publishing.hub import model_card
    from ddpm.sampling.sample import make_sampler, sampler_settings

    card = model_card(pipeline, "someone/tiny-digits")
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('"someone/tiny-digits"', repr(str(pipeline))).replace("batch_size=16", "batch_size=1")
    scope: dict = {}
    exec(code, scope)
    ours = make_sampler(DEFAULT_SAMPLER, DDPMPipeline.from_pretrained(pipeline).scheduler)
    assert sampler_settings(scope["pipe"].scheduler) == sampler_settings(ours)
    assert len(scope["images"]) == 1


def test_bad_folders_and_repo_ids_fail_in_one_line(pipeline, tmp_path, capsys):
    assert main(["upload", "--pipeline", str(tmp_path), "--repo-id", "someone/x", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"ddpm upload: error: --pipeline: {tmp_path} is not a pipeline directory (no model_index.json); train first"
    )
    assert main(["upload", "--pipeline", str(pipeline), "--repo-id", "no-slash", "--dry-run"]) == 2
    assert "--repo-id: 'no-slash' is not of the form user/name" in capsys.readouterr().err

    broken = tmp_path / "broken"
    shutil.copytree(pipeline, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # an export cut short
    assert main(["upload", "--pipeline", str(broken), "--repo-id", "someone/x", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"ddpm upload: error: --pipeline: {broken} does not load (") and err.endswith(
        "a partial or broken export is never uploaded"
    )


def test_upload_is_one_commit_and_a_rerun_makes_none(pipeline, tmp_path):
    with HubServer(TOKEN) as hub:
        r = run_cli(
            "upload",
            "--pipeline",
            str(pipeline),
            "--repo-id",
            "someone/tiny-digits",
            "--private",
            env=hub_env(hub, tmp_path),
        )
        assert r.returncode == 0, r.stderr
        repo = hub.repos["someone/tiny-digits"]
        assert repo.private
        commits = hub.commits("someone/tiny-digits")
        assert [c.message for c in commits] == ["initial commit", "Upload tiny (ddpm)"]
        files = hub.files("someone/tiny-digits")
        assert set(files) == COMMIT | {".gitattributes"}
        for name in PIPELINE_FILES:
            assert files[name] == (pipeline / name).read_bytes(), name
        assert files["README.md"].startswith(b"---\n") and b"library_name: diffusers" in files["README.md"]
        assert f"committed {commits[-1].sha[:10]}" in r.stdout

        # nothing changed: no commit, and the rerun says so
        r = run_cli(
            "upload", "--pipeline", str(pipeline), "--repo-id", "someone/tiny-digits", env=hub_env(hub, tmp_path)
        )
        assert r.returncode == 0, r.stderr
        assert len(hub.commits("someone/tiny-digits")) == 2
        assert "nothing changed: someone/tiny-digits@main already holds these files" in r.stdout

        # one changed file: a commit carrying that file only
        r = run_cli(
            "upload",
            "--pipeline",
            str(pipeline),
            "--repo-id",
            "someone/tiny-digits",
            "--license",
            "apache-2.0",
            env=hub_env(hub, tmp_path),
        )
        assert r.returncode == 0, r.stderr
        assert len(hub.commits("someone/tiny-digits")) == 3
        sent = [
            json.loads(line)["value"]["path"] for line in hub.requests[-1].body.splitlines() if b'"key": "file"' in line
        ]
        assert hub.requests[-1].path.endswith("/commit/main") and sent == ["README.md"]
        assert b"license: apache-2.0" in hub.files("someone/tiny-digits")["README.md"]

        # the token went in the Authorization header of every Hub API request, and nowhere else
        api = [req for req in hub.requests if req.path not in PUBLIC]
        assert len(api) >= 15 and all(req.headers.get("authorization") == f"Bearer {TOKEN}" for req in api)
        assert not any(TOKEN.encode() in req.body or TOKEN in req.path for req in hub.requests)
        assert TOKEN not in r.stdout + r.stderr


def test_revision_goes_to_its_own_branch(pipeline, tmp_path):
    with HubServer(TOKEN) as hub:
        r = run_cli(
            "upload",
            "--pipeline",
            str(pipeline),
            "--repo-id",
            "someone/tiny",
            "--revision",
            "step-6",
            env=hub_env(hub, tmp_path),
        )
        assert r.returncode == 0, r.stderr
        assert set(hub.files("someone/tiny", "step-6")) == COMMIT | {".gitattributes"}
        assert set(hub.files("someone/tiny", "main")) == {".gitattributes"}


def test_token_problems_are_one_line_and_never_show_the_token(pipeline, tmp_path):
    with HubServer(TOKEN) as hub:
        r = run_cli(
            "upload", "--pipeline", str(pipeline), "--repo-id", "someone/tiny", env=hub_env(hub, tmp_path, token=None)
        )
        assert r.returncode == 2
        assert r.stderr.strip().splitlines()[-1] == (
            "ddpm upload: error: no Hugging Face token: set HF_TOKEN, or run "
            "`hf auth login` once (the token is never printed)"
        )
        assert [r.path for r in hub.requests if r.path not in PUBLIC] == []  # nothing was asked of the Hub

        wrong = "hf_wrong_token_abcdefghij"
        r = run_cli(
            "upload", "--pipeline", str(pipeline), "--repo-id", "someone/tiny", env=hub_env(hub, tmp_path, token=wrong)
        )
        assert r.returncode == 2
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("ddpm upload: error: upload to someone/tiny failed: ") and "401 Unauthorized" in last
        assert last.endswith("(the token was refused: it needs write access to someone's repositories)")
        assert wrong not in r.stdout + r.stderr
        assert "someone/tiny" not in hub.repos


@pytest.mark.slow
def test_an_interrupted_upload_leaves_the_old_model_and_a_retry_finishes(pipeline, tmp_path):
    with HubServer(TOKEN) as hub:
        r = run_cli("upload", "--pipeline", str(pipeline), "--repo-id", "someone/tiny", env=hub_env(hub, tmp_path))
        assert r.returncode == 0, r.stderr
        before = hub.files("someone/tiny")

        # a connection lost once mid-commit: huggingface_hub retries, and exactly one commit lands
        hub.drop_commits = 1
        r = run_cli(
            "upload",
            "--pipeline",
            str(pipeline),
            "--repo-id",
            "someone/tiny",
            "--license",
            "apache-2.0",
            env=hub_env(hub, tmp_path),
        )
        assert r.returncode == 0, r.stderr
        assert (
            len(hub.commits("someone/tiny")) == 3 and b"license: apache-2.0" in hub.files("someone/tiny")["README.md"]
        )

        # lost on every retry: a one-line failure, and the repo still holds the previous model, whole
        before = hub.files("someone/tiny")
        hub.drop_commits = 100
        r = run_cli(
            "upload",
            "--pipeline",
            str(pipeline),
            "--repo-id",
            "someone/tiny",
            "--license",
            "cc-by-4.0",
            env=hub_env(hub, tmp_path),
        )
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and last.startswith("ddpm upload: error: upload to someone/tiny failed: ")
        assert last.endswith("a commit lands whole or not at all: rerun to finish")
        assert hub.files("someone/tiny") == before and len(hub.commits("someone/tiny")) == 3
        dropped = 100 - hub.drop_commits

        hub.drop_commits = 0
        r = run_cli(
            "upload",
            "--pipeline",
            str(pipeline),
            "--repo-id",
            "someone/tiny",
            "--license",
            "cc-by-4.0",
            env=hub_env(hub, tmp_path),
        )
        assert r.returncode == 0, r.stderr
        after = hub.files("someone/tiny")
        assert b"license: cc-by-4.0" in after["README.md"] and all(after[k] == before[k] for k in PIPELINE_FILES)
    report(
        fault="upload connection dropped mid-commit",
        injected=1 + dropped,
        transient_recovered=1,
        failed_cleanly=1,
        mixed_states_seen=0,
    )


def test_model_card_carries_the_published_weights_scores_as_model_index(tiny_run, tmp_path, shared_cache):
    run = copy_of_tiny_run(tiny_run, tmp_path)
    env = {"DDPM_CACHE": str(shared_cache / "ddpm")}
    for model in ("pipeline", "checkpoints/step-00000003"):  # the published weights (step 6), and a checkpoint
        r = cli(
            "evaluate", "--pipeline", str(run / model), "--metric", "digitsnet", "--num-images", "8", "--steps", "2",
            "--no-wandb", env=env,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
    scores = {json.loads(line)["step"]: json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()}
    r = cli("upload", "--pipeline", str(run / "pipeline"), "--repo-id", "someone/tiny", "--dry-run")
    assert r.returncode == 0, r.stderr
    card = r.stdout.split("--- README.md ---\n", 1)[1]
    [entry] = yaml.safe_load(card.split("---\n")[1])["model-index"]
    [result] = entry["results"]
    assert result["task"]["type"] == "unconditional-image-generation"
    assert result["dataset"]["name"] == "digits at 8px"
    metrics = {m["type"]: m for m in result["metrics"]}
    assert set(metrics) == {"fd_digitsnet", "kd_digitsnet"}  # only the step-6 weights' scores: those published
    assert metrics["fd_digitsnet"]["value"] == pytest.approx(scores[6]["fd_digitsnet"], rel=1e-5)
    assert "not FID" in metrics["fd_digitsnet"]["name"]
    assert metrics["fd_digitsnet"]["config"] == f"8 images, {DEFAULT_SAMPLER} 2 steps, seeds from 0"
    # the run's best score is named in the text when a checkpoint, not the published weights, holds it
    best_step = min(scores, key=lambda step: scores[step]["fd_digitsnet"])
    assert ("best FD-digitsnet" in card and "at training step 3" in card) == (best_step == 3)
