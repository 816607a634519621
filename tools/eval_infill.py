"""Does fill-in-the-middle training pay off? Two tiny Llamas, with and without FIM.

Usage::

    python tools/eval_infill.py                        # seed 0, 3000 steps a model
    python tools/eval_infill.py --steps=300 --seeds 0 1 2 --examples=300

For each seed two models of configs/lm/tiny_fim.py (with RUN_OVERRIDES below) are trained
by ``herd.lm.train.run`` on the same standard-library documents in the same order, from the
same initialisation: one with ``data.fim_rate`` 0.9 (Code Llama, Roziere et al. 2023 sec.
2.3), one with 0.0. The source files are cut into documents of at most ``--max_doc_chars``
characters at top-level statements (``herd.lm.data.split_code_document``: the small-scale
stand-in for Code Llama's 4096-token contexts, so that FIM reaches nearly every document)
and written as JSONL that both runs read; both use one SentencePiece tokenizer trained with
the FIM sentinels.

Both are then scored on the same single-line infilling tasks drawn from the held-out
standard-library files (the trainer's eval split, ``herd.lm.fim.single_line_examples``):

* exact match (``herd.lm.fim.infill_exact_match``, greedy): the FIM model through the PSM
  infilling prompt (and SPM), the plain model left to right from the prefix (what a model
  without FIM can do);
* the finer teacher-forced log-probability of the true line (``infill_line_logprob``):
  the FIM model after the PSM / SPM prompt, the plain model left to right and after the
  same PSM prompt (a model that never saw the sentinels);
* ``finished``: how many PSM generations the model ended with <EOT>.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

FIM_RATE = 0.9  # Code Llama
EVAL_FRACTION = 0.02  # configs/lm/common.py's data.eval_fraction: the trainer's held-out files
VOCAB = 512  # configs/lm/tiny.py
TOKENIZER_FILES = 40  # configs/lm/tiny.py's data.tokenizer_train_files
# Documents of <= 200 characters (~110 tokens with the 512-token tokenizer) in rows of 128:
# the FIM sequence of nearly every document fits one row, and short rows give the tiny
# model many more documents per second than rows of 256 (measured here: with 400-character
# documents in rows of 256 the same model learnt less in the same time).
MAX_DOC_CHARS = 200
RUN_OVERRIDES = {
    "data.seq_len": 128,
    "data.global_batch_size": 16,
    "optim.lr": 1e-2,  # 3e-3 (tiny.py) learnt markedly slower in 800 steps (eval loss 2.89)
}
# The infilling tasks: prompts of about 110 tokens, lines of at most 60 characters.
EXAMPLE_ARGS = dict(max_prefix_chars=120, max_suffix_chars=80, max_line_chars=60)
MAX_NEW_TOKENS = 40


def prepare_corpus(
    directory: str,
    *,
    max_doc_chars: int = MAX_DOC_CHARS,
    eval_fraction: float = EVAL_FRACTION,
    vocab: int = VOCAB,
    tokenizer_files: int = TOKENIZER_FILES,
    train_file_stride: int = 1,
) -> dict:
    """Writes train.jsonl / eval.jsonl (the stdlib split cut into documents; every
    ``train_file_stride``-th training file) and a FIM tokenizer under ``directory``;
    returns their paths and the held-out files' texts."""
    from herd.lm import data as dl
    from herd.lm.fim import FIM_USER_DEFINED_SYMBOLS
    from herd.lm.tokenizer import train_tokenizer

    os.makedirs(directory, exist_ok=True)
    train_files, digest = dl.stdlib_files("train", eval_fraction=eval_fraction)
    eval_files, _ = dl.stdlib_files("eval", eval_fraction=eval_fraction)
    paths = {}
    for split, files in (("train", train_files[::train_file_stride]), ("eval", eval_files)):
        path = os.path.join(directory, f"{split}.jsonl")
        docs = dl.code_documents(files, max_doc_chars)
        with open(path, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
        paths[split] = path
        paths[f"{split}_documents"] = len(docs)
    step = max(1, len(train_files) // tokenizer_files)
    tok_path = os.path.join(directory, f"fim_v{vocab}.model")
    train_tokenizer(
        train_files[::step][:tokenizer_files], vocab, tok_path,
        user_defined_symbols=FIM_USER_DEFINED_SYMBOLS, input_kind="files",
    )  # fmt: skip
    texts, names = [], []
    for p in eval_files:
        with open(p, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
        names.append(os.path.relpath(p, os.path.dirname(train_files[0])))
    return dict(
        paths, tokenizer=tok_path, eval_texts=texts, eval_names=names, corpus_sha256=digest,
        train_files=len(train_files[::train_file_stride]), eval_files=len(eval_files),
        max_doc_chars=max_doc_chars,
    )  # fmt: skip


def config(corpus: dict, *, fim_rate: float, steps: int, seed: int, overrides: dict | None = None):
    """configs/lm/tiny_fim.py with RUN_OVERRIDES (and ``overrides``) on the prepared
    corpus, ``fim_rate`` as given."""
    from herd.core.config import load_config

    c = load_config("lm/tiny_fim.py")
    c.data.source = f"jsonl:{corpus['train']}"
    c.data.eval_source = f"jsonl:{corpus['eval']}"
    c.data.tokenizer = corpus["tokenizer"]
    c.data.fim_rate = fim_rate
    c.data.seed = seed
    c.train.seed = seed
    c.train.steps = steps
    c.optim.warmup_steps = max(1, steps // 20)
    c.train.eval_every = steps
    c.train.eval_at_start = False
    c.train.checkpoint_every = steps
    c.train.keep_checkpoints = 1
    c.train.log_every = max(1, steps // 5)
    c.train.sample_tokens = 0
    for key, value in {**RUN_OVERRIDES, **(overrides or {})}.items():
        node = c
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return c


def compare(
    corpus: dict,
    workdir: str,
    *,
    steps: int,
    seed: int,
    n_examples: int,
    example_seed: int = 0,
    overrides: dict | None = None,
    example_args: dict | None = None,
    fim_modes=("psm", "spm", "left_to_right"),
    plain_modes=("left_to_right", "psm"),
    log=print,
) -> dict:
    """Trains the FIM and the plain model for one seed and scores both on the same
    held-out single-line examples (module docstring). Returns counts, mean
    log-probabilities, the per-example log-probabilities and timings."""
    from herd.lm.fim import infill_exact_match, infill_line_logprob, single_line_examples
    from herd.lm.tokenizer import load_tokenizer
    from herd.lm.train import build_model_config, run

    tok = load_tokenizer(corpus["tokenizer"])
    examples = single_line_examples(
        corpus["eval_texts"], n_examples, seed=example_seed, names=corpus["eval_names"],
        **{**EXAMPLE_ARGS, **(example_args or {})},
    )  # fmt: skip
    out = {"seed": seed, "steps": steps, "n": n_examples, "logprob": {}}
    plan = {"fim": (FIM_RATE, tuple(fim_modes)), "plain": (0.0, tuple(plain_modes))}
    for name, (rate, modes) in plan.items():
        cfg = config(corpus, fim_rate=rate, steps=steps, seed=seed, overrides=overrides)
        t0 = time.perf_counter()
        summary = run(cfg, os.path.join(workdir, f"{name}_s{seed}"), progress=False)
        out[f"{name}_train_s"] = time.perf_counter() - t0
        out[f"{name}_eval_loss"] = summary["eval"][max(summary["eval"])]["eval_loss"]
        model_config = build_model_config(cfg.model)
        params = summary["state"].params
        t0 = time.perf_counter()
        for mode in modes:
            res = infill_exact_match(
                model_config, params, tok, examples, mode=mode, max_new_tokens=MAX_NEW_TOKENS
            )
            out[f"{name}_{mode}"] = res.exact
            out[f"{name}_{mode}_finished"] = res.finished
            out[f"{name}_{mode}_predictions"] = list(res.predictions)
            lp = infill_line_logprob(model_config, params, tok, examples, mode=mode)
            out["logprob"][f"{name}_{mode}"] = lp.tolist()
            out[f"{name}_{mode}_logprob"] = float(np.mean(lp))
        out[f"{name}_infill_s"] = time.perf_counter() - t0
    out["middles"] = [e.middle for e in examples]
    log(summary_line(out))
    return out


def paired(a, b) -> tuple[float, float]:
    """Mean of a - b and its standard error (paired over the same examples)."""
    d = np.asarray(a) - np.asarray(b)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size))


def summary_line(r: dict) -> str:
    n = r["n"]
    lines = [f"seed {r['seed']}, {r['steps']} steps, {n} held-out lines:"]
    keys = ("fim_psm", "fim_spm", "fim_left_to_right", "plain_left_to_right", "plain_psm")
    em = [f"{k} {r[k]}/{n} = {r[k] / n:.1%}" for k in keys if k in r]
    lines.append("  exact match: " + ", ".join(em))
    lines.append(
        "  log p(true line + end), mean nats: "
        + ", ".join(f"{k} {r[k + '_logprob']:.2f}" for k in r["logprob"])
    )
    lp = r["logprob"]
    for a, b in (
        ("fim_psm", "plain_left_to_right"),
        ("fim_spm", "plain_left_to_right"),
        ("fim_psm", "plain_psm"),
    ):
        if a in lp and b in lp:
            m, se = paired(lp[a], lp[b])
            lines.append(f"  {a} - {b}: {m:+.2f} +- {se:.2f} nats (paired, 1 s.e.)")
    if "fim_psm_finished" in r and "plain_psm_finished" in r:
        lines.append(
            f"  PSM generations ended with <EOT>: fim {r['fim_psm_finished']}/{n}, "
            f"plain {r['plain_psm_finished']}/{n}"
        )
    lines.append(
        f"  train {r['fim_train_s']:.0f}s / {r['plain_train_s']:.0f}s, infill eval "
        f"{r['fim_infill_s']:.0f}s / {r['plain_infill_s']:.0f}s; eval loss "
        f"{r['fim_eval_loss']:.3f} / {r['plain_eval_loss']:.3f}"
    )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--examples", type=int, default=300)
    p.add_argument("--example_seed", type=int, default=0)
    p.add_argument("--max_doc_chars", type=int, default=MAX_DOC_CHARS)
    p.add_argument("--train_file_stride", type=int, default=1)
    p.add_argument("--workdir", default="")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, e.g. model.dim=128 (values parsed as JSON)",
    )
    p.add_argument("--json", default="", help="write all results here")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    workdir = args.workdir or tempfile.mkdtemp(prefix="herd-infill-")
    corpus = prepare_corpus(
        os.path.join(workdir, "corpus"),
        max_doc_chars=args.max_doc_chars,
        train_file_stride=args.train_file_stride,
    )
    print(
        f"corpus: {corpus['train_files']} train files -> {corpus['train_documents']} documents"
        f" of <= {args.max_doc_chars} chars; {corpus['eval_files']} held-out files",
        flush=True,
    )
    results = []
    for seed in args.seeds:
        results.append(
            compare(corpus, workdir, steps=args.steps, seed=seed, n_examples=args.examples,
                    example_seed=args.example_seed, overrides=overrides)
        )  # fmt: skip
    print("\n".join(summary_line(r) for r in results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
