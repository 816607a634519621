"""herd.lm.train across two jax.distributed processes on localhost (gloo collectives, two
CPU devices each): both processes see the same global loss, the eval loss falls, and a
run stopped and resumed from its checkpoint equals the uninterrupted run exactly."""

import json
import os

import pytest

from tests.distributed import REPO, run_job

WORKER = os.path.join(REPO, "tests", "lm", "multiprocess_train_worker.py")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HERD_CACHE", str(tmp_path_factory.getbasetemp() / "herd_cache"))


def _run(workdir, out, *overrides):
    """Both processes of one 2-process run; returns their two summaries."""
    run_job(WORKER, lambda i: [str(workdir), f"{out}.{i}.json", "train.steps=4", *overrides])
    return [json.load(open(f"{out}.{i}.json")) for i in range(2)]


def test_two_process_training_agrees_and_resumes_exactly(tmp_path):
    full = _run(tmp_path / "full", tmp_path / "full")
    assert full[0] == full[1]  # global loss, eval and params, the same on both processes
    assert full[0]["final_step"] == 4 and sorted(full[0]["loss"]) == ["1", "2", "3", "4"]
    assert full[0]["eval"]["4"] < full[0]["eval"]["0"] - 0.1
    assert "4" in os.listdir(tmp_path / "full" / "checkpoints")

    half = _run(tmp_path / "split", tmp_path / "half", "train.stop_after=2")
    assert half[0]["final_step"] == 2
    rest = _run(tmp_path / "split", tmp_path / "rest")  # resumes at step 2 on both
    assert rest[0] == rest[1]
    assert {**half[0]["loss"], **rest[0]["loss"]} == full[0]["loss"]
    assert rest[0]["params_sum"] == full[0]["params_sum"]
