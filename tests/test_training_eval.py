"""In-training evaluation: scores at the training step in metrics.jsonl and scores.jsonl, equal to `ddpm evaluate`
of the checkpoint at that step, with one process or two."""

from __future__ import annotations

import json

import pytest

from ddpm.config import DEFAULT_SAMPLER, load_config
from ddpm.evaluation.scores import best_score, read_scores
from ddpm.training.loop import train
from jobs.evaluate import EvaluateConfig
from jobs.evaluate import run as evaluate
from tests.conftest import run_cli

EVAL = ["train.eval_every=3", "train.eval_images=12", "train.eval_metric=digitsnet"]


@pytest.fixture
def feature_cache(shared_cache, monkeypatch):
    monkeypatch.setenv("DDPM_CACHE", str(shared_cache / "ddpm"))  # feature net and reference features, shared


def _evaluate(checkpoint) -> dict:
    cfg = EvaluateConfig(
        pipeline=str(checkpoint), metric="digitsnet", num_images=12, scheduler=DEFAULT_SAMPLER, steps=2, seed=0,
        precision="fp32", wandb=False,
    )  # fmt: skip
    return evaluate(cfg)


def test_scores_at_the_training_step_equal_ddpm_evaluate_of_the_checkpoint(tiny, feature_cache):
    cfg = load_config(None, tiny(*EVAL))
    train(cfg)
    logged = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval/fd_digitsnet"] for r in logged if "eval/fd_digitsnet" in r}
    assert sorted(evals) == [3, 6]
    scores = {r["step"]: r for r in read_scores(cfg.run_dir)}
    assert sorted(scores) == [3, 6]
    assert scores[3]["fd_digitsnet"] == evals[3] and scores[3]["num_images"] == 12
    assert scores[3]["reference_data"] == "digits at 8px" and scores[3]["source"] == "training"

    later = _evaluate(cfg.run_dir / "checkpoints" / "step-00000003")
    assert later["fd_digitsnet"] == pytest.approx(evals[3], rel=1e-4)
    # ... and the later score is attached to the run at its training step
    attached = [r for r in read_scores(cfg.run_dir) if r["source"] == "evaluate"]
    assert [r["step"] for r in attached] == [3]
    assert best_score(read_scores(cfg.run_dir))["step"] in (3, 6)


def test_a_resumed_run_keeps_one_score_per_step(tiny, feature_cache):
    cfg = load_config(None, tiny(*EVAL, "train.stop_after=4"))
    assert train(cfg) is None  # left at step 4, checkpoint at 4; evaluated at 3
    train(load_config(None, tiny(*EVAL)))  # resumes at 4: evaluates at 6
    lines = (cfg.run_dir / "scores.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [3, 6]


def test_two_processes_spread_the_sampling_and_score_like_ddpm_evaluate(tiny, feature_cache, shared_cache):
    args = tiny(*EVAL, "train.max_steps=3", name="two")
    r = run_cli("train", "--processes", "2", *args, env={"DDPM_CACHE": str(shared_cache / "ddpm")}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = load_config(None, args).run_dir
    [score] = read_scores(run_dir)
    assert score["step"] == 3 and score["num_images"] == 12
    later = _evaluate(run_dir / "checkpoints" / "step-00000003")
    assert later["fd_digitsnet"] == pytest.approx(score["fd_digitsnet"], rel=1e-4)
