"""Pre-train (or continue training) a Llama-family model on a device mesh.

Usage::

    python -m herd.lm.train                                   # the embedded default
    python -m herd.lm.train --config=configs/lm/llama3_8b.py --workdir=/ckpt/llama3_8b
    python -m herd.lm.train --config.train.steps=200 --config.model.n_layers=2

With no arguments it trains a small Llama-3-style model (GQA, RoPE theta 5e5, document
masking of packed sequences) on this interpreter's own standard-library sources: it trains
and caches a SentencePiece tokenizer on first use (in $HERD_CACHE or ~/.cache/herd),
shows a progress bar with loss, tokens/s and MFU, evaluates on held-out stdlib files,
checkpoints to ``--workdir`` (default ``./workdir/lm``; rerunning resumes from the last
checkpoint, data iterator included) and ends with a short greedy sample from a code
prompt. 4-7 minutes on 2 CPU cores (4 on an AMD EPYC VM, 7 on an Intel Xeon one).

SIGTERM (preemption) checkpoints at the next step and exits with status 0 (with several
processes, all of them save the same step; rerunning the same command resumes); a NaN or
inf loss stops the run naming the step, keeping the last good checkpoint. Config errors
(heads vs kv heads, mesh vs device count, batch vs data-parallel size, seq_len vs
max_seq_len, unknown preset, missing corpus, tokenizer larger than the vocabulary, FIM
rates outside [0, 1], ``data.fim_rate`` > 0 with a tokenizer lacking the FIM sentinels) are
raised before anything is compiled.

``data.fim_rate`` > 0 turns on Code Llama's fill-in-the-middle for the training documents
(herd.lm.data, herd.lm.fim; ``configs/lm/tiny_fim.py``); a tokenizer the run trains itself
then gets the sentinels. Eval batches stay plain text. ``data.max_doc_chars`` > 0 first cuts
each file into documents of at most that many characters at top-level statements, so that
the FIM sequences of long files fit in a row (herd.lm.data.split_code_document).

``--config=path.py[:arg]`` picks an experiment file (configs/lm/*.py: one per published
family and size, for pods; ``configs/lm/tiny.py`` is the seconds-long test config);
``--config.key=value`` overrides any field; an unknown key is an error. Metrics go to
``workdir/metrics.jsonl`` and ``workdir/tb`` (TensorBoard).

``data.batch_ramp`` grows the batch during training as Llama 3 405B did (sec. 3.4.1), e.g.
``--config.data.batch_ramp=252e6:1024x8192,2.87e12:2048x8192``: at each stage the step is
compiled for the new shape and the data stream continues where it was (no token skipped
or repeated); a checkpoint resumes in the right stage. Eval batches keep the first shape.

``train.init_from`` fine-tunes from a checkpoint: a herd workdir (its latest step; one
written by ``python -m herd.lm.convert`` from Hugging Face or Meta weights too), its
``checkpoints`` directory or one ``checkpoints/<step>``. Only its params are read, straight
onto the train shardings; the optimiser state is fresh and the step starts at 0. Its stored
model is the base that the fields cfg.model sets change: weight-defining ones must agree
(one error names the field and both values) except that vocab_size may grow; rope_theta,
rope_scaling, max_seq_len, dtype, remat may change, which is what Code Llama's long-context
fine-tuning does (``configs/lm/code_llama_7b_longctx.py``: rope_theta 1e4 -> 1e6, sequences
4096 -> 16384). Its tokenizer is used unless data.tokenizer is set. A workdir that already
holds checkpoints of its own resumes them instead (the log says so).

The sample at the end is herd.lm.generate's greedy decoding (KV cache, one jitted loop).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
import types
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from herd.core import mesh as mesh_lib
from herd.core import step as step_lib
from herd.core.checkpoint import Checkpointer, read_config, restore_params
from herd.core.config import run_entry
from herd.core.data import stage_at
from herd.core.loop import TrainState, train_loop
from herd.core.metrics import MetricsWriter, ProgressBar, cache_dir, matmul_peak_flops
from herd.core.optim import make_optimizer
from herd.lm import data as data_lib
from herd.lm import ramp as ramp_lib
from herd.lm import tokenizer as tok_lib
from herd.lm.attention import check_attention_config
from herd.lm.fim import FIM_USER_DEFINED_SYMBOLS, FimTokens
from herd.lm.generate import generate
from herd.lm.loss import chunked_cross_entropy
from herd.lm.model import Llama, output_embedding
from herd.lm.presets import (
    build_model_config,
    check_checkpoint_model,
    finetune_model_config,
    model_config_fields,
)
from herd.lm.sharding import LM_RULES

__all__ = [
    "validate_config",
    "flops_per_token",
    "make_init_fn",
    "make_train_step",
    "make_eval_step",
    "resolve_init_from",
    "grow_vocab",
    "run",
    "main",
]

log = logging.getLogger("herd.lm.train")

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


# ----------------------------------------------------------------------------- config


def validate_config(cfg: ml_collections.ConfigDict, model_config, mesh) -> list:
    """Raises ValueError naming the bad value before anything is compiled.

    Returns the batch stages (herd.lm.ramp.BatchStage; one unless data.batch_ramp is set),
    each of which is checked like the first.
    """
    seq_len = int(cfg.data.seq_len)
    if seq_len <= 0:
        raise ValueError(f"data.seq_len must be positive, got {seq_len}")
    if int(cfg.train.grad_accum_steps) < 1:
        raise ValueError(f"train.grad_accum_steps must be >= 1, got {cfg.train.grad_accum_steps}")
    if int(cfg.train.steps) < 1:
        raise ValueError(f"train.steps must be >= 1, got {cfg.train.steps}")
    data_lib.check_fim_rates(
        cfg.data.get("fim_rate", 0.0), cfg.data.get("fim_spm_rate", 0.5), prefix="data."
    )
    max_doc = cfg.data.get("max_doc_chars") or 0
    if isinstance(max_doc, bool) or not isinstance(max_doc, int) or max_doc < 0:
        raise ValueError(
            f"data.max_doc_chars must be an int >= 0 (0 = one document per record), got {max_doc!r}"
        )
    chunk = cfg.train.get("vocab_chunk") or 0
    if chunk < 0:
        raise ValueError(f"train.vocab_chunk must be >= 0 (0 = whole vocabulary), got {chunk}")
    stages = ramp_lib.batch_stages(
        cfg.data.get("batch_ramp") or "", int(cfg.data.global_batch_size), seq_len
    )
    for i, stage in enumerate(stages):
        ramp_stage = f"data.batch_ramp stage {i} (from step {stage.start_step})"
        if stage.seq_len > model_config.max_seq_len:
            what = f"{ramp_stage}: seq_len" if i else "data.seq_len"
            raise ValueError(
                f"{what} {stage.seq_len} is above the model's max_seq_len "
                f"{model_config.max_seq_len}"
            )
        try:
            mesh_lib.check_global_batch(stage.global_batch, mesh, cfg.train.grad_accum_steps)
        except ValueError as e:
            if not i:
                raise
            raise ValueError(f"{ramp_stage}: {e}") from None
        check_attention_config(
            model_config.attention_impl,
            stage.seq_len,
            q_chunk=model_config.attention_q_chunk,
            n_heads=model_config.n_heads,
            n_kv_heads=model_config.n_kv_heads,
            head_dim=model_config.head_dim,
        )
    return stages


@dataclasses.dataclass(frozen=True)
class InitFrom:
    """Where a fine-tune's weights come from: checkpoint `step` (None: the latest) of
    `checkpoint_dir`; `workdir` (None when not inside one) may keep the tokenizer."""

    checkpoint_dir: str
    step: int | None
    workdir: str | None

    @property
    def config_file(self) -> str:
        step = self.step if self.step is not None else _latest_step(self.checkpoint_dir)
        return os.path.join(self.checkpoint_dir, str(step), "config")


def _latest_step(checkpoint_dir: str) -> int | None:
    """The newest complete step directory (orbax's temporary ones are not all digits)."""
    if not os.path.isdir(checkpoint_dir):
        return None
    steps = [int(d) for d in os.listdir(checkpoint_dir) if d.isdigit()]
    return max(steps) if steps else None


def resolve_init_from(path: str) -> InitFrom:
    """`train.init_from` -> InitFrom. Accepts a herd workdir (its latest checkpoint; also
    one written by ``python -m herd.lm.convert``), its ``checkpoints`` directory, or one
    step directory (``.../checkpoints/1000``). Anything else is one ValueError."""
    if path.startswith("<") and path.endswith(">"):  # configs/lm/*: the user's to set
        raise ValueError(
            f"train.init_from is the config's placeholder {path}: set "
            "--config.train.init_from to that checkpoint (a herd workdir; "
            "`python -m herd.lm.convert` makes one from a Hugging Face or Meta checkpoint)"
        )
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise ValueError(f"train.init_from {path!r} does not exist")
    name, parent = os.path.basename(path), os.path.dirname(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        found = InitFrom(os.path.join(path, "checkpoints"), None, path)
    elif name.isdigit() and os.path.isdir(path):
        workdir = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None
        found = InitFrom(parent, int(name), workdir)
    elif _latest_step(path) is not None:
        found = InitFrom(path, None, parent if name == "checkpoints" else None)
    else:
        raise ValueError(
            f"train.init_from {path!r} is neither a herd workdir (with checkpoints/), a "
            "checkpoints directory nor a checkpoint step directory (checkpoints/<step>)"
        )
    if found.step is None and _latest_step(found.checkpoint_dir) is None:
        raise ValueError(f"train.init_from {path!r} holds no checkpoint")
    return found


def _stored_model(checkpoint_dir: str, step: int | None, what: str) -> dict:
    """The 'model' section of the config stored with a checkpoint, or one ValueError."""
    try:
        stored = read_config(checkpoint_dir, step)
    except FileNotFoundError as e:
        raise ValueError(f"{what}: {e}") from None
    if not isinstance(stored.get("model"), dict):
        raise ValueError(f"{what}: the config stored in {checkpoint_dir} has no 'model' section")
    return stored["model"]


def grow_vocab(model, old_vocab: int, params, rng):
    """`params` of a `old_vocab`-token model with the token rows (input embedding, output
    head) of `model`'s larger vocabulary: the first `old_vocab` rows are `params`', the
    others a fresh init of `model` (its init_std). Jit it with the train shardings: only the
    two tables of the fresh init are computed."""
    fresh = nn.meta.unbox(model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"])
    grown = dict(params)
    emb = fresh["tok_embeddings"]["embedding"]
    grown["tok_embeddings"] = {
        "embedding": emb.at[:old_vocab].set(params["tok_embeddings"]["embedding"])
    }
    if "output" in fresh:  # untied head: [dim, vocab]
        head = fresh["output"]["kernel"]
        grown["output"] = {"kernel": head.at[:, :old_vocab].set(params["output"]["kernel"])}
    return grown


def _finetune_params(init, stored_vocab: int, built, mesh, rng):
    """train.init_from's params on the train shardings (params only, each host its shards)."""
    model = built.model
    if stored_vocab == model.config.vocab_size:
        return restore_params(init.checkpoint_dir, built.abstract.params, init.step)
    small = Llama(model.config.replace(vocab_size=stored_vocab))
    abstract, _ = mesh_lib.abstract_state(
        lambda r: small.init(r, jnp.zeros((1, 8), jnp.int32))["params"],
        rng,
        mesh=mesh,
        rules=LM_RULES,
    )
    params = restore_params(init.checkpoint_dir, abstract, init.step)
    tables = {k: params.pop(k) for k in ("tok_embeddings", "output") if k in params}

    def grow(rest, tables, rng):
        return grow_vocab(model, stored_vocab, {**rest, **tables}, rng)

    # the layers are donated (used in place); the smaller tables cannot be
    grow = jax.jit(grow, out_shardings=built.shardings.params, donate_argnums=0)
    return grow(params, tables, jax.random.fold_in(rng, 1))


def run_model_config(cfg: ml_collections.ConfigDict, workdir: str, say=print):
    """(LlamaConfig, InitFrom or None, the checkpoint's LlamaConfig or None): the model a
    run trains.

    Without train.init_from: cfg.model (a preset plus overrides). With it: the model stored
    with that checkpoint, with the fields cfg.model sets replacing it (weight-defining ones
    must agree: presets.finetune_model_config). When the run's own workdir already holds
    checkpoints the run resumes them, and their stored model is the base instead.
    """
    init_path = cfg.train.get("init_from") or ""
    if not init_path:
        return build_model_config(cfg.model), None, None
    own = os.path.join(workdir, "checkpoints")
    if _latest_step(own) is not None:
        say(
            f"train.init_from {init_path} is not read: the workdir holds checkpoints of this "
            "run, which resumes from them"
        )
        stored = _stored_model(own, None, f"the checkpoints of {workdir}")
        return finetune_model_config(stored, cfg.model, f"{own}"), None, None
    init = resolve_init_from(init_path)
    stored = _stored_model(init.checkpoint_dir, init.step, f"train.init_from {init_path!r}")
    model_config = finetune_model_config(stored, cfg.model, init.config_file)
    return model_config, init, build_model_config(stored)


def flops_per_token(model_config, seq_len: int) -> float:
    """Training FLOPs per token: 6 x non-embedding params (LM head included) + causal attention.

    The attention term is 6 x n_layers x seq_len x dim (12 x L x T x d halved for the causal
    mask), the convention of the Llama / PaLM MFU accounting that BENCHMARKS.md uses.
    """
    c = model_config
    hd = c.head_dim
    ffn = c.hidden_dim
    per_layer = (
        c.dim * c.n_heads * hd * 2  # wq, wo
        + c.dim * c.n_kv_heads * hd * 2  # wk, wv
        + 3 * c.dim * ffn
    )
    matmul_params = c.n_layers * per_layer + c.dim * c.vocab_size  # + LM head
    return 6.0 * matmul_params + 6.0 * c.n_layers * seq_len * c.dim


# ----------------------------------------------------------------------- step functions


def make_init_fn(model, optimizer, init_len: int = 8):
    """rng -> TrainState with boxed (logically partitioned) params, for mesh.init_sharded."""

    def init(rng):
        rng, init_rng = jax.random.split(rng)
        tokens = jnp.zeros((1, init_len), jnp.int32)
        params = model.init(init_rng, tokens)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=rng,
        )

    return init


def hidden_states(model, params, batch):
    """The model's final hidden states [B, T, dim] for a packed batch."""
    return model.apply(
        {"params": params},
        batch["inputs"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        return_hidden=True,
    )


def _loss_fn(model, vocab_chunk: int):
    """The core step contract for next-token prediction: (sum of NLL, tokens, no aux)."""
    chunk = vocab_chunk or model.config.vocab_size

    def loss_fn(params, batch, rng, extra):
        del rng, extra  # no dropout in the Llama recipe; no non-trained state
        hidden = hidden_states(model, params, batch)
        out_embedding = output_embedding(params, model.config)
        sum_nll, n_tokens = chunked_cross_entropy(
            hidden, out_embedding, batch["targets"], batch["loss_mask"], chunk
        )
        return sum_nll, n_tokens, {}

    return loss_fn


def _batch_shardings(mesh):
    return {k: mesh_lib.batch_sharding(mesh, 2) for k in BATCH_KEYS}


def make_train_step(
    model,
    optimizer: optax.GradientTransformation,
    *,
    mesh,
    state_shardings,
    rules=LM_RULES,
    grad_accum_steps: int = 1,
    vocab_chunk: int = 0,
):
    """The jitted train step `(state, batch) -> (state, metrics)` (herd.core.step).

    The loss is the token-weighted mean next-token cross-entropy (chunked over the
    vocabulary when `vocab_chunk` is set, so [B, T, V] logits are never built), masked by
    `loss_mask`; with `grad_accum_steps > 1` the batch is split into microbatches whose
    summed losses and gradients are divided once by the total token count (same result
    as one batch). metrics: loss, grad_norm (before clipping), tokens.
    """
    return step_lib.make_train_step(
        _loss_fn(model, vocab_chunk),
        optimizer,
        mesh=mesh,
        state_shardings=state_shardings,
        batch_shardings=_batch_shardings(mesh),
        rules=rules,
        grad_accum_steps=grad_accum_steps,
        weight_name="tokens",
    )


def make_eval_step(model, *, mesh, param_shardings, rules=LM_RULES, vocab_chunk=0):
    """Jitted `(params, batch) -> (sum_nll, n_tokens)`; average over batches by tokens."""
    evaluate = step_lib.make_eval_step(
        _loss_fn(model, vocab_chunk),
        mesh=mesh,
        param_shardings=param_shardings,
        batch_shardings=_batch_shardings(mesh),
        rules=rules,
    )

    def eval_step(params, batch):
        sum_nll, n_tokens, _ = evaluate(params, batch, None)
        return sum_nll, n_tokens

    return eval_step


# ------------------------------------------------------------------------ data set-up


def _sample_texts(src, n: int) -> list[str]:
    """Up to `n` documents (evenly spread) of a herd.lm.data record source, as text."""
    import json

    count = len(src)
    idx = range(count) if not n or count <= n else [int(i * count / n) for i in range(n)]
    texts = []
    for i in idx:
        value = src[i]
        if src.kind in ("json", "dict"):
            try:
                value = json.loads(value) if src.kind == "json" else value
                value = value[src.field]
            except (ValueError, KeyError, TypeError):
                continue
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if isinstance(value, str) and value:
            texts.append(value)
    return texts


def _tokenizer_for(cfg, train_source, corpus_hash: str, say, workdir: str, init=None):
    """(tokenizer, its file): the configured file, else the one the workdir's run kept,
    else the one kept with train.init_from's weights (`init`, an InitFrom), else a
    SentencePiece BPE trained on the corpus (cached in $HERD_CACHE)."""

    vocab = int(cfg.model.vocab_size) if cfg.model.get("vocab_size") else None
    path = cfg.data.get("tokenizer") or ""
    if path:
        if not os.path.exists(path):
            raise ValueError(f"data.tokenizer {path!r} does not exist")
        tok = tok_lib.load_tokenizer(path)
    elif os.path.isdir(os.path.join(workdir, tok_lib.WORKDIR_TOKENIZER_DIR)):
        path = tok_lib.workdir_tokenizer_path(workdir)
        say(f"tokenizer: the run's own {path}")
        tok = tok_lib.load_tokenizer(path)
    elif init is not None:  # the weights' own tokenizer: another one would garble them
        kept = init.workdir and os.path.join(init.workdir, tok_lib.WORKDIR_TOKENIZER_DIR)
        if not kept or not os.path.isdir(kept):
            raise ValueError(
                f"train.init_from {init.checkpoint_dir!r} keeps no tokenizer (no "
                f"{kept or 'workdir/tokenizer'} folder): set data.tokenizer to the tokenizer "
                "its weights were trained with"
            )
        path = tok_lib.workdir_tokenizer_path(init.workdir)
        say(f"tokenizer: train.init_from's {path}")
        tok = tok_lib.load_tokenizer(path)
    else:
        if not vocab:
            raise ValueError("data.tokenizer is empty and model.vocab_size is not set")
        n_docs = int(cfg.data.get("tokenizer_train_files") or 0)
        fim = float(cfg.data.get("fim_rate") or 0.0) > 0  # FIM: the sentinels in the vocab
        name = f"sp_{corpus_hash[:16]}_v{vocab}_f{n_docs}{'_fim' if fim else ''}.model"
        model_path = os.path.join(cache_dir(), "tokenizers", name)
        if os.path.exists(model_path):
            say(f"tokenizer: cached {model_path}")
            tok = tok_lib.load_tokenizer(model_path)
        else:
            if isinstance(train_source, list):  # text files: evenly spaced ones
                docs = train_source
                if n_docs and len(docs) > n_docs:
                    docs = [docs[int(i * len(docs) / n_docs)] for i in range(n_docs)]
            else:
                docs = _sample_texts(data_lib.make_source(train_source), n_docs)
            os.makedirs(os.path.dirname(model_path), exist_ok=True)
            say(f"tokenizer: training a {vocab}-token SentencePiece BPE on {len(docs)} documents")
            t0 = time.perf_counter()
            extra = {"user_defined_symbols": FIM_USER_DEFINED_SYMBOLS} if fim else {}
            tok = tok_lib.train_tokenizer(docs, vocab, model_path, **extra)
            say(f"tokenizer: {model_path} ({time.perf_counter() - t0:.1f}s)")
    if vocab and tok.vocab_size > vocab:
        raise ValueError(
            f"tokenizer has {tok.vocab_size} tokens but model.vocab_size is {vocab}: "
            f"token ids up to {tok.vocab_size - 1} would be outside the vocabulary"
        )
    if float(cfg.data.get("fim_rate") or 0.0) > 0:
        FimTokens.from_tokenizer(tok)  # ValueError naming the missing sentinels
    return tok, path or model_path


def _corpus(cfg, say):
    """(train source, eval source, corpus hash) from cfg.data; raises if missing or empty."""

    source = cfg.data.get("source") or ""
    if not source:
        raise ValueError(
            "data.source is empty: set --config.data.source to files/globs or a spec like "
            "'jsonl:<glob>[:field]' (or 'stdlib' for the interpreter's standard library)"
        )
    if source == "stdlib":
        frac = cfg.data.get("eval_fraction") or 0.02
        train_files, digest = data_lib.stdlib_files("train", eval_fraction=frac)
        eval_files, _ = data_lib.stdlib_files("eval", eval_fraction=frac)
        if not train_files or not eval_files:
            raise ValueError(
                f"the standard library split has {len(train_files)} train and "
                f"{len(eval_files)} eval files (data.eval_fraction {frac}): both must be > 0"
            )
        say(
            f"corpus: stdlib {len(train_files)} train / {len(eval_files)} eval files, "
            f"file-list sha256 {digest[:16]}"
        )
        return train_files, eval_files, digest
    eval_source = cfg.data.get("eval_source") or ""
    if not eval_source:
        raise ValueError("data.eval_source is empty (set it when data.source is not 'stdlib')")
    # make_source raises ValueError naming a missing glob or an empty corpus
    n_train = len(data_lib.make_source(source))
    n_eval = len(data_lib.make_source(eval_source))
    import hashlib

    digest = hashlib.sha256(f"{source}|{n_train}".encode()).hexdigest()
    say(f"corpus: {source} ({n_train} records), eval {eval_source} ({n_eval} records)")
    return source, eval_source, digest


@functools.lru_cache(maxsize=4)
def _build(model_config, optim_items, steps, mesh, grad_accum_steps, vocab_chunk):
    """Model, optimiser and jitted init / train / eval functions for one set-up.

    Cached, so repeated `run()` calls in one process (tests, notebooks, resumes) reuse the
    compiled executables instead of compiling them again.
    """

    model = Llama(model_config)
    optimizer, schedule = make_optimizer(dict(optim_items), steps)
    rules = LM_RULES
    init_fn = make_init_fn(model, optimizer)
    abstract, shardings = mesh_lib.abstract_state(
        init_fn, jax.random.key_data(jax.random.key(0)), mesh=mesh, rules=rules
    )
    init = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)
    train_step = make_train_step(
        model,
        optimizer,
        mesh=mesh,
        state_shardings=shardings,
        rules=rules,
        grad_accum_steps=grad_accum_steps,
        vocab_chunk=vocab_chunk,
    )
    eval_step = make_eval_step(
        model, mesh=mesh, param_shardings=shardings.params, rules=rules, vocab_chunk=vocab_chunk
    )

    def state_from_params(params, rng):  # a fine-tune's start: step 0, fresh optimiser state
        rng, _ = jax.random.split(rng)  # as init does, so train.seed means the same
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=rng
        )

    from_params = jax.jit(
        state_from_params,
        in_shardings=(shardings.params, shardings.rng),
        out_shardings=shardings,
        donate_argnums=0,
    )
    return types.SimpleNamespace(
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        abstract=abstract,
        shardings=shardings,
        init=init,
        from_params=from_params,
        train_step=train_step,
        eval_step=eval_step,
    )


# ------------------------------------------------------------------------------- run


def run(cfg: ml_collections.ConfigDict, workdir: str, *, progress: bool | None = None) -> dict:
    """Trains as `cfg` says in `workdir` (resuming if it holds checkpoints); returns a summary.

    summary: {'eval': {step: {'eval_loss': ...}}, 'loss': {step: train loss},
              'sample': str, 'final_step': int, 'workdir': str, 'seconds': float,
              'state': the final TrainState}
    """

    t_run = time.perf_counter()
    workdir = os.path.abspath(workdir)
    show = cfg.train.get("progress", True) if progress is None else progress
    bar_holder: list[ProgressBar] = []

    def say(text: str) -> None:
        if bar_holder:
            bar_holder[0].write(text)
        elif jax.process_index() == 0:
            print(text, flush=True)

    # --- everything a user can get wrong is checked before compiling anything
    say(f"workdir: {workdir}")
    model_config, init, init_model = run_model_config(cfg, workdir, say)
    mesh = mesh_lib.make_mesh(dict(cfg.mesh))
    stages = validate_config(cfg, model_config, mesh)
    say(f"mesh: {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices")
    train_source, eval_source, digest = _corpus(cfg, say)
    tokenizer, tokenizer_file = _tokenizer_for(cfg, train_source, digest, say, workdir, init)

    common = dict(
        vocab_size=model_config.vocab_size,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )

    def shape(stage):  # this process's share of a stage's global batch
        return dict(seq_len=stage.seq_len, batch_size=stage.global_batch // jax.process_count())

    def train_iterator(stage):
        return data_lib.make_lm_iterator(
            train_source,
            tokenizer,
            seed=int(cfg.data.seed),
            shuffle=True,
            num_epochs=None,
            worker_count=int(cfg.data.get("worker_count") or 0),
            fim_rate=float(cfg.data.get("fim_rate") or 0.0),
            fim_spm_rate=float(cfg.data.get("fim_spm_rate", 0.5)),
            max_doc_chars=cfg.data.get("max_doc_chars") or 0,
            **common,
            **shape(stage),
        )

    if len(stages) > 1:
        say(
            "batch ramp: "
            + ", ".join(f"{s.global_batch} x {s.seq_len} from step {s.start_step}" for s in stages)
        )
        train_iter = data_lib.StagedIterator(train_iterator, stages)
    else:
        train_iter = train_iterator(stages[0])
    n_eval = int(cfg.train.eval_batches)
    eval_iter = data_lib.make_lm_iterator(  # eval batches keep the first stage's shape
        eval_source,
        tokenizer,
        seed=0,
        shuffle=False,
        num_epochs=1,
        max_doc_chars=cfg.data.get("max_doc_chars") or 0,
        **common,
        **shape(stages[0]),
    )
    eval_batches = []
    for batch in eval_iter:
        eval_batches.append({k: np.asarray(batch[k]) for k in BATCH_KEYS})
        if len(eval_batches) >= n_eval:
            break
    if not eval_batches:
        raise ValueError(f"the eval corpus {eval_source!r} produced no batches")

    # --- model, optimiser, sharded state
    steps = int(cfg.train.steps)
    optim_cfg = dict(cfg.optim)
    if optim_cfg.get("eps") is None:  # the family's value (Llama 2 sec. 2.2: 1e-5)
        optim_cfg["eps"] = model_config.optimizer_eps
    vocab_chunk = int(cfg.train.get("vocab_chunk") or 0)
    built = _build(
        model_config,
        tuple(sorted(optim_cfg.items())),
        steps,
        mesh,
        int(cfg.train.grad_accum_steps),
        vocab_chunk,
    )
    schedule, abstract = built.schedule, built.abstract
    train_step, eval_step = built.train_step, built.eval_step
    ckpt_dir = os.path.join(workdir, "checkpoints")
    stored_config = cfg
    if cfg.train.get("init_from"):
        # the model this run trains, whole: the checkpoints then describe themselves
        # (generate, embed and further fine-tunes read them without this run's base)
        stored_config = cfg.to_dict()
        stored_config["model"] = model_config_fields(model_config)
    ckpt = Checkpointer(
        ckpt_dir,
        keep=int(cfg.train.keep_checkpoints),
        async_save=bool(cfg.train.get("async_checkpoints", True)),
        config=stored_config,
    )
    if ckpt.latest_step() is not None:
        check_checkpoint_model(ckpt_dir, model_config)
    if jax.process_index() == 0:
        tok_lib.save_to_workdir(tokenizer_file, workdir)
    rng = jax.random.key_data(jax.random.key(int(cfg.train.seed)))
    if init is not None and ckpt.latest_step() is None:
        step_text = "the latest step" if init.step is None else f"step {init.step}"
        say(
            f"fine-tuning from {init.checkpoint_dir} ({step_text}): params only, fresh "
            "optimiser state, step 0"
        )
        if init_model.vocab_size != model_config.vocab_size:
            say(
                f"vocabulary grown from {init_model.vocab_size} to {model_config.vocab_size} "
                "tokens: the new rows start as a fresh model's"
            )
        # read straight onto the train shardings, each host its own shards; the
        # optimiser state stored there (none, for converted models) is never read
        params = _finetune_params(init, init_model.vocab_size, built, mesh, rng)
        state, start = built.from_params(params, rng), None
    else:
        state, start = step_lib.init_or_restore(ckpt, built.init, abstract, rng, train_iter, say)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    say(
        f"model: {n_params / 1e6:.2f}M params, dim {model_config.dim}, "
        f"{model_config.n_layers} layers, {model_config.n_heads} heads / "
        f"{model_config.n_kv_heads} kv heads, vocab {model_config.vocab_size}, "
        f"seq {stages[0].seq_len}"
    )

    def eval_fn(st):
        total, count = 0.0, 0.0
        for b in eval_batches:
            s, n = eval_step(st.params, mesh_lib.shard_batch(b, mesh))
            total += float(s)
            count += float(n)
        return {"eval_loss": total / max(count, 1.0)}

    def tokens_per_step(step):
        return stage_at(stages, step).tokens_per_step

    def flops_per_step(step):
        stage = stage_at(stages, step)
        return flops_per_token(model_config, stage.seq_len) * stage.tokens_per_step

    peak = matmul_peak_flops(model_config.dtype)
    writer = MetricsWriter(workdir, tensorboard=bool(cfg.train.get("tensorboard", True)))
    writer.write(
        int(jax.device_get(state.step)),
        {"n_params": n_params, "corpus_sha256": digest, "peak_flops": peak},
    )
    bar = ProgressBar(steps, initial=int(jax.device_get(state.step)), unit="tok", enabled=show)
    bar_holder.append(bar)

    # stop_after: end this invocation early (the schedule still spans train.steps); the
    # next invocation resumes. Used to test resume and to split long jobs.
    stop_after = int(cfg.train.get("stop_after") or 0)
    num_steps = min(steps, stop_after) if stop_after else steps
    history = {"loss": {}, "eval": {}}
    try:
        state, history = train_loop(
            state,
            train_step,
            train_iter,
            num_steps=num_steps,
            put_batch=lambda b: mesh_lib.shard_batch({k: b[k] for k in BATCH_KEYS}, mesh),
            eval_fn=eval_fn,
            eval_every=int(cfg.train.eval_every),
            checkpointer=ckpt,
            checkpoint_every=int(cfg.train.checkpoint_every),
            writer=writer,
            progress=bar,
            log_every=int(cfg.train.log_every),
            units_per_step=tokens_per_step,
            unit="tokens",
            flops_per_step=flops_per_step,
            peak_flops=peak,
            eval_at_start=bool(cfg.train.get("eval_at_start", True)) and start is None,
        )
    finally:
        bar.close()
        bar_holder.clear()
        ckpt.close()
        writer.close()

    if not history["eval"] and not history.get("preempted"):
        history["eval"][int(jax.device_get(state.step))] = eval_fn(state)
    summary = {
        "workdir": workdir,
        "eval": history["eval"],
        "loss": history["loss"],
        "final_step": int(jax.device_get(state.step)),
        "preempted": history.get("preempted", False),
        "lr_final": float(schedule(steps)),
        "state": state,
    }
    evals = sorted(history["eval"].items())
    if len(evals) >= 2:
        say(
            f"eval loss: {evals[0][1]['eval_loss']:.4f} (step {evals[0][0]}) -> "
            f"{evals[-1][1]['eval_loss']:.4f} (step {evals[-1][0]})"
        )
    prompt = cfg.train.get("sample_prompt") or ""
    n_new = int(cfg.train.get("sample_tokens") or 0)
    if prompt and n_new and not summary["preempted"]:
        room = model_config.max_seq_len - len(tokenizer.encode(prompt, bos=True))
        if room <= 0:
            say(f"no sample: the prompt fills the model's max_seq_len {model_config.max_seq_len}")
        else:
            if n_new > room:
                say(f"sample: {room} new tokens (max_seq_len {model_config.max_seq_len})")
            sample = generate(
                model_config,
                state.params,
                tokenizer,
                [prompt],
                max_new_tokens=min(n_new, room),
                mesh=mesh,
            )[0]
            summary["sample"] = sample
            say("greedy sample:\n" + prompt + sample)
    summary["seconds"] = time.perf_counter() - t_run
    say(f"done in {summary['seconds']:.0f}s; workdir {workdir}")
    return summary


DEFAULT_CONFIG = "lm/default.py"
DEFAULT_WORKDIR = os.path.join(".", "workdir", "lm")


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m herd.lm.train [--config=path.py[:arg]] [--config.k=v] [--workdir=DIR]`."""

    run_entry(
        run,
        DEFAULT_CONFIG,
        DEFAULT_WORKDIR,
        "Checkpoints, metrics and logs go here.",
        argv,
    )


if __name__ == "__main__":
    main()
