"""FIM vs no FIM at CI size: two tiny Llamas trained on the same stdlib documents, scored on
the same held-out single-line middles (tools/eval_infill.py, the full-size comparison).

What holds at this size, and is asserted: the model trained with FIM has learnt Code
Llama's infilling prompt (after ``<PRE> prefix <SUF> suffix <MID>`` it gives the true line
a far higher log-probability than the same model trained without FIM, and it ends its
middles with <EOT>, which a model without FIM never produces).

What does not hold at this size, and is only printed: that the FIM model infills lines
*better than the plain model completes them left to right from the prefix* (the issue's
exact-match comparison). A few hundred steps of a 0.14M-parameter model get no held-out
line exactly right either way (0 of 300 both ways at 300 steps, seeds 0-2), and the
infilling prompt still scores the true line lower than the plain model's left-to-right
prefix (-5.3, -5.3, -6.9 nats at 300 steps; -11.5 at 3000 steps, where exact match was
FIM 0/300 vs plain 2/300): the model learns the format but not yet to use the suffix (a
shuffled suffix scores the same). tools/eval_infill.py reproduces these runs.
"""

import importlib.util
import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 120  # per model; a run takes ~15-30 s of training on 2 cores
N_EXAMPLES = 100


def _tool():
    path = os.path.join(REPO, "tools", "eval_infill.py")
    spec = importlib.util.spec_from_file_location("eval_infill", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fim_model_learns_the_infilling_prompt(tmp_path):
    ei = _tool()
    corpus = ei.prepare_corpus(str(tmp_path / "corpus"), train_file_stride=4)
    assert corpus["train_documents"] > 10 * corpus["train_files"]  # files cut into documents
    r = ei.compare(
        corpus,
        str(tmp_path),
        steps=STEPS,
        seed=0,
        n_examples=N_EXAMPLES,
        fim_modes=("psm",),
        plain_modes=("left_to_right", "psm"),
    )  # fmt: skip (compare prints both exact-match rates, log-probabilities and timings)
    n = r["n"]
    print(
        f"exact match: FIM (PSM prompt) {r['fim_psm']}/{n}, "
        f"no FIM (left to right) {r['plain_left_to_right']}/{n}"
    )
    lp = r["logprob"]
    gain, se = ei.paired(lp["fim_psm"], lp["plain_psm"])
    assert gain > 5.0 and gain > 10 * se, (gain, se)  # nats per line, same prompts
    assert np.mean(np.asarray(lp["fim_psm"]) > np.asarray(lp["plain_psm"])) > 0.8
    assert r["fim_psm_finished"] >= n // 20 and r["plain_psm_finished"] == 0
    assert all(np.isfinite(r[f"{k}_eval_loss"]) for k in ("fim", "plain"))
