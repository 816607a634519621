"""Curation entry: hierarchical k-means with resampling + balanced sampling (Vo et al. 2024).

    python -m herd.curation.curate                      # the demo (no arguments)
    python -m herd.curation.curate --config=configs/curation/web_4level.py \\
        --config.input.embeddings=/data/emb.npy --workdir=/ckpt/curation

With no arguments it runs the paper's 2-D experiment (flat vs hierarchical k-means, KL of
the KDE of the final centroids to the uniform density) and curates a long-tailed mixture
of 100 Gaussian concepts, printing the numbers and the paths of the plots it wrote.

A curation run reads ``input.embeddings`` (an ``.npy`` file, opened as a memmap) or
computes embeddings of ``embed.documents`` with a herd Llama, then writes into
``--workdir``:

  selected_indices.npy        the curated subset (sorted int64 row indices)
  centroids_level<i>.npy      per-level centroids
  assignment_level<i>.npy     per-level assignment of the items of the level below
                              (points at level 0; -1 for excluded non-finite rows)
  excluded_indices.npy        rows excluded because they hold NaN/inf
  tree/                       the ClusterTree (each finished level saved; a rerun resumes)
  summary.json                counts, sizes, timings, resampling rounds run, balance of
                              the selection over the top-level clusters, label statistics
  cluster_sizes.png           cluster-size distribution per level
  label_histograms.png        label frequencies before/after (when ``input.labels`` is set)

Bad input fails early with one sentence naming the value, before any output is written: a
non-2-D or non-floating array, k larger than the number of items at a level, a target
larger than the pool, bad labels, a workdir whose tree was made from other input or with
other arguments (a rerun resumes the tree only when the input's path, size, mtime and a
hash of sampled rows match; see herd.curation.hierarchical.input_identity). Rows with
NaN/inf are excluded and counted (in the log and in summary.json).

Several processes (``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``,
or a cluster launcher; see herd.core.distributed) run one curation: every process reads
the same input and computes (each k-means runs over the devices of all processes), and
process 0 alone prints and writes the outputs into ``--workdir`` (a filesystem that every
process reads), so the workdir holds the outputs of one run, identical to those of one
process over as many devices.

Resampling is counted as herd's ``hierarchy.resampling_steps``: the k-means runs of a
level, the first included; the paper's m (Vo et al. 2024, Alg. 1) counts the rounds after
it. The log and summary.json give the rounds that ran per level.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence

import numpy as np

log = logging.getLogger("herd.curation.curate")

DEFAULT_CONFIG = "curation/default.py"
DEFAULT_WORKDIR = "./workdir/curation"
DTYPES = ("float32", "float64")
SCAN_ROWS = 1 << 18  # rows per chunk when scanning a memmap for NaN/inf


# ----------------------------------------------------------------------------- processes


def is_main_process() -> bool:
    from herd.curation.hierarchical import is_main_process as main

    return main()


def sync_processes(name: str) -> None:
    from herd.curation.hierarchical import sync_processes as sync

    sync(name)


def _silent(_msg: str) -> None:
    pass


# ----------------------------------------------------------------------------- checks


def check_embeddings(x) -> None:
    """Raises ValueError unless x is a non-empty 2-D floating array."""
    if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
        raise ValueError(f"embeddings must be a numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D [n, d] array, got shape {tuple(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"embeddings must have a floating dtype (float16/32/64), got {x.dtype}; "
            "integer or boolean features are not embeddings"
        )
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"embeddings are empty: shape {tuple(x.shape)}")


def nonfinite_rows(x, chunk_rows: int = SCAN_ROWS) -> np.ndarray:
    """int64 indices of the rows of x holding any NaN or inf (scanned in chunks)."""
    bad = []
    for s in range(0, x.shape[0], chunk_rows):
        block = np.asarray(x[s : s + chunk_rows])
        bad.append(np.nonzero(~np.isfinite(block).all(axis=1))[0] + s)
    return np.concatenate(bad).astype(np.int64) if bad else np.zeros(0, np.int64)


def _ints(value, name: str) -> list[int]:
    """A list or tuple of ints (one int also accepted), else one ValueError sentence."""
    try:
        if isinstance(value, str):
            raise TypeError
        return [int(value)] if np.isscalar(value) else [int(t) for t in value]
    except (TypeError, ValueError):
        raise ValueError(
            f"hierarchy.{name} must be an int or a list/tuple of ints, got {value!r}"
        ) from None


def _per_level(value, n_levels: int, name: str) -> list[int]:
    v = _ints(value, name)
    if np.isscalar(value):
        v = v * n_levels
    if len(v) != n_levels:
        raise ValueError(f"hierarchy.{name} has {len(v)} entries for {n_levels} levels")
    if min(v) < 1:
        raise ValueError(f"hierarchy.{name} entries must be >= 1, got {v}")
    return v


def check_hierarchy(h, n_valid: int | None = None) -> dict:
    """Validates cfg.hierarchy; with n_valid also checks k against the items per level.

    Returns the normalised arguments of hierarchical_kmeans."""
    ks = _ints(h.ks, "ks")
    if not ks or min(ks) < 1:
        raise ValueError(f"hierarchy.ks must be positive cluster counts, got {list(h.ks)}")
    n = len(ks)
    steps = _per_level(h.resampling_steps, n, "resampling_steps")
    sizes = _per_level(h.sample_sizes, n, "sample_sizes")
    if h.sample_strategy not in ("closest", "random"):
        raise ValueError(
            f"hierarchy.sample_strategy must be 'closest' or 'random', got {h.sample_strategy!r}"
        )
    if h.dtype not in DTYPES:
        raise ValueError(f"hierarchy.dtype must be one of {DTYPES}, got {h.dtype!r}")
    split = int(h.get("split_first") or 0) or None
    if split is not None and ks[0] % split:
        raise ValueError(f"hierarchy.split_first={split} does not divide ks[0]={ks[0]}")
    if _ints(h.n_iters, "n_iters")[0] < 0:
        raise ValueError(f"hierarchy.n_iters must be >= 0, got {h.n_iters}")
    if n_valid is not None and ks[0] > n_valid:
        raise ValueError(
            f"level 0: k={ks[0]} is larger than the number of points to cluster ({n_valid})"
        )
    for i in range(1, n):
        if ks[i] > ks[i - 1]:
            raise ValueError(
                f"level {i}: k={ks[i]} is larger than the number of items at that level "
                f"(the {ks[i - 1]} centroids of level {i - 1})"
            )
    return dict(
        ks=ks,
        resampling_steps=steps,
        sample_sizes=sizes,
        n_iters=int(h.n_iters),
        split_first=split,
        sample_strategy=h.sample_strategy,
        dtype=np.dtype(h.dtype),
    )


def target_size_for(sampling, n_valid: int) -> int:
    """cfg.sampling.target_size if > 0, else round(target_fraction * n_valid)."""
    t = int(sampling.get("target_size") or 0)
    if t <= 0:
        frac = float(sampling.get("target_fraction") or 0)
        if not 0 < frac <= 1:
            raise ValueError(
                f"set sampling.target_size > 0 or sampling.target_fraction in (0, 1], got "
                f"target_size={sampling.get('target_size')}, target_fraction={frac}"
            )
        t = max(1, int(round(frac * n_valid)))
    if t > n_valid:
        raise ValueError(f"target size {t} is larger than the pool of {n_valid} usable points")
    return t


# ----------------------------------------------------------------------------- inputs


def _load_embeddings(cfg, workdir: str, say) -> tuple[np.ndarray, dict]:
    inp = cfg.input
    path = inp.get("embeddings") or ""
    synthetic = inp.get("synthetic") or ""
    if path:
        if not os.path.exists(path):
            raise ValueError(f"input.embeddings {path!r} does not exist")
        try:
            x = np.load(path, mmap_mode="r")
        except ValueError as e:  # object arrays and the like
            raise ValueError(f"input.embeddings {path!r} is not a plain .npy array: {e}") from e
        return x, dict(source=os.path.abspath(path))
    if synthetic:
        if synthetic != "long_tail":
            raise ValueError(f"input.synthetic must be '' or 'long_tail', got {synthetic!r}")
        from herd.curation.experiments import make_long_tailed_mixture

        # In memory until every check passed (curate then writes it with _save_synthetic).
        x, labels = make_long_tailed_mixture(seed=int(cfg.seed), **dict(inp.synthetic_kw))
        return x, dict(source="synthetic:long_tail", synthetic_labels=labels)
    if cfg.embed.get("documents"):
        if is_main_process():
            os.makedirs(workdir, exist_ok=True)  # the embeddings are written there
        return _compute_embeddings(cfg, workdir, say)
    raise ValueError(
        "nothing to curate: set input.embeddings to an .npy file, input.synthetic to "
        "'long_tail', or embed.documents (with embed.checkpoint) to compute embeddings"
    )


def _holds(path: str, arr: np.ndarray) -> bool:
    """Whether the .npy file at path holds exactly arr."""
    if not os.path.exists(path):
        return False
    try:
        old = np.load(path, mmap_mode="r")
    except ValueError:
        return False
    return old.shape == arr.shape and old.dtype == arr.dtype and bool(np.array_equal(old, arr))


def _save_if_changed(path: str, arr: np.ndarray) -> bool:
    """Writes arr to path unless the file already holds exactly it (a rerun keeps the
    file's mtime, which the cluster tree's resume check compares). True if written."""
    if _holds(path, arr):
        return False
    np.save(path, arr)
    return True


def _save_synthetic(x, labels, workdir: str, say) -> tuple[np.ndarray, str]:
    """Writes the synthetic mixture into workdir (process 0); returns (its memmap, the
    labels path) once every process can read it."""
    out = os.path.join(workdir, "embeddings.npy")
    lab = os.path.join(workdir, "labels.npy")
    if is_main_process():
        os.makedirs(workdir, exist_ok=True)
        _save_if_changed(out, x)
        _save_if_changed(lab, labels)
    sync_processes("herd.curation.curate.synthetic_saved")  # the others read it next
    say(f"synthetic long-tailed mixture: {x.shape} -> {out}")
    return np.load(out, mmap_mode="r"), lab


def _load_labels(path: str, n: int) -> np.ndarray:
    if not os.path.exists(path):
        raise ValueError(f"input.labels {path!r} does not exist")
    try:
        labels = np.load(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"input.labels {path!r} is not a plain .npy array ({e})") from None
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels {path!r} must be an integer array of shape ({n},), got "
            f"{labels.dtype} {labels.shape}"
        )
    return labels


def _compute_embeddings(cfg, workdir: str, say) -> tuple[np.ndarray, dict]:
    """Embeds cfg.embed.documents with the Llama of cfg.embed.checkpoint (a herd LM workdir).

    The model config and the tokenizer are the ones the workdir's run trained with (stored
    with its checkpoints); embed.model_config / embed.tokenizer override them.
    """
    from herd.curation import embed as embed_lib

    e = cfg.embed
    if not e.get("checkpoint"):
        raise ValueError("embed.documents is set but embed.checkpoint (a herd LM workdir) is empty")
    names, texts = embed_lib.read_documents(e.documents)
    ckpt_dir, step = embed_lib.resolve_step(e.checkpoint, None if int(e.step) < 0 else int(e.step))
    model_config = embed_lib.run_model_config(ckpt_dir, step, config_file=e.model_config)
    tokenizer = embed_lib.run_tokenizer(e.checkpoint, tokenizer_file=e.tokenizer)
    tokenizer_file = os.path.abspath(e.tokenizer) if e.tokenizer else "the run's own"
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model_config.vocab_size}"
        )
    out = os.path.join(workdir, "embeddings.npy")
    info_path = os.path.join(workdir, "embeddings.json")
    key = dict(
        documents=names,
        checkpoint=ckpt_dir,
        step=step,
        model_config=e.model_config or "the run's own",
        tokenizer=tokenizer_file,
        seq_len=int(e.seq_len),
    )
    if os.path.exists(out) and os.path.exists(info_path):  # a rerun: reuse if the same
        with open(info_path) as f:
            saved = json.load(f)
        if saved.get("key") == key:
            say(f"reusing the embeddings in {out}")
            return np.load(out, mmap_mode="r"), dict(source=f"embed:{e.documents}", **saved["info"])
    params = embed_lib.load_params(ckpt_dir, model_config, step)
    say(f"embedding {len(texts)} documents with {ckpt_dir} step {step} -> {out}")
    x, info = embed_lib.embed_texts(
        texts,
        tokenizer,
        params,
        model_config,
        out,
        seq_len=int(e.seq_len),
        batch_size=int(e.batch_size),
    )
    if is_main_process():  # embed_texts wrote the embeddings (process 0) and synced
        with open(os.path.join(workdir, "documents.txt"), "w") as f:
            f.write("\n".join(names) + "\n")
        with open(info_path, "w") as f:
            json.dump(dict(key=key, info=info), f)
    return x, dict(source=f"embed:{e.documents}", **info)


# ----------------------------------------------------------------------------- run


def _entropy(labels) -> float:
    counts = np.bincount(labels[labels >= 0])
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float(-(p * np.log(p)).sum())


def _label_stats(labels, selected, seed: int) -> dict:
    rand = np.random.default_rng([seed, 11]).choice(
        np.nonzero(labels >= 0)[0], size=min(len(selected), int((labels >= 0).sum())), replace=False
    )
    n_labels = int(labels.max()) + 1 if labels.size else 0
    return dict(
        n_labels=n_labels,
        entropy_max=float(np.log(max(n_labels, 1))),
        entropy_pool=_entropy(labels),
        entropy_curated=_entropy(labels[selected]),
        entropy_random_same_size=_entropy(labels[rand]),
        labels_covered_pool=int(np.unique(labels[labels >= 0]).size),
        labels_covered_curated=int(np.unique(labels[selected][labels[selected] >= 0]).size),
        labels_covered_random_same_size=int(np.unique(labels[rand]).size),
    )


def _distribution(clusters: np.ndarray, k: int) -> dict:
    """Balance of a set of points over k clusters, label-free: entropy of its cluster
    histogram (nats), normalised by ln k, and the effective number of clusters exp(H)."""
    h = _entropy(clusters)
    return dict(
        entropy=h,
        normalised_entropy=h / np.log(k) if k > 1 else 1.0,
        effective_clusters=float(np.exp(h)),
        clusters_covered=int(np.unique(clusters[clusters >= 0]).size),
    )


def _balance_stats(tree, selected) -> dict:
    """The selection's distribution over the top-level clusters against the pool's: the
    balance the hierarchical sampling aims at (Vo et al. 2024, Sec. 4.2), measurable
    without labels."""
    from herd.curation.sampling import top_level_cluster

    top = top_level_cluster(tree)
    k = tree.levels[-1].k
    return dict(
        level=tree.n_levels - 1,
        k=int(k),
        entropy_max=float(np.log(k)),
        pool=_distribution(top[top >= 0], k),
        selected=_distribution(top[selected], k),
    )


def curate(cfg, workdir: str, *, say=print, mesh=None) -> dict:
    """Runs one curation as ``cfg`` says; writes the outputs into ``workdir``; returns the
    summary (also written to ``workdir/summary.json``).

    Every check (config, embeddings, labels, sizes, whether the tree in ``workdir/tree``
    may be resumed) runs before the first output file is written. ``mesh``: the devices of
    the k-means (default: see herd.curation.hierarchical.hierarchical_kmeans).

    With several jax.distributed processes every process runs this with the same config
    and returns the same summary; process 0 alone calls ``say`` and writes files, and all
    return once the outputs are written."""
    from herd.curation.hierarchical import check_resume, hierarchical_kmeans, resampling_rounds
    from herd.curation.sampling import balanced_sample, points_per_cluster

    t0 = time.perf_counter()
    workdir = os.path.abspath(workdir)
    main = is_main_process()
    if not main:  # every process computes; process 0 alone reports and writes
        say = _silent
    check_hierarchy(cfg.hierarchy)  # config errors before reading anything
    x, source = _load_embeddings(cfg, workdir, say)
    synthetic_labels = source.pop("synthetic_labels", None)
    check_embeddings(x)
    n, d = x.shape
    bad = nonfinite_rows(x)
    n_valid = n - bad.size
    if n_valid == 0:
        raise ValueError(f"all {n} embedding rows hold NaN/inf: nothing to curate")
    hk = check_hierarchy(cfg.hierarchy, n_valid)
    target = target_size_for(cfg.sampling, n_valid)
    labels = None
    labels_path = cfg.input.get("labels") or ""
    if labels_path:
        labels = _load_labels(labels_path, n)
    tree_dir = os.path.join(workdir, "tree")
    tree_args = dict(
        resampling_steps=hk["resampling_steps"],
        sample_sizes=hk["sample_sizes"],
        n_iters=hk["n_iters"],
        seed=int(cfg.seed),
        split_first=hk["split_first"],
        sample_strategy=hk["sample_strategy"],
        dtype=hk["dtype"],
    )
    if synthetic_labels is not None:  # checked in memory; now written (if changed)
        if os.path.exists(os.path.join(tree_dir, "tree.json")) and not _holds(
            os.path.join(workdir, "embeddings.npy"), x
        ):  # refused before the old mixture is overwritten
            raise ValueError(
                f"workdir {tree_dir} holds a cluster tree of another synthetic mixture "
                f"(seed or input.synthetic_kw changed); use a new workdir, or delete "
                f"{tree_dir} to recompute the tree"
            )
        x, source["labels"] = _save_synthetic(x, synthetic_labels, workdir, say)
        if labels is None:
            labels, labels_path = synthetic_labels, source["labels"]
    check_resume(tree_dir, x, hk["ks"], **tree_args)  # other input or arguments: refused

    if main:
        os.makedirs(workdir, exist_ok=True)
        np.save(os.path.join(workdir, "excluded_indices.npy"), bad)
        if bad.size:
            msg = f"excluding {bad.size} of {n} rows holding NaN/inf (first: {bad[:10].tolist()})"
            log.warning(msg)
            say(msg)
    steps_sizes = zip(hk["resampling_steps"], hk["sample_sizes"], strict=True)
    rounds = [resampling_rounds(s, r) for s, r in steps_sizes]
    say(
        f"curating {n_valid} of {n} points (dim {d}, {x.dtype}) -> {target}: "
        f"ks={hk['ks']}, resampling rounds {rounds} after each level's first k-means "
        f"(resampling_steps {hk['resampling_steps']} count that first run; a level with 1 "
        f"point per cluster resamples nothing), points per cluster {hk['sample_sizes']}, "
        f"{hk['n_iters']} Lloyd iterations, {hk['dtype'].name}"
    )

    t1 = time.perf_counter()
    tree = hierarchical_kmeans(
        x, hk["ks"], workdir=tree_dir, mesh=mesh, verbose=True, say=say, **tree_args
    )  # fmt: skip
    t_cluster = time.perf_counter() - t1
    runs = tree.meta.get("level_runs") or [{} for _ in tree.levels]
    t1 = time.perf_counter()
    strategy = cfg.sampling.strategy
    selected = balanced_sample(tree, target, strategy=strategy, seed=int(cfg.sampling.seed))
    t_sample = time.perf_counter() - t1
    if bad.size and np.isin(selected, bad).any():  # the tree never lists excluded rows
        raise AssertionError("a non-finite row was selected")

    paths = dict(selected=os.path.join(workdir, "selected_indices.npy"))
    if main:
        np.save(paths["selected"], selected)
    pts = points_per_cluster(tree)
    levels = []
    for i, lv in enumerate(tree.levels):
        cpath = os.path.join(workdir, f"centroids_level{i}.npy")
        apath = os.path.join(workdir, f"assignment_level{i}.npy")
        if main:
            np.save(cpath, lv.centroids)
            np.save(apath, lv.assignment)
        sizes = pts[i]
        levels.append(
            dict(
                k=lv.k,
                k_requested=hk["ks"][i],
                n_items=lv.n_items,
                resampling_rounds=runs[i].get("resampling_rounds"),
                kmeans_runs=runs[i].get("kmeans_runs"),
                points_per_cluster=dict(
                    min=int(sizes.min()),
                    median=float(np.median(sizes)),
                    mean=float(sizes.mean()),
                    max=int(sizes.max()),
                    empty=int((sizes == 0).sum()),
                ),
                centroids=cpath,
                assignment=apath,
            )
        )
    if cfg.get("plots", True) and main:
        from herd.curation import plots

        paths["cluster_sizes_png"] = plots.plot_cluster_sizes(
            tree, os.path.join(workdir, "cluster_sizes.png")
        )
        if labels is not None:
            paths["label_histograms_png"] = plots.plot_label_histograms(
                labels, selected, os.path.join(workdir, "label_histograms.png")
            )
    balance = _balance_stats(tree, selected)
    summary = dict(
        input=source,
        n_points=int(n),
        dim=int(d),
        input_dtype=str(x.dtype),
        n_excluded_nonfinite=int(bad.size),
        excluded_nonfinite_first=bad[:100].tolist(),
        n_valid=int(n_valid),
        target_size=int(target),
        n_selected=int(selected.size),
        sampling_strategy=strategy,
        hierarchy=dict(
            ks=hk["ks"],
            resampling_steps=hk["resampling_steps"],
            resampling_rounds=[r.get("resampling_rounds") for r in runs],
            sample_sizes=hk["sample_sizes"],
            n_iters=hk["n_iters"],
            split_first=hk["split_first"],
            sample_strategy=hk["sample_strategy"],
            dtype=hk["dtype"].name,
        ),
        levels=levels,
        balance=balance,
        seconds=dict(
            clustering=round(t_cluster, 3),
            sampling=round(t_sample, 3),
            total=round(time.perf_counter() - t0, 3),
        ),
        outputs=dict(
            paths,
            excluded=os.path.join(workdir, "excluded_indices.npy"),
            tree=tree_dir,
        ),
    )
    if labels is not None:
        summary["labels"] = dict(path=labels_path, **_label_stats(labels, selected, int(cfg.seed)))
    if main:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    sync_processes("herd.curation.curate.written")  # every process returns after the writes
    summary["outputs"]["summary"] = os.path.join(workdir, "summary.json")
    say(
        f"selected {selected.size} points in {summary['seconds']['total']:.1f}s "
        f"(clustering {t_cluster:.1f}s, sampling {t_sample:.2f}s) -> {paths['selected']}"
    )
    say(
        f"resampling rounds run per level after the first k-means: "
        f"{summary['hierarchy']['resampling_rounds']}"
    )
    pool, sel = balance["pool"], balance["selected"]
    say(
        f"balance over the {balance['k']} top-level clusters (entropy in nats, max "
        f"{balance['entropy_max']:.2f}): pool {pool['entropy']:.2f} (normalised "
        f"{pool['normalised_entropy']:.3f}, {pool['effective_clusters']:.1f} effective "
        f"clusters), selected {sel['entropy']:.2f} (normalised {sel['normalised_entropy']:.3f}, "
        f"{sel['effective_clusters']:.1f} effective clusters)"
    )
    if labels is not None:
        lab = summary["labels"]
        say(
            f"label entropy (nats, max {lab['entropy_max']:.2f}): pool {lab['entropy_pool']:.2f}, "
            f"curated {lab['entropy_curated']:.2f}, random subset of the same size "
            f"{lab['entropy_random_same_size']:.2f}"
        )
    say(f"summary: {summary['outputs']['summary']}")
    for key in ("cluster_sizes_png", "label_histograms_png"):
        if key in paths:
            say(f"plot: {paths[key]}")
    return summary


def run_demo(cfg, workdir: str, *, say=print) -> dict:
    """The 2-D experiment and a curated long-tailed mixture; prints numbers and plot paths."""
    from herd.curation import experiments, plots

    workdir = os.path.abspath(workdir)
    main = is_main_process()
    if main:
        os.makedirs(workdir, exist_ok=True)
    else:  # every process computes; process 0 alone reports and writes
        say = _silent
    dm = cfg.demo
    say("2-D experiment (Vo et al. 2024): 7000 N([-1,-1]), 1000 N([1,-1]), 500 N([0,1]), "
        f"500 uniform; ks {list(dm.ks)}, points per cluster {list(dm.sample_sizes)}, "
        f"{dm.resampling_steps} resampling steps, {dm.n_iters} Lloyd iterations")  # fmt: skip
    t0 = time.perf_counter()
    r = experiments.run_2d_experiment(
        seed=int(cfg.seed),
        ks=tuple(dm.ks),
        sample_sizes=tuple(dm.sample_sizes),
        resampling_steps=int(dm.resampling_steps),
        n_iters=int(dm.n_iters),
    )
    png = os.path.join(workdir, "2d_experiment.png")
    if main:
        plots.plot_2d_experiment(r, png)
    kl = {k: round(r[k], 4) for k in ("kl_flat", "kl_hierarchical", "kl_bound")}
    say(
        f"  KL(KDE of {dm.ks[-1]} centroids || uniform): flat k-means {kl['kl_flat']:.3f}, "
        f"hierarchical with resampling {kl['kl_hierarchical']:.3f}, bound (uniform points) "
        f"{kl['kl_bound']:.3f}   (paper's reference run: 0.35, 0.054, 0.047) "
        f"[{time.perf_counter() - t0:.0f}s]"
    )
    say(f"  plot: {png}")
    if main:
        with open(os.path.join(workdir, "2d_experiment.json"), "w") as f:
            json.dump(kl, f, indent=1)

    say("long-tailed mixture: 100 Gaussian concepts with Zipf sizes, curated to 10%")
    lt = curate(cfg.long_tail, os.path.join(workdir, "long_tail"), say=lambda s: say("  " + s))
    lab = lt["labels"]
    say(
        f"  concept entropy (nats, max {lab['entropy_max']:.2f}): pool {lab['entropy_pool']:.2f}, "
        f"random 10% {lab['entropy_random_same_size']:.2f} "
        f"({lab['labels_covered_random_same_size']} concepts), curated 10% "
        f"{lab['entropy_curated']:.2f} ({lab['labels_covered_curated']} concepts)"
    )
    return dict(two_d=kl, long_tail=lt)


def run(cfg, workdir: str) -> dict:
    if cfg.mode == "demo":
        return run_demo(cfg, workdir)
    if cfg.mode == "curate":
        return curate(cfg, workdir)
    raise ValueError(f"mode must be 'demo' or 'curate', got {cfg.mode!r}")


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m herd.curation.curate [--config=path.py[:arg]] [--config.k=v] [--workdir=DIR]`."""
    from herd.core.config import run_entry

    run_entry(run, DEFAULT_CONFIG, DEFAULT_WORKDIR, "Outputs (indices, tree, plots) go here.", argv)


if __name__ == "__main__":
    main()
