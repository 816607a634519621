"""herd.lm.train across two jax.distributed processes on localhost (gloo collectives, two
CPU devices each): both processes see the same global loss, the eval loss falls, and a
run preempted by a SIGTERM to ONE of its processes saves the same step on both, exits
cleanly, and resumed equals the uninterrupted run exactly."""

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

    # process 1 alone gets a SIGTERM as it reads its 2nd batch; both processes agree on
    # the step to save (JAX's preemption sync), save it together and return
    half = _run(tmp_path / "split", tmp_path / "half", "sigterm=1:2")
    assert half[0]["preempted"] and half[1]["preempted"]
    stop = half[0]["final_step"]
    assert half[1]["final_step"] == stop and 1 <= stop < 4
    steps = sorted(int(d) for d in os.listdir(tmp_path / "split" / "checkpoints") if d.isdigit())
    assert steps == [stop]
    rest = _run(tmp_path / "split", tmp_path / "rest")  # resumes at that step on both
    assert rest[0] == rest[1]
    assert {**half[0]["loss"], **rest[0]["loss"]} == full[0]["loss"]
    assert rest[0]["params_sum"] == full[0]["params_sum"]
