"""Text generation with a KV cache: batched prefill, then one jitted ``lax.while_loop``.

Library::

    from herd.lm.generate import generate, generate_tokens
    ids = generate_tokens(model_config, params, [[1, 5, 9], [1, 7]], max_new_tokens=32)
    texts = generate(model_config, params, tokenizer, ["def f(", "import "],
                     max_new_tokens=64, temperature=0.8, top_p=0.95, seed=0)

Prompts of different lengths are left-padded internally (their positions still start at
0; padding is never attended), prefilled in one forward pass into a KV cache
(``herd.lm.model.init_cache``), and the new tokens are decoded inside one jitted
``lax.while_loop`` (no Python per token) that stops when every row has produced a stop
token or after ``max_new_tokens``. Sampling: greedy (``temperature=0``), temperature,
top-k, top-p (nucleus), repetition penalty (Hugging Face semantics: a seen token's logit
is divided by the penalty when positive, multiplied when negative), a seed. Given a
``mesh`` the batch is split over data/fsdp and heads (and the cache's kv heads) over
tensor, by the model's logical axes (``herd.lm.sharding.LM_RULES``).

CLI::

    python -m herd.lm.generate [--workdir=./workdir/lm] [--prompt='import os'] \
        [--max_new_tokens=64] [--temperature=0] [--top_k=0] [--top_p=1] [--seed=0]

reads the latest checkpoint of a ``herd.lm.train`` workdir (its config, params alone and
tokenizer) and prints the prompt and its continuation.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from herd.lm.config import LlamaConfig
from herd.lm.model import Llama, init_cache
from herd.lm.sharding import LM_RULES

__all__ = ["generate", "generate_tokens", "check_sampling", "main"]

DEFAULT_WORKDIR = os.path.join(".", "workdir", "lm")


def check_sampling(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0) -> None:
    """ValueError naming the value for sampling settings that cannot work."""
    if not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(repetition_penalty, (int, float)) or not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty!r}")


def _sample(logits, seen, rng, temperature, top_k, top_p, penalty):
    """Next tokens [B] int32 from logits [B, V] (float32) and the seen-token mask [B, V]."""
    logits = logits.astype(jnp.float32)
    if penalty != 1.0:
        penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
        logits = jnp.where(seen, penalised, logits)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        # Keep a token while the mass strictly above it is below top_p (the smallest set
        # reaching top_p, at least one token), as Hugging Face's TopPLogitsWarper.
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        n_keep = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
        thresh = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
        logits = jnp.where(logits < thresh, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _mark(seen, tokens, valid):
    """seen [B, V] with tokens [B, T] (where valid [B, T]) set."""
    return jax.vmap(lambda s, t, m: s.at[t].max(m))(seen, tokens, valid)


@functools.lru_cache(maxsize=16)
def _generate_fn(config: LlamaConfig, max_new: int, sampling: tuple, stops: tuple, pad: int):
    """The jitted prefill + while-loop decode for one model and one set of settings."""
    model = Llama(config)
    temperature, top_k, top_p, penalty = sampling
    stop_arr = np.asarray(stops if stops else [-1], np.int32)

    def sample(logits, seen, rng):
        return _sample(logits, seen, rng, temperature, top_k, top_p, penalty)

    def is_stop(tok):
        return jnp.any(tok[:, None] == jnp.asarray(stop_arr)[None, :], axis=-1)

    @jax.jit
    def run(params, tokens, positions, lengths, rng):
        b, p = tokens.shape
        variables = {"params": params}
        cache = init_cache(config, b, p + max_new)
        logits, cache = model.apply(
            variables, tokens, positions=positions, cache=cache, cache_index=0
        )
        seen = jnp.zeros((b, config.vocab_size), bool)
        if penalty != 1.0:
            seen = _mark(seen, tokens, positions >= 0)
        rng, sub = jax.random.split(rng)
        tok = sample(logits[:, -1], seen, sub)
        out = jnp.full((b, max_new), pad, jnp.int32).at[:, 0].set(tok)
        done = is_stop(tok)
        if penalty != 1.0:
            seen = _mark(seen, tok[:, None], jnp.ones((b, 1), bool))

        def cond(state):
            i, _, _, _, done, _, _ = state
            return (i < max_new) & ~jnp.all(done)

        def body(state):
            i, out, cache, tok, done, seen, rng = state
            logits, cache = model.apply(
                variables,
                tok[:, None],
                positions=(lengths + i - 1)[:, None],
                cache=cache,
                cache_index=p + i - 1,
            )
            rng, sub = jax.random.split(rng)
            new = jnp.where(done, pad, sample(logits[:, 0], seen, sub))
            out = jax.lax.dynamic_update_slice_in_dim(out, new[:, None], i, 1)
            if penalty != 1.0:
                seen = _mark(seen, new[:, None], ~done[:, None])
            done = done | is_stop(new)
            return i + 1, out, cache, new, done, seen, rng

        state = (jnp.asarray(1, jnp.int32), out, cache, tok, done, seen, rng)
        _, out, _, _, _, _, _ = jax.lax.while_loop(cond, body, state)
        return out

    return run


def _unbox_params(params):
    params = nn.meta.unbox(params)
    if isinstance(params, dict) and "params" in params and "tok_embeddings" not in params:
        params = params["params"]
    return params


def _place_params(config, params, mesh):
    """params onto `mesh` by the model's logical axes (LM_RULES)."""
    from herd.core import mesh as mesh_lib

    boxed = jax.eval_shape(
        lambda: Llama(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    )["params"]
    shardings = mesh_lib.logical_to_sharding(boxed, mesh, LM_RULES)
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, nn.meta.unbox(shardings))


def generate_tokens(
    model_config: LlamaConfig,
    params,
    prompts_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    mesh=None,
) -> list[list[int]]:
    """The new token ids of each prompt (a list of ids), up to ``max_new_tokens`` each,
    ending before the first of ``stop_ids`` a row produces (the stop token is not
    returned). ``temperature=0`` is greedy (top-k/top-p then do nothing). Raises
    ValueError for bad settings, an empty prompt, ids outside the vocabulary, or a prompt
    plus ``max_new_tokens`` longer than the model's ``max_seq_len``."""
    c = model_config
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    prompts = [[int(t) for t in ids] for ids in prompts_ids]
    if not prompts:
        return []
    for n, ids in enumerate(prompts):
        if not ids:
            raise ValueError(f"prompt {n} is empty (it needs at least one token, e.g. BOS)")
        bad = [t for t in ids if not 0 <= t < c.vocab_size]
        if bad:
            raise ValueError(f"prompt {n} has ids outside [0, {c.vocab_size}): {bad[:5]}")
        if len(ids) + max_new_tokens > c.max_seq_len:
            raise ValueError(
                f"prompt {n} of {len(ids)} tokens + max_new_tokens={max_new_tokens} = "
                f"{len(ids) + max_new_tokens} exceeds the model's max_seq_len={c.max_seq_len}"
            )
    stops = tuple(sorted({int(s) for s in stop_ids if s is not None and int(s) >= 0}))
    n_real = len(prompts)
    if mesh is not None:  # whole rows per data-parallel shard: pad with 1-token prompts
        from herd.core.mesh import data_parallel_size

        dp = data_parallel_size(mesh)
        prompts = prompts + [[pad_id]] * (-len(prompts) % dp)
    lengths = np.asarray([len(x) for x in prompts], np.int32)
    b, p = len(prompts), int(lengths.max())
    tokens = np.full((b, p), pad_id, np.int32)
    positions = np.full((b, p), -1, np.int32)
    for r, ids in enumerate(prompts):
        tokens[r, p - len(ids) :] = ids
        positions[r, p - len(ids) :] = np.arange(len(ids))
    sampling = (float(temperature), int(top_k), float(top_p), float(repetition_penalty))
    fn = _generate_fn(c, int(max_new_tokens), sampling, stops, int(pad_id))
    rng = jax.random.PRNGKey(int(seed))
    params = _unbox_params(params)
    if mesh is None:
        out = fn(params, tokens, positions, lengths, rng)
    else:
        from herd.core import mesh as mesh_lib

        params = _place_params(c, params, mesh)
        with jax.set_mesh(mesh), nn.logical_axis_rules(list(LM_RULES)):
            batch = mesh_lib.batch_sharding(mesh, 2)
            tokens_d = jax.device_put(tokens, batch)
            positions_d = jax.device_put(positions, batch)
            lengths_d = jax.device_put(lengths, mesh_lib.batch_sharding(mesh, 1))
            out = fn(params, tokens_d, positions_d, lengths_d, rng)
    out = np.asarray(jax.device_get(out))[:n_real]
    result = []
    for row in out.tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        result.append(row[:cut])
    return result


def generate(
    model_config: LlamaConfig,
    params,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    stop_ids: Sequence[int] | None = None,
    bos: bool = True,
    **sampling,
) -> list[str]:
    """The continuation text of each prompt (without the prompt). Prompts are encoded with
    ``tokenizer.encode(text, bos=bos)``; generation stops at ``stop_ids`` (default the
    tokenizer's EOS) and the text is cut before the first of ``stop_strings``. Other
    keywords (temperature, top_k, top_p, repetition_penalty, seed, mesh) go to
    :func:`generate_tokens`."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, not one string")
    if stop_ids is None:
        eos = getattr(tokenizer, "eos_id", None)
        stop_ids = [eos] if eos is not None and eos >= 0 else []
    ids = [list(tokenizer.encode(text, bos=bos)) for text in prompts]
    pad = getattr(tokenizer, "pad_id", 0)
    pad = pad if pad is not None and 0 <= pad < model_config.vocab_size else 0
    out = generate_tokens(
        model_config,
        params,
        ids,
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        pad_id=pad,
        **sampling,
    )
    texts = []
    for new in out:
        text = tokenizer.decode(new)
        cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=None)
        texts.append(text if cut is None else text[:cut])
    return texts


# ----------------------------------------------------------------------------------- CLI


def _load(workdir: str):
    """(LlamaConfig, params, tokenizer) of a herd.lm.train workdir, or a ValueError."""
    from herd.lm.convert import load_workdir
    from herd.lm.tokenizer import load_from_workdir

    ckdir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckdir) or not any(d.isdigit() for d in os.listdir(ckdir)):
        raise ValueError(
            f"no trained model in {workdir!r} (no checkpoints): run "
            f"`python -m herd.lm.train --workdir={workdir}` first"
        )
    config, params = load_workdir(workdir)
    return config, params, load_from_workdir(workdir)


def _define_flags():
    from absl import flags

    defs = (
        (flags.DEFINE_string, "workdir", DEFAULT_WORKDIR, "A herd.lm.train workdir."),
        (flags.DEFINE_string, "prompt", "import os\n", "The prompt text."),
        (flags.DEFINE_integer, "max_new_tokens", 64, "Tokens to generate at most."),
        (flags.DEFINE_float, "temperature", 0.0, "Sampling temperature (0 = greedy)."),
        (flags.DEFINE_integer, "top_k", 0, "Top-k sampling (0 = off)."),
        (flags.DEFINE_float, "top_p", 1.0, "Top-p (nucleus) sampling (1 = off)."),
        (flags.DEFINE_float, "repetition_penalty", 1.0, "Repetition penalty (1 = off)."),
        (flags.DEFINE_integer, "seed", 0, "Sampling seed."),
        (flags.DEFINE_bool, "verbose", False, "Show the traceback of an error, not one line."),
    )
    for define, name, default, help_ in defs:
        if name not in flags.FLAGS:
            define(name, default, help_)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m herd.lm.generate [--workdir=DIR] [--prompt=...] [--max_new_tokens=N] ...`"""
    from absl import app, flags

    from herd.core.config import USER_ERRORS, exit_with_user_error

    argv = list(argv) if argv is not None else list(sys.argv)
    _define_flags()
    f = flags.FLAGS

    def _parse(args):
        try:
            return f(args)
        except flags.Error as e:
            exit_with_user_error(e)

    def _main(args):
        try:
            if len(args) > 1:
                raise ValueError(f"unexpected arguments {args[1:]} (flags are --name=value)")
            config, params, tokenizer = _load(f.workdir)
            prompt = f.prompt
            (text,) = generate(
                config,
                params,
                tokenizer,
                [prompt],
                max_new_tokens=f.max_new_tokens,
                temperature=f.temperature,
                top_k=f.top_k,
                top_p=f.top_p,
                repetition_penalty=f.repetition_penalty,
                seed=f.seed,
            )
            sys.stdout.write(prompt + text + "\n")
            sys.stdout.flush()
        except USER_ERRORS as e:
            if f.verbose:
                raise
            exit_with_user_error(e)

    app.run(_main, argv=argv, flags_parser=_parse)


if __name__ == "__main__":
    main()
