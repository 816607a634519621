"""The curation entry, the paper's experiments, Llama embeddings and bad input."""

import importlib
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from herd.core.config import load_config
from herd.curation import curate as curate_lib
from herd.curation import experiments

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEST_CONFIG = os.path.join(REPO, "configs", "curation", "test.py")


# ----------------------------------------------------------------------------- experiments


def test_kde_kl_of_uniform_points_is_small_and_of_a_blob_large():
    rng = np.random.default_rng(0)
    uni = experiments.kde_kl_to_uniform(rng.uniform(-3, 3, (300, 2)))
    blob = experiments.kde_kl_to_uniform(rng.normal(-1, 0.5, (300, 2)))
    assert 0 < uni < 0.1 < 1.0 < blob


@pytest.mark.slow
def test_2d_experiment_flat_vs_hierarchical_vs_bound():
    """Vo et al. 2024, Sec. 5.1: reference run flat 0.35, hierarchical 0.054, bound 0.047.
    10 resampling steps and 2 points per cluster as the paper; 10 Lloyd iterations per
    k-means run instead of 50, to keep the test short (the demo runs 50)."""
    r = experiments.run_2d_experiment(seed=0, n_iters=10, resampling_steps=10)
    flat, hier, bound = r["kl_flat"], r["kl_hierarchical"], r["kl_bound"]
    print(f"\nKL to uniform: flat {flat:.4f}, hierarchical {hier:.4f}, bound {bound:.4f}")
    assert r["hierarchical_centroids"].shape == (300, 2)
    assert flat > 4 * hier  # flat k-means is far from uniform
    assert hier < 2 * bound  # hierarchical with resampling is close to the bound
    assert 0.2 < flat < 0.6 and 0.02 < bound < 0.08


def test_long_tailed_mixture_curated_entropy_far_above_random():
    r = experiments.run_long_tail_experiment(
        seed=0,
        ks=(500, 100),
        sample_sizes=(4, 2),
        resampling_steps=3,
        n_iters=10,
        n_points=10_000,
    )
    print(
        f"\nconcept entropy (max {r['entropy_max']:.3f}): pool {r['entropy_pool']:.3f}, "
        f"random 10% {r['entropy_random']:.3f} ({r['concepts_covered_random']} concepts), "
        f"curated 10% {r['entropy_curated']:.3f} ({r['concepts_covered_curated']} concepts)"
    )
    assert r["curated"].shape == (1000,) and np.unique(r["curated"]).size == 1000
    assert r["entropy_curated"] > r["entropy_random"] + 1.0
    assert r["entropy_curated"] > 0.95 * r["entropy_max"]
    assert r["concepts_covered_curated"] >= r["concepts_covered_random"]


# ----------------------------------------------------------------------------- entry


def _write_inputs(tmp_path, n=1500, bad_rows=(3, 700)):
    x, labels = experiments.make_long_tailed_mixture(
        n_concepts=20, n_points=n, dim=8, zipf_exponent=1.2, seed=1
    )
    x = x.copy()
    x[bad_rows[0], 2] = np.nan
    x[bad_rows[1], 0] = np.inf
    emb = str(tmp_path / "emb.npy")
    lab = str(tmp_path / "labels.npy")
    np.save(emb, x)
    np.save(lab, labels)
    return emb, lab


def test_curate_entry_end_to_end_writes_everything(tmp_path):
    """`python -m herd.curation.curate` on the test config; one NaN and one inf row."""
    emb, lab = _write_inputs(tmp_path)
    work = tmp_path / "work"
    cmd = [
        sys.executable,
        "-m",
        "herd.curation.curate",
        f"--config={TEST_CONFIG}",
        f"--config.input.embeddings={emb}",
        f"--config.input.labels={lab}",
        "--config.sampling.target_size=60",
        f"--workdir={work}",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "excluding 2 of 1500 rows" in out.stdout

    sel = np.load(work / "selected_indices.npy")
    assert sel.shape == (60,) and np.unique(sel).size == 60
    assert not np.isin(sel, [3, 700]).any()
    np.testing.assert_array_equal(np.load(work / "excluded_indices.npy"), [3, 700])
    summary = json.loads((work / "summary.json").read_text())
    assert summary["n_excluded_nonfinite"] == 2
    assert summary["excluded_nonfinite_first"] == [3, 700]
    assert summary["n_valid"] == 1498 and summary["n_selected"] == 60
    assert [lv["k"] for lv in summary["levels"]] == [40, 10]
    for i, k in enumerate((40, 10)):
        c = np.load(work / f"centroids_level{i}.npy")
        a = np.load(work / f"assignment_level{i}.npy")
        assert c.shape == (k, 8)
        assert a.shape == ((1500,) if i == 0 else (40,))
        assert a.max() < k
    a0 = np.load(work / "assignment_level0.npy")
    assert a0[3] == -1 and a0[700] == -1 and (a0 >= 0).sum() == 1498
    lab_stats = summary["labels"]
    assert lab_stats["entropy_curated"] > lab_stats["entropy_random_same_size"]
    for name in ("cluster_sizes.png", "label_histograms.png"):
        assert (work / name).stat().st_size > 1000
    assert (work / "tree" / "tree.json").exists()


def _cfg(**overrides):
    """The test config with overrides; sequences are set in Python (as tuples), since
    the command line may only override tuple-valued keys."""
    seqs = {k: v for k, v in overrides.items() if isinstance(v, (list, tuple))}
    flags = [f"--config.{k}={v}" for k, v in overrides.items() if k not in seqs]
    cfg = load_config(TEST_CONFIG, flags)
    for key, value in seqs.items():
        *parents, name = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[name] = tuple(value)
    return cfg


def _count_kmeans(monkeypatch):
    """Counts the k-means runs of hierarchical_kmeans (its level runner imports kmeans from
    the package at call time): a resumed level runs none."""
    km_mod = importlib.import_module("herd.curation.kmeans")
    orig, calls = km_mod.kmeans, []
    monkeypatch.setattr(km_mod, "kmeans", lambda *a, **k: calls.append(a[1]) or orig(*a, **k))
    return calls


def _outputs(work):
    """{relative path: mtime_ns} of every file under work (empty if work does not exist)."""
    out = {}
    for root, _, files in os.walk(work):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, work)] = os.stat(p).st_mtime_ns
    return out


def test_curate_library_call_and_resume(tmp_path, monkeypatch):
    emb, _ = _write_inputs(tmp_path)
    cfg = _cfg(**{"input.embeddings": emb, "plots": False, "sampling.strategy": "closest"})
    work = tmp_path / "w"
    calls = _count_kmeans(monkeypatch)
    said = []
    s1 = curate_lib.curate(cfg, str(work), say=said.append)
    # ks (40, 10), resampling_steps (1, 3), sample_sizes (1, 2): level 0 one run, level 1
    # the first run and 2 resampling rounds; the summary and the log say so.
    assert calls == [40, 10, 10, 10]
    assert s1["hierarchy"]["resampling_rounds"] == [0, 2]
    assert [lv["resampling_rounds"] for lv in s1["levels"]] == [0, 2]
    assert [lv["kmeans_runs"] for lv in s1["levels"]] == [1, 3]
    assert any("resampling rounds [0, 2] after each level's first k-means" in m for m in said)
    assert "resampling rounds run per level after the first k-means: [0, 2]" in said
    first = np.load(work / "selected_indices.npy")
    tree_files = {k: v for k, v in _outputs(work).items() if k.startswith("tree")}

    # A rerun finds the finished tree in workdir/tree, recomputes none of it and gives
    # the same subset and the same counts (of the run that made the tree).
    calls.clear()
    said.clear()
    s2 = curate_lib.curate(cfg, str(work), say=said.append)
    assert calls == []
    assert f"resuming level 2 from {work / 'tree'} (2 of 2 levels already done)" in said
    assert {k: v for k, v in _outputs(work).items() if k.startswith("tree")} == tree_files
    np.testing.assert_array_equal(first, np.load(work / "selected_indices.npy"))
    assert s1["n_selected"] == s2["n_selected"] == 50
    assert s2["hierarchy"]["resampling_rounds"] == [0, 2]


def test_rerun_with_other_embeddings_is_refused(tmp_path, monkeypatch):
    """The user's report: other embeddings of the same shape in the same workdir reused
    the old tree (clustering 0.0 s). Now the rerun is refused, naming what differs, and
    writes nothing."""
    emb, _ = _write_inputs(tmp_path)
    cfg = _cfg(**{"input.embeddings": emb, "plots": False})
    work = tmp_path / "w"
    curate_lib.curate(cfg, str(work), say=lambda _: None)
    before = _outputs(work)
    calls = _count_kmeans(monkeypatch)

    other = np.load(emb)[::-1].copy()  # same shape, same rows, other order
    other_path = str(tmp_path / "other.npy")
    np.save(other_path, other)
    with pytest.raises(ValueError, match="other input: the path differs") as e:
        curate_lib.curate(
            _cfg(**{"input.embeddings": other_path, "plots": False}), str(work), say=print
        )
    msg = str(e.value)
    assert "the content differs" in msg and f"delete {work / 'tree'}" in msg
    assert "\n" not in msg

    # The same file rewritten in place (same path and size, a later mtime).
    st = os.stat(emb)
    np.save(emb, other)
    os.utime(emb, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="the modification time differs .*the content differs"):
        curate_lib.curate(cfg, str(work), say=lambda _: None)
    assert calls == [] and _outputs(work) == before


def test_selection_is_more_balanced_than_the_pool_without_labels(tmp_path):
    """On a long-tailed mixture (make_long_tailed_mixture, via input.synthetic) the
    balanced selection spreads over the top-level clusters more evenly than the pool:
    higher entropy, more effective clusters (Vo et al. 2024, Sec. 4.2)."""
    cfg = _cfg(**{"input.synthetic": "long_tail", "plots": False})
    work = tmp_path / "w"
    said = []
    s = curate_lib.curate(cfg, str(work), say=said.append)
    bal = s["balance"]
    pool, sel = bal["pool"], bal["selected"]
    print(f"\ntop-level balance: pool {pool}, selected {sel}")
    assert bal["k"] == 10 and bal["entropy_max"] == pytest.approx(np.log(10))
    assert sel["entropy"] > pool["entropy"] + 0.1
    assert sel["effective_clusters"] > pool["effective_clusters"]
    assert 0 < pool["normalised_entropy"] < sel["normalised_entropy"] <= 1
    assert any(m.startswith("balance over the 10 top-level clusters") for m in said)
    assert json.loads((work / "summary.json").read_text())["balance"] == bal
    # The figures are those of the tree and the selection on disk.
    a0 = np.load(work / "assignment_level0.npy")
    top = np.load(work / "assignment_level1.npy")[a0]
    sel_idx = np.load(work / "selected_indices.npy")
    h = experiments.concept_entropy(top[sel_idx], 10)
    assert sel["entropy"] == pytest.approx(h)
    # A rerun regenerates the same mixture without rewriting it, so the tree resumes.
    mtime = os.stat(work / "embeddings.npy").st_mtime_ns
    said.clear()
    curate_lib.curate(cfg, str(work), say=said.append)
    assert os.stat(work / "embeddings.npy").st_mtime_ns == mtime
    assert any(m.startswith("resuming level 2") for m in said)
    # Another mixture in the same workdir: refused before the old one is overwritten.
    before = _outputs(work)
    other = _cfg(**{"input.synthetic": "long_tail", "plots": False, "seed": 1})
    with pytest.raises(ValueError, match="cluster tree of another synthetic mixture"):
        curate_lib.curate(other, str(work), say=lambda _: None)
    assert _outputs(work) == before


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros(10, np.float32), "2-D"),
        (np.zeros((4, 3, 2), np.float32), "2-D"),
        (np.zeros((100, 4), np.int32), "floating dtype"),
        (np.zeros((100, 4), bool), "floating dtype"),
        (np.zeros((0, 4), np.float32), "empty"),
    ],
)
def test_bad_arrays_are_refused(tmp_path, array, match):
    path = str(tmp_path / "bad.npy")
    np.save(path, array)
    with pytest.raises(ValueError, match=match):
        curate_lib.curate(_cfg(**{"input.embeddings": path}), str(tmp_path), say=lambda _: None)


def test_bad_sizes_are_refused_before_clustering(tmp_path):
    emb, _ = _write_inputs(tmp_path, n=200, bad_rows=(3, 100))
    work = str(tmp_path / "w")

    def run(**overrides):
        cfg = _cfg(**{"input.embeddings": emb, **overrides})
        curate_lib.curate(cfg, work, say=lambda _: None)

    with pytest.raises(ValueError, match=r"level 0: k=500 .* \(198\)"):
        run(**{"hierarchy.ks": (500, 10)})
    with pytest.raises(ValueError, match="level 1: k=50 .* 40 centroids of level 0"):
        run(**{"hierarchy.ks": (40, 50)})
    with pytest.raises(ValueError, match="target size 199 .* 198"):
        run(**{"sampling.target_size": 199})
    with pytest.raises(ValueError, match="resampling_steps has 3 entries for 2 levels"):
        run(**{"hierarchy.resampling_steps": (1, 2, 3)})
    with pytest.raises(ValueError, match="sample_strategy"):
        run(**{"hierarchy.sample_strategy": "farthest"})
    with pytest.raises(ValueError, match="does not exist"):
        run(**{"input.embeddings": "/nonexistent.npy"})
    with pytest.raises(ValueError, match="nothing to curate"):
        curate_lib.curate(_cfg(), work, say=lambda _: None)
    # Every error came before the first output: the workdir was not even created.
    assert not os.path.exists(work)


def test_bad_input_writes_nothing_into_a_used_workdir(tmp_path):
    """A bad config or input is one ValueError sentence, raised before any output file is
    written (excluded_indices.npy used to be written before the checks passed)."""
    emb, lab = _write_inputs(tmp_path, n=300, bad_rows=(3, 100))
    work = str(tmp_path / "w")
    curate_lib.curate(_cfg(**{"input.embeddings": emb, "plots": False}), work, say=lambda _: None)
    before = _outputs(work)
    short_labels = str(tmp_path / "short.npy")
    np.save(short_labels, np.zeros(7, np.int32))
    nan_rows = str(tmp_path / "nan.npy")
    np.save(nan_rows, np.full((300, 8), np.nan, np.float32))
    cases = [
        ({"hierarchy.ks": (400, 10)}, r"level 0: k=400 .* \(298\)"),
        ({"sampling.target_size": 299}, "target size 299 .* 298"),
        ({"input.labels": short_labels}, r"must be an integer array of shape \(300,\)"),
        ({"input.labels": str(tmp_path / "missing.npy")}, "input.labels .* does not exist"),
        ({"input.embeddings": nan_rows}, "all 300 embedding rows hold NaN/inf"),
        ({"hierarchy.n_iters": 2}, "other arguments .*n_iters 5 there, 2 now"),
        ({"hierarchy.sample_sizes": (1, 4, 2)}, "sample_sizes has 3 entries for 2 levels"),
    ]
    for overrides, match in cases:
        cfg = _cfg(**{"input.embeddings": emb, "plots": False, **overrides})
        with pytest.raises(ValueError, match=match) as e:
            curate_lib.curate(cfg, work, say=lambda _: None)
        assert "\n" not in str(e.value)
        assert _outputs(work) == before, overrides


def test_hierarchy_accepts_tuples_and_lists_and_refuses_strings():
    cfg = _cfg()
    for seq in (list, tuple):
        cfg.hierarchy.ks = seq((40, 10))
        cfg.hierarchy.resampling_steps = seq((1, 3))
        cfg.hierarchy.sample_sizes = seq((1, 2))
        hk = curate_lib.check_hierarchy(cfg.hierarchy, 100)
        assert hk["ks"] == [40, 10] and hk["resampling_steps"] == [1, 3]
    h = dict(cfg.hierarchy)
    h["ks"] = "40, 10"
    with pytest.raises(ValueError, match="hierarchy.ks must be an int or a list/tuple of ints"):
        curate_lib.check_hierarchy(ml_collections.ConfigDict(h))


def test_all_nonfinite_is_refused(tmp_path):
    path = str(tmp_path / "nan.npy")
    np.save(path, np.full((50, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="all 50 embedding rows hold NaN/inf"):
        curate_lib.curate(_cfg(**{"input.embeddings": path}), str(tmp_path), say=lambda _: None)


def test_configs_load():
    for name in ("default", "test", "web_4level", "stdlib_code"):
        cfg = load_config(os.path.join(REPO, "configs", "curation", f"{name}.py"))
        curate_lib.check_hierarchy(cfg.hierarchy)
    web = load_config(os.path.join(REPO, "configs", "curation", "web_4level.py"))
    assert list(web.hierarchy.ks) == [10_000_000, 500_000, 50_000, 10_000]
    assert web.hierarchy.split_first == 100 and web.hierarchy.dtype == "float64"
    assert list(web.hierarchy.resampling_steps) == [1, 10, 10, 10]
    assert list(web.hierarchy.sample_sizes) == [1, 10, 5, 3]


# ----------------------------------------------------------------------------- embeddings


@pytest.fixture(scope="module")
def tiny_llama():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from herd.lm.config import LlamaConfig
    from herd.lm.model import Llama

    cfg = LlamaConfig(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_dim=64, max_seq_len=64
    )
    model = Llama(cfg)
    init = jax.jit(model.init)
    params = nn.meta.unbox(init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return cfg, model, params


def _direct(model, params, docs):
    """Each document alone, unpadded: the mean of its final hidden states."""
    import jax
    import jax.numpy as jnp

    apply = jax.jit(lambda p, t: model.apply({"params": p}, t, return_hidden=True))
    rows = [np.asarray(apply(params, jnp.asarray([d], jnp.int32)))[0].mean(0) for d in docs]
    return np.stack(rows).astype(np.float32)


def test_embed_memmap_equals_direct_computation_padding_ignored(tmp_path, tiny_llama):
    from herd.curation import embed

    cfg, model, params = tiny_llama
    rng = np.random.default_rng(0)
    # Three distinct lengths (few compilations of the direct computation).
    docs = [rng.integers(0, 64, n).tolist() for n in rng.choice([1, 7, 19], 13)]
    ref = _direct(model, params, docs)
    fn = embed.llama_embed_fn(cfg)
    outs = []
    for seq_len in (20, 40):  # more padding must not change anything
        path = str(tmp_path / f"emb{seq_len}.npy")
        out = embed.embed_to_npy(
            fn, params, embed.tokenize_batches(docs, seq_len, 8), path, len(docs), progress=False
        )
        assert isinstance(out, np.memmap) and out.shape == (13, 32)
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
        outs.append(np.load(path))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)


def test_embed_texts_truncation_and_errors(tmp_path, tiny_llama):
    from herd.curation import embed

    cfg, model, params = tiny_llama

    class CharTokenizer:
        vocab_size, bos_id, eos_id, pad_id = 64, 1, 2, 0

        def encode(self, text, bos=False, eos=False):
            return ([1] if bos else []) + [3 + ord(ch) % 60 for ch in text]

    texts = ["def f(x):\n    return x", "import os", "a" * 50]
    emb, info = embed.embed_texts(
        texts, CharTokenizer(), params, cfg, str(tmp_path / "t.npy"), seq_len=16, batch_size=8,
        progress=False,
    )  # fmt: skip
    assert info["n_truncated"] == 2 and info["n_documents"] == 3
    toks = [CharTokenizer().encode(t, bos=True)[:16] for t in texts]
    np.testing.assert_allclose(emb, _direct(model, params, toks), atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="token id 99 outside the vocabulary"):
        list(embed.tokenize_batches([[1, 99]], 8, 8, vocab_size=64))
    with pytest.raises(ValueError, match="not divisible by the data-parallel size"):
        embed.embed_to_npy(
            embed.llama_embed_fn(cfg), params, embed.tokenize_batches([[1, 2]], 8, 3),
            str(tmp_path / "x.npy"), 1, progress=False,
        )  # fmt: skip


def _save_lm_checkpoint(directory, params, step, model_section=None):
    """A herd LM checkpoint as herd.lm.train writes it: a TrainState with AdamW state and
    (if given) the run's config."""
    import jax
    import jax.numpy as jnp
    import optax

    from herd.core.checkpoint import Checkpointer
    from herd.core.loop import TrainState

    state = TrainState(
        step=jnp.int32(step),
        params=params,
        opt_state=optax.adamw(1e-3).init(params),
        rng=jax.random.key_data(jax.random.key(0)),
    )
    config = {"model": model_section} if model_section is not None else None
    ckpt = Checkpointer(str(directory / "checkpoints"), async_save=False, config=config)
    ckpt.save(step, state)
    ckpt.close()


def test_load_params_from_a_herd_checkpoint(tmp_path, tiny_llama):
    """Params alone, onto a mesh of 8 devices in the model's layout; the config travels
    with the checkpoint; a checkpoint of another model is refused naming its file."""
    import dataclasses

    import jax

    from herd.core import mesh as mesh_lib
    from herd.curation import embed

    cfg, _, params = tiny_llama
    model_section = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}
    _save_lm_checkpoint(tmp_path / "run", params, 5, model_section)
    assert embed.run_model_config(str(tmp_path / "run")) == cfg
    # embed.model_config overrides the stored one (checkpoints of an older herd have none)
    tiny = embed.run_model_config(str(tmp_path / "run"), config_file="configs/lm/tiny.py")
    assert (tiny.dim, tiny.n_layers, tiny.vocab_size) == (64, 2, 512)
    mesh = mesh_lib.make_mesh({"fsdp": 4, "tensor": 2})
    loaded = embed.load_params(str(tmp_path / "run"), cfg, mesh=mesh)
    wq = loaded["layers"]["attention"]["wq"]
    assert wq.sharding.mesh == mesh and wq.sharding.spec[1:3] == ("fsdp", "tensor")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = dataclasses.replace(cfg, n_layers=3)
    with pytest.raises(ValueError, match=r"run/checkpoints/5/config.*n_layers 2 -> 3"):
        embed.load_params(str(tmp_path / "run"), other)
    with pytest.raises(ValueError, match="no checkpoint step 7"):
        embed.load_params(str(tmp_path / "run"), cfg, step=7)
    with pytest.raises(ValueError, match="does not exist"):
        embed.load_params(str(tmp_path / "nothing"), cfg)
    with pytest.raises(ValueError, match="set embed.tokenizer"):
        embed.run_tokenizer(str(tmp_path / "run"))


@pytest.mark.slow
def test_curate_embeds_with_nothing_but_a_herd_lm_workdir(tmp_path, monkeypatch):
    """herd.lm.train leaves a workdir; curation's embedding needs only that path: the
    model config comes from the checkpoint, the tokenizer from the workdir."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from herd.core import mesh as mesh_lib
    from herd.core.checkpoint import restore_params
    from herd.lm import train
    from herd.lm.model import Llama
    from herd.lm.presets import build_model_config
    from herd.lm.tokenizer import load_from_workdir

    monkeypatch.setenv("HERD_CACHE", str(tmp_path / "cache"))
    lm_cfg = load_config(
        "configs/lm/tiny.py", ["train.steps=2", "train.sample_tokens=0", "train.eval_every=0"]
    )
    train.run(lm_cfg, str(tmp_path / "lm"))
    mc = build_model_config(lm_cfg.model)
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(24):
        body = f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * (1 + i % 4)
        if i % 3 == 0:
            body += "# a comment about the weather and the sea\n" * (1 + i % 5)
        (docs / f"doc{i:02d}.txt").write_text(body)
    cfg = _cfg(
        **{
            "embed.documents": str(docs / "*.txt"),
            "embed.checkpoint": str(tmp_path / "lm"),
            "embed.seq_len": 32,
            "hierarchy.ks": (6, 2),
            "sampling.target_size": 10,
            "plots": False,
        }
    )
    work = tmp_path / "work"
    msgs = []
    summary = curate_lib.curate(cfg, str(work), say=msgs.append)
    emb = np.load(work / "embeddings.npy")
    assert emb.shape == (24, mc.dim) and np.isfinite(emb).all()
    assert summary["input"]["n_documents"] == 24 and summary["n_selected"] == 10
    assert (work / "documents.txt").read_text().split() == sorted(str(p) for p in docs.iterdir())
    # the embedding of a document is the mean of the trained model's final hidden states
    model = Llama(mc)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    rep = mesh_lib.replicated(mesh_lib.make_mesh({"fsdp": -1}))
    params = restore_params(
        str(tmp_path / "lm" / "checkpoints"),
        jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
            nn.meta.unbox(abstract["params"]),
        ),
    )
    tok = load_from_workdir(str(tmp_path / "lm"))
    ids = tok.encode((docs / "doc05.txt").read_text(), bos=True)[:32]
    hidden = model.apply({"params": params}, jnp.asarray([ids], jnp.int32), return_hidden=True)
    np.testing.assert_allclose(emb[5], np.asarray(hidden)[0].mean(0), atol=1e-5, rtol=1e-5)
    # A rerun reuses the embeddings (same documents, checkpoint step, tokenizer).
    msgs.clear()
    curate_lib.curate(cfg, str(work), say=msgs.append)
    assert any("reusing the embeddings" in m for m in msgs)
