"""Embeddings of a dataset from a herd model, written as an ``.npy`` memmap in chunks.

The core, :func:`embed_to_npy`, takes any jittable ``embed_fn(params, batch) -> [B, dim]``
and an iterable of host batches (dicts of numpy arrays with a leading batch dimension),
shards each batch over the mesh along the batch (the ``('data', 'fsdp')`` axes), and
writes the rows into ``np.lib.format.open_memmap`` chunk by chunk, so the output never
has to fit in memory and can be read back as a memmap by the clustering. Image encoders
plug in by passing their own ``embed_fn``.

For text and code, :func:`llama_embed_fn` mean-pools the final normed hidden states of a
herd Llama over the non-padding tokens (Vo et al. 2024 use the mean of the last layer's
token features for their text experiments), and :func:`embed_texts` tokenises documents
one per row (truncated to ``seq_len``, counted) and runs the whole thing.

Parameters come in directly (``params``, a pytree matching ``Llama(config)``), or from a
herd LM workdir with :func:`load_params` (the orbax checkpoints written by
``herd.lm.train``: only the ``params`` of the train state are read, each device reading
its own shards). The workdir also holds what the run was trained with: its config (with
each checkpoint; :func:`run_model_config`) and its tokenizer (:func:`run_tokenizer`), so
a workdir is all that embedding needs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import meta

from herd.core import mesh as mesh_lib
from herd.lm.model import Llama
from herd.lm.sharding import LM_RULES

log = logging.getLogger(__name__)

__all__ = [
    "embed_to_npy",
    "llama_embed_fn",
    "tokenize_batches",
    "embed_texts",
    "load_params",
    "run_model_config",
    "run_tokenizer",
    "resolve_step",
    "params_on_mesh",
    "shard_llama_params",
    "read_documents",
]


def embed_to_npy(
    embed_fn: Callable,
    params,
    batches: Iterable[dict],
    out_path: str,
    n_rows: int,
    *,
    mesh=None,
    dtype=np.float32,
    progress: bool = True,
    desc: str = "embedding",
) -> np.ndarray:
    """Runs ``embed_fn(params, batch)`` over ``batches`` and writes ``[n_rows, dim]`` to an .npy.

    Args:
      embed_fn: jittable ``(params, batch) -> [B, dim]`` float array.
      params: the model parameters (any pytree; already sharded or host arrays).
      batches: iterable of dicts of numpy arrays ``[B, ...]``; B is the same for all
        batches and divisible by the mesh's data-parallel size. With several processes,
        every process iterates the same global batches and feeds its slice of rows;
        process 0 gathers the embeddings and writes the file (on a filesystem the others
        can read). A batch may carry
        ``'n_valid'`` (an int): only its first ``n_valid`` rows are written (the last batch
        is padded to B).
      out_path: the ``.npy`` file (written through ``np.lib.format.open_memmap``).
      n_rows: total number of rows to write (the sum of the batches' valid rows).
      mesh: a ``jax.sharding.Mesh`` with the ('data', 'fsdp', 'tensor') axes; default: all
        devices on 'fsdp'.

    Returns: the memmap (opened read-only again), shape ``[n_rows, dim]``.
    """
    from tqdm.auto import tqdm

    if mesh is None:
        mesh = mesh_lib.make_mesh({"fsdp": -1})
    dp = mesh_lib.data_parallel_size(mesh)
    params = params_on_mesh(params, mesh)
    n_proc, pid = jax.process_count(), jax.process_index()
    writer = pid == 0  # every process computes its rows; process 0 gathers and writes
    fn = jax.jit(embed_fn)
    out = None
    written = 0
    bar = tqdm(total=n_rows, desc=desc, unit="doc", disable=not (progress and writer))
    try:
        for batch in batches:
            batch = dict(batch)
            n_valid = int(batch.pop("n_valid", -1))
            arrays = {k: np.asarray(v) for k, v in batch.items()}
            b = next(iter(arrays.values())).shape[0]
            if n_valid < 0:
                n_valid = b
            if b % dp or b % n_proc:
                raise ValueError(
                    f"batch size {b} is not divisible by the data-parallel size {dp} of the "
                    f"mesh {dict(mesh.shape)} (and the process count {n_proc})"
                )
            if written + n_valid > n_rows:
                raise ValueError(f"the batches hold more than n_rows={n_rows} rows")
            if n_proc > 1:  # each process feeds its slice of the (identical) global batch
                per = b // n_proc
                arrays = {k: v[pid * per : (pid + 1) * per] for k, v in arrays.items()}
            with jax.set_mesh(mesh):
                emb = fn(params, mesh_lib.shard_batch(arrays, mesh))
            if n_proc > 1:
                from jax.experimental import multihost_utils

                emb = multihost_utils.process_allgather(emb, tiled=True)
            emb = np.asarray(jax.device_get(emb))
            if emb.ndim != 2 or emb.shape[0] != b:
                raise ValueError(f"embed_fn returned shape {emb.shape}, expected [{b}, dim]")
            if out is None:
                if writer:
                    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
                    out = np.lib.format.open_memmap(
                        out_path, mode="w+", dtype=dtype, shape=(n_rows, emb.shape[1])
                    )
                else:
                    out = False
            if writer:
                out[written : written + n_valid] = emb[:n_valid]
            written += n_valid
            bar.update(n_valid)
    finally:
        bar.close()
    if out is None:
        raise ValueError("no batches to embed")
    if written != n_rows:
        raise ValueError(f"the batches held {written} rows, not n_rows={n_rows}")
    if writer:
        out.flush()
    del out
    if n_proc > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("herd.curation.embed_to_npy")
    return np.load(out_path, mmap_mode="r")


def params_on_mesh(params, mesh):
    """Leaves already laid out on ``mesh`` stay; the others (host arrays, arrays committed to
    one device, as orbax restores them) are replicated on it."""
    from jax.sharding import NamedSharding

    rep = mesh_lib.replicated(mesh)

    def put(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh == mesh:
            return x
        return jax.device_put(x, rep)

    return jax.tree.map(put, params)


def _llama_shardings(config, mesh):
    boxed = jax.eval_shape(
        lambda: Llama(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    )["params"]
    return boxed, mesh_lib.logical_to_sharding(boxed, mesh, LM_RULES)


def shard_llama_params(params, config, mesh):
    """Lays Llama params out on ``mesh`` by their logical axis names (the LM's rules:
    FSDP over 'embed', tensor parallel over heads/mlp/vocab), so a model too large for
    one device can embed. Params already laid out so are not moved."""
    _, shardings = _llama_shardings(config, mesh)
    return jax.tree.map(jax.device_put, params, shardings)


def llama_embed_fn(config) -> Callable:
    """``(params, batch) -> [B, dim]`` float32: the mean of the final normed hidden states
    of ``Llama(config)`` over the tokens where ``batch['mask']`` is 1.

    ``batch``: 'tokens' int32 [B, T], 'mask' [B, T] (1 = token, 0 = padding); optional
    'positions'. Padding gets segment id 0, so real tokens never attend to it, and it is
    left out of the mean (a row without tokens embeds to zeros).
    """

    model = Llama(config)

    def embed_fn(params, batch):
        tokens = batch["tokens"].astype(jnp.int32)
        mask = batch["mask"].astype(jnp.int32)
        positions = batch.get("positions")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        hidden = model.apply(
            {"params": params}, tokens, positions, segment_ids=mask, return_hidden=True
        )
        keep = mask[:, :, None] > 0
        total = jnp.sum(jnp.where(keep, hidden.astype(jnp.float32), 0.0), axis=1)
        count = jnp.maximum(jnp.sum(mask, axis=1, dtype=jnp.float32), 1.0)
        return total / count[:, None]

    return embed_fn


def tokenize_batches(
    token_lists: Sequence[Sequence[int]],
    seq_len: int,
    batch_size: int,
    *,
    vocab_size: int | None = None,
):
    """Yields ``{'tokens', 'mask', 'n_valid'}`` batches, one document per row, right-padded
    to ``seq_len`` (longer documents are truncated: :func:`count_truncated` counts them).
    The last batch is padded with empty rows to ``batch_size``."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    n = len(token_lists)
    for start in range(0, n, batch_size):
        chunk = token_lists[start : start + batch_size]
        tokens = np.zeros((batch_size, seq_len), np.int32)
        mask = np.zeros((batch_size, seq_len), np.int32)
        for i, ids in enumerate(chunk):
            ids = np.asarray(ids[:seq_len], dtype=np.int64)
            if vocab_size is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                bad = ids[(ids < 0) | (ids >= vocab_size)][0]
                raise ValueError(
                    f"document {start + i} has token id {bad} outside the vocabulary "
                    f"[0, {vocab_size})"
                )
            tokens[i, : ids.size] = ids
            mask[i, : ids.size] = 1
        yield {"tokens": tokens, "mask": mask, "n_valid": len(chunk)}


def count_truncated(token_lists: Sequence[Sequence[int]], seq_len: int) -> int:
    return int(sum(len(t) > seq_len for t in token_lists))


def read_documents(source: str | Sequence[str]) -> tuple[list[str], list[str]]:
    """(names, texts): one document per file. ``source``: 'stdlib' (the interpreter's
    standard library, herd's embedded default corpus), a glob, or a list of paths/globs."""
    import glob

    if source == "stdlib":
        from herd.lm.data import stdlib_files

        files, _ = stdlib_files("all")
    else:
        patterns = [source] if isinstance(source, str) else list(source)
        files = []
        for p in patterns:
            hits = sorted(glob.glob(p, recursive=True))
            if not hits:
                raise ValueError(f"no files match {p!r}")
            files.extend(h for h in hits if os.path.isfile(h))
    texts = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            texts.append(fh.read())
    return files, texts


def embed_texts(
    texts: Sequence[str],
    tokenizer,
    params,
    config,
    out_path: str,
    *,
    seq_len: int = 512,
    batch_size: int = 8,
    mesh=None,
    progress: bool = True,
) -> tuple[np.ndarray, dict]:
    """Tokenises ``texts`` (BOS + text, truncated to ``seq_len``) and writes their Llama
    embeddings to ``out_path``. Returns (memmap [n, dim], info with counts)."""

    if mesh is None:
        mesh = mesh_lib.make_mesh({"fsdp": -1})
    params = shard_llama_params(params, config, mesh)
    token_lists = [tokenizer.encode(t, bos=True) for t in texts]
    n_trunc = count_truncated(token_lists, seq_len)
    n_empty = int(sum(len(t) == 0 for t in token_lists))
    if n_trunc:
        log.info("embed: %d of %d documents truncated to %d tokens", n_trunc, len(texts), seq_len)
    emb = embed_to_npy(
        llama_embed_fn(config),
        params,
        tokenize_batches(token_lists, seq_len, batch_size, vocab_size=config.vocab_size),
        out_path,
        len(token_lists),
        mesh=mesh,
        progress=progress,
    )
    info = dict(n_documents=len(texts), n_truncated=n_trunc, n_empty=n_empty, seq_len=seq_len)
    return emb, info


def resolve_step(workdir: str, step: int | None = None) -> tuple[str, int]:
    """(checkpoint directory, step): ``step`` checked to exist, or the latest one."""
    directory = os.path.abspath(workdir)
    if os.path.isdir(os.path.join(directory, "checkpoints")):
        directory = os.path.join(directory, "checkpoints")
    if not os.path.isdir(directory):
        raise ValueError(f"checkpoint directory {directory!r} does not exist")
    steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
    if not steps:
        raise ValueError(f"no checkpoint steps in {directory!r}")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise ValueError(f"no checkpoint step {step} in {directory!r} (steps: {steps})")
    return directory, step


def _lm_workdir(path: str) -> str:
    """The herd.lm.train workdir of ``path`` (the workdir itself or its checkpoints/)."""
    path = os.path.abspath(path)
    return os.path.dirname(path) if os.path.basename(path) == "checkpoints" else path


def run_model_config(workdir: str, step: int | None = None, config_file: str = ""):
    """The LlamaConfig a herd LM workdir's checkpoint ``step`` (default: the latest) was
    trained with, from the config stored with it; or, given ``config_file``, that LM
    config file's model (for checkpoints that store none)."""
    from herd.core.checkpoint import read_config
    from herd.core.config import load_config
    from herd.lm.presets import build_model_config

    if config_file:
        return build_model_config(load_config(config_file).model)
    directory, step = resolve_step(workdir, step)
    try:
        stored = read_config(directory, step)
    except FileNotFoundError:
        raise ValueError(
            f"checkpoint step {step} in {directory!r} holds no config (written by an older "
            "herd): set embed.model_config to the LM config file it was trained with"
        ) from None
    return build_model_config(stored["model"])


def run_tokenizer(workdir: str, tokenizer_file: str = ""):
    """The tokenizer a herd LM workdir's run trained with (kept in ``workdir/tokenizer/``),
    or the one in ``tokenizer_file``."""
    from herd.lm.tokenizer import load_from_workdir, load_tokenizer

    if tokenizer_file:
        return load_tokenizer(tokenizer_file)
    try:
        return load_from_workdir(_lm_workdir(workdir))
    except FileNotFoundError as e:
        raise ValueError(f"{e}: set embed.tokenizer to the run's tokenizer file") from None


def load_params(workdir: str, config, step: int | None = None, mesh=None):
    """The ``params`` of a herd LM checkpoint (``<workdir>/checkpoints/<step>/state``) for
    ``Llama(config)``, restored alone straight onto ``mesh`` (default: every device on
    'fsdp') in the model's layout: the optimiser state is never read and no host holds a
    full copy. ``step``: default the latest. Also accepts the ``checkpoints`` directory.
    A checkpoint trained with another model is refused naming its config file."""
    from herd.core.checkpoint import restore_params
    from herd.lm.presets import check_checkpoint_model

    directory, step = resolve_step(workdir, step)
    check_checkpoint_model(directory, config, step)
    mesh = mesh_lib.make_mesh({"fsdp": -1}) if mesh is None else mesh
    boxed, shardings = _llama_shardings(config, mesh)
    abstract = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
        meta.unbox(boxed),
        shardings,
    )
    return restore_params(directory, abstract, step)
