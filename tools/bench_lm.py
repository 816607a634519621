"""Training and decode benchmarks of herd's Llama against Hugging Face transformers + torch.

Usage::

    python tools/bench_lm.py                       # everything (about 15-20 min on 2 cores)
    python tools/bench_lm.py --sections throughput --steps 8
    python tools/bench_lm.py --sections compile,memory,profile
    python tools/bench_lm.py --sections accel      # GPU/TPU: Llama-3-8B-shaped layers, bf16
    python tools/bench_lm.py --sections decode     # generation: herd vs HF generate (CPU)
    python tools/bench_lm.py --sections accel_decode  # GPU/TPU: Llama-3-8B decode, bf16

On CPU (the default sections):

* ``peak``: the machine's float32 square-matmul peak, measured with jnp and with torch
  (the larger of the two is the MFU denominator).
* ``throughput``: a ~30M-parameter Llama (vocab 8192, dim 512, 8 layers, 8 heads, 4 KV
  heads, ffn 1536, seq 512, batch 8, float32). herd's real train step
  (``herd.lm.train.make_train_step``: AdamW with clipping, donated state, chunked loss
  helper, document-masked attention) against ``transformers.LlamaForCausalLM`` (sdpa
  attention) + ``torch.optim.AdamW`` with the same clipping, in alternating blocks of
  ``--block`` steps in one process (a pause and untimed warm-up steps before each block);
  medians. Model FLOPs/token = 6 x non-embedding params (LM head
  included) + 6 x n_layers x seq_len x dim (causal attention, halved).
* ``compile``: lower + compile time of the train step vs depth (2, 4, 8, 16 layers),
  scanned and unrolled.
* ``memory``: XLA's temp (activation) bytes of the compiled step for each remat policy.
* ``profile``: where herd's step spends time: forward only, forward + backward, whole
  step; attention backends and vocab chunking compared on the same step.

``decode``: generation of the same ~30M model with random float32 weights, greedy, prompt 16
and 128 new tokens (exactly: no stop token, ``min_new_tokens`` for the peer), at batch 1 and
8: ``herd.lm.generate.generate_tokens`` against ``transformers`` ``LlamaForCausalLM.generate``
on the same weights (written by ``herd.lm.convert.to_hf``, loaded with ``from_pretrained``),
alternating, medians. Prefill = a 1-token generation; decode tokens/s = the other 127 tokens
over (generation - prefill) time. Compile time (jax.monitoring's compile events) is split
from the first call; steady state is after it. Memory read bandwidth is measured in the same
run (a jitted float32 matvec over a matrix of the model's weight size, and torch.mv) before,
during (each round) and after; the best is the bound. Batch-1 decode must read every weight
but the embedding table and the cached K/V once per token: bound = bandwidth / those bytes.
herd prepares its decode weights (per-layer, fused q/k/v and gate/up matrices) once per
params object, in the first call: the timed calls reuse them, as the peer reuses its loaded
model. ``--decode-profile`` also times one decode step outside the loop, its weight matmuls
alone and the weight preparation, and lists the copies left in the compiled loop body.

    python tools/bench_lm.py --sections decode --decode-rounds 5

``accel`` (only on GPU/TPU): bf16 MFU of Llama-3-8B-shaped layers (dim 4096, 32 heads, 8 KV
heads, ffn 14336, vocab 128256, seq 8192, a few layers) with the platform's attention
kernel (splash on TPU, cudnn on GPU), against the measured bf16 matmul peak and the
vendor's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from herd.core import mesh as mesh_lib  # noqa: E402
from herd.core.optim import make_optimizer  # noqa: E402
from herd.lm.config import LlamaConfig  # noqa: E402
from herd.lm.model import Llama  # noqa: E402
from herd.lm.train import (  # noqa: E402
    _loss_fn,
    flops_per_token,
    hidden_states,
    make_init_fn,
    make_train_step,
)

BENCH = dict(
    vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1536, max_seq_len=512
)
SEQ, BATCH = 512, 8
OPTIM = dict(
    lr=3e-4,
    warmup_steps=10,
    min_lr_ratio=0.1,
    b1=0.9,
    b2=0.95,
    eps=1e-5,
    weight_decay=0.1,
    clip_norm=1.0,
)
# Dense bf16 peak FLOP/s per chip (vendor figures), for the accelerator section.
VENDOR_BF16_PEAK = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def log(*a):
    print(*a, flush=True)


def median(xs):
    return float(statistics.median(xs))


def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        up = "?"
    dev = jax.devices()[0]
    return dict(
        cpu=cpu,
        cores=os.cpu_count(),
        platform=dev.platform,
        device_kind=getattr(dev, "device_kind", "?"),
        jax=jax.__version__,
        uptime=up,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )


# ------------------------------------------------------------------------------- peak


def matmul_peak(n=1024, reps=15, dtype=jnp.float32) -> dict:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        ts.append(time.perf_counter() - t0)
    out = {"jnp_best": 2 * n**3 / min(ts), "jnp_median": 2 * n**3 / median(ts)}
    if jax.devices()[0].platform == "cpu":
        import torch

        x = torch.randn(n, n)
        torch.mm(x, x)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(x, x)
            ts.append(time.perf_counter() - t0)
        out.update(torch_best=2 * n**3 / min(ts), torch_median=2 * n**3 / median(ts))
    out["peak"] = max(v for k, v in out.items() if k.endswith("_best"))
    return out


# ------------------------------------------------------------------------------- herd


def herd_config(**over) -> LlamaConfig:
    return LlamaConfig(**{**BENCH, "rope_theta": 5e5, **over})


def make_batch(cfg, batch=BATCH, seq=SEQ, seed=0, docs=1):
    """One row = `docs` packed documents of equal length (docs=1: plain causal LM rows)."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    seg = np.repeat(np.arange(1, docs + 1, dtype=np.int32), -(-seq // docs))[:seq]
    pos = np.concatenate([np.arange(np.sum(seg == d)) for d in range(1, docs + 1)])
    loss_mask = np.ones((batch, seq), np.float32)
    loss_mask[:, np.nonzero(np.diff(seg))[0]] = 0.0  # no prediction across documents
    return {
        "inputs": toks[:, :-1],
        "targets": toks[:, 1:],
        "positions": np.broadcast_to(pos.astype(np.int32), (batch, seq)).copy(),
        "segment_ids": np.broadcast_to(seg, (batch, seq)).copy(),
        "loss_mask": loss_mask,
    }


class HerdStep:
    """herd's real train step on a 1-device mesh (state donated between calls)."""

    def __init__(self, cfg: LlamaConfig, vocab_chunk: int = 0, seed: int = 0):
        self.cfg = cfg
        self.mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
        self.model = Llama(cfg)
        self.optimizer, _ = make_optimizer(OPTIM, total_steps=1000)
        init_fn = make_init_fn(self.model, self.optimizer)
        self.state, shardings = mesh_lib.init_sharded(init_fn, jax.random.PRNGKey(seed), self.mesh)
        self.step_fn = make_train_step(
            self.model,
            self.optimizer,
            mesh=self.mesh,
            state_shardings=shardings,
            vocab_chunk=vocab_chunk,
        )
        self.compiled = None

    def batch(self, host):
        return mesh_lib.shard_batch(host, self.mesh)

    def compile(self, batch):
        t0 = time.perf_counter()
        lowered = self.step_fn.lower(self.state, batch)
        t1 = time.perf_counter()
        self.compiled = lowered.compile()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    def __call__(self, batch) -> float:
        self.state, metrics = self.compiled(self.state, batch)
        return float(metrics["loss"])  # blocks


def n_params(cfg, embeddings=True):
    return cfg.num_params(include_embeddings=embeddings)


# ------------------------------------------------------------------------------- peer


class TorchStep:
    def __init__(self, cfg: LlamaConfig, seed=0):
        import torch
        from transformers import LlamaConfig as HFConfig
        from transformers import LlamaForCausalLM

        torch.manual_seed(seed)
        hf = HFConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.dim,
            intermediate_size=cfg.hidden_dim,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads,
            max_position_embeddings=cfg.max_seq_len,
            rope_theta=cfg.rope_theta,
            rms_norm_eps=cfg.norm_eps,
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )
        self.torch = torch
        self.model = LlamaForCausalLM(hf).train()
        self.opt = torch.optim.AdamW(
            self.model.parameters(),
            lr=OPTIM["lr"],
            betas=(OPTIM["b1"], OPTIM["b2"]),
            eps=OPTIM["eps"],
            weight_decay=OPTIM["weight_decay"],
        )

    def batch(self, host):
        t = self.torch
        return t.from_numpy(host["inputs"]).long(), t.from_numpy(host["targets"]).long()

    def __call__(self, batch) -> float:
        inputs, targets = batch
        logits = self.model(input_ids=inputs).logits
        loss = self.torch.nn.functional.cross_entropy(
            logits.view(-1, logits.shape[-1]).float(), targets.view(-1)
        )
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), OPTIM["clip_norm"])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


# ------------------------------------------------------------------------------- sections


def timed(fn, *a):
    t0 = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t0


def timed2(fn, *a):
    """(wall seconds, CPU seconds of this process, all threads). On a shared machine the
    CPU seconds are far less sensitive to other processes' load than the wall time."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn(*a)
    return time.perf_counter() - t0, time.process_time() - c0


def _q_chunk(args):
    return args.q_chunk if args.attention == "xla_chunked" else None


def section_throughput(args, peak, res):
    cfg = herd_config(
        attention_impl=args.attention, attention_q_chunk=_q_chunk(args), remat_policy=args.remat
    )
    host = make_batch(cfg, docs=1)
    herd = HerdStep(cfg, vocab_chunk=args.vocab_chunk)
    hb = herd.batch(host)
    lower_s, compile_s = herd.compile(hb)
    log(f"herd step: lower {lower_s:.1f}s compile {compile_s:.1f}s")
    peers = {}
    if not args.no_peer:
        peers["hf_torch"] = TorchStep(cfg)
    pb = {k: p.batch(host) for k, p in peers.items()}
    contestants = {"herd": (herd, hb), **{k: (p, pb[k]) for k, p in peers.items()}}
    times = {k: [] for k in contestants}
    cpu = {k: [] for k in times}
    # Blocks of steps, alternating contestants: stepping them one step each measured herd
    # 11% slower than alone (788 vs ~700 tok/s here), as each framework's worker threads
    # are still spinning when the other starts. Each block starts after a pause and its
    # first `warmup` steps are not timed; alternating blocks still share the load drift.
    for r in range(-(-args.steps // args.block)):
        for k, (fn, batch) in contestants.items():
            time.sleep(args.pause)
            for i in range(args.warmup + args.block):
                w, c = timed2(fn, batch)
                if i >= args.warmup:
                    times[k].append(w)
                    cpu[k].append(c)
                log(f"round {r} {k} step {i}: {w:.2f}s (cpu {c:.2f}s)")
    fpt = flops_per_token(cfg, SEQ)
    tokens = BATCH * SEQ
    out = {
        "flops_per_token": fpt,
        "params": n_params(cfg),
        "non_embedding_params": n_params(cfg, False),
        "tokens_per_step": tokens,
    }
    for k, ts in times.items():
        tps = tokens / median(ts)
        out[k] = {
            "step_s_median": median(ts),
            "step_s_min": min(ts),
            "tokens_per_s": tps,
            "tokens_per_s_best": tokens / min(ts),
            "mfu": tps * fpt / peak,
            "cpu_s_median": median(cpu[k]),
            "steps": ts,
            "cpu_steps": cpu[k],
        }
    if "hf_torch" in out:
        out["ratio_median"] = out["herd"]["tokens_per_s"] / out["hf_torch"]["tokens_per_s"]
        out["ratio_best"] = out["herd"]["tokens_per_s_best"] / out["hf_torch"]["tokens_per_s_best"]
        # per-step-pair ratios: the i-th timed steps of both ran within a minute
        r = [b / a for a, b in zip(times["herd"], times["hf_torch"], strict=True)]
        out["ratio_per_round_median"] = median(r)
        out["ratio_cpu_seconds"] = median(cpu["hf_torch"]) / median(cpu["herd"])
    res["throughput"] = out


def section_compile(args, res):
    out = []
    host = None
    for scan in (True, False):
        for depth in args.depths:
            cfg = herd_config(n_layers=depth, scan_layers=scan)
            herd = HerdStep(cfg)
            host = make_batch(cfg, batch=2, seq=128)
            lo, co = herd.compile(herd.batch(host))
            out.append({"scan": scan, "n_layers": depth, "lower_s": lo, "compile_s": co})
            log(f"compile scan={scan} layers={depth}: lower {lo:.1f}s compile {co:.1f}s")
            del herd
    res["compile"] = out


def section_memory(args, res):
    out = []
    for policy in ("none", "save_dots", "save_attn", "full"):
        cfg = herd_config(remat_policy=policy)
        herd = HerdStep(cfg)
        host = make_batch(cfg)
        herd.compile(herd.batch(host))
        ma = herd.compiled.memory_analysis()
        row = {"remat": policy}
        for f in (
            "temp_size_in_bytes",
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "alias_size_in_bytes",
            "generated_code_size_in_bytes",
        ):
            row[f] = int(getattr(ma, f, -1))
        out.append(row)
        log(
            f"memory remat={policy}: temp {row['temp_size_in_bytes'] / 2**20:.0f} MiB, "
            f"args {row['argument_size_in_bytes'] / 2**20:.0f} MiB"
        )
        del herd
    res["memory"] = out


def section_profile(args, res):
    """Forward / forward+backward / whole step of herd's model, alternating, medians; then
    variants of the whole step (attention backend, vocab chunking, remat) in one loop."""

    cfg = herd_config(
        attention_impl=args.attention, attention_q_chunk=_q_chunk(args), remat_policy=args.remat
    )
    host = make_batch(cfg)
    herd = HerdStep(cfg)
    batch = herd.batch(host)
    herd.compile(batch)
    # Copies: the whole-step timing below donates (deletes) herd.state's buffers.
    params = jax.tree.map(jnp.copy, herd.state.params)
    opt_state = jax.tree.map(jnp.copy, herd.state.opt_state)
    model = herd.model

    token_loss = _loss_fn(model, 0)  # the train step's own loss (whole vocabulary)

    def loss_fn(p, b):
        s, n = token_loss(p, b)
        return s / n

    def hidden_fn(p, b):
        return jnp.sum(hidden_states(model, p, b))  # the train step's own forward

    fwd = jax.jit(loss_fn).lower(params, batch).compile()
    grad = jax.jit(jax.grad(loss_fn)).lower(params, batch).compile()
    body_grad = jax.jit(jax.grad(hidden_fn)).lower(params, batch).compile()
    opt_update = None
    try:
        import optax

        def upd(p, g, s):
            u, s = herd.optimizer.update(g, s, p)
            return optax.apply_updates(p, u), s

        g0 = grad(params, batch)
        opt_update = jax.jit(upd).lower(params, g0, opt_state).compile()
    except Exception as e:  # pragma: no cover - diagnostic only
        log("optimizer timing skipped:", e)

    def block(x):
        return jax.block_until_ready(x)

    parts = {
        "forward (loss)": lambda: block(fwd(params, batch)),
        "forward+backward": lambda: block(grad(params, batch)),
        "layers fwd+bwd (no head/loss)": lambda: block(body_grad(params, batch)),
        "whole train step": lambda: herd(batch),
    }
    if opt_update is not None:
        parts["optimizer update"] = lambda: block(opt_update(params, g0, opt_state))
    times = {k: [] for k in parts}
    for i in range(args.profile_rounds + 1):
        for k, f in parts.items():
            t = timed(f)
            if i:
                times[k].append(t)
    out = {"parts": {k: median(v) for k, v in times.items()}}
    log("profile parts:", json.dumps(out["parts"], indent=1))

    variants = {
        "as benchmarked": dict(cfg=cfg, vocab_chunk=0),
        "attention xla (jax.nn.dot_product_attention)": dict(
            cfg=cfg.replace(attention_impl="xla", attention_q_chunk=None), vocab_chunk=0
        ),
        "vocab_chunk 2048": dict(cfg=cfg, vocab_chunk=2048),
        "remat none": dict(cfg=cfg.replace(remat_policy="none"), vocab_chunk=0),
    }
    steps = {}
    for name, v in variants.items():
        h = HerdStep(v["cfg"], vocab_chunk=v["vocab_chunk"])
        b = h.batch(host)
        h.compile(b)
        h(b)
        steps[name] = (h, b)
    vt = {k: [] for k in steps}
    for _ in range(args.profile_rounds):
        for k, (h, b) in steps.items():
            vt[k].append(timed(h, b))
    out["variants_step_s"] = {k: median(v) for k, v in vt.items()}
    log("profile variants:", json.dumps(out["variants_step_s"], indent=1))
    res["profile"] = out


# ------------------------------------------------------------------------------- decode

DECODE_PROMPT, DECODE_NEW = 16, 128


class CompileClock:
    """Seconds jax spent tracing, lowering and compiling since `reset` (jax.monitoring's
    /jax/core/compile/* events), so the first call's compile is split from its run."""

    def __init__(self):
        from jax import monitoring

        self.seconds = 0.0
        monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name, duration, **_):
        if name.startswith("/jax/core/compile/"):
            self.seconds += duration

    def reset(self):
        self.seconds = 0.0


def memory_bandwidth(nbytes: int, cols: int, reps: int = 21) -> dict:
    """Read bandwidth (bytes/s) of a float32 matrix-vector product over a matrix of about
    `nbytes` (a decode step's weights): jitted jnp in both layouts the model uses (x @ W with
    W [cols, n] as herd's projections, W @ x as torch's Linear) and torch.mv, each the best
    and the median of `reps` products. The matrix is far larger than the caches, so each
    product streams it from memory. ``bandwidth``: the best of all (what the machine can do;
    other processes on a shared machine only lower the figures)."""
    rows = max(1, nbytes // (4 * cols))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((cols, rows), dtype=np.float32)
    x = rng.standard_normal((cols,), dtype=np.float32)
    out = {"matrix_bytes": 4 * rows * cols}

    def clock(name, f):
        f()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        out[name + "_best"] = out["matrix_bytes"] / min(ts)
        out[name + "_median"] = out["matrix_bytes"] / median(ts)

    wd, xd = jnp.asarray(w), jnp.asarray(x)
    wt = jnp.asarray(np.ascontiguousarray(w.T))
    xw, wx = jax.jit(lambda x, w: x @ w), jax.jit(lambda w, x: w @ x)
    clock("jnp_xW", lambda: xw(xd, wd).block_until_ready())
    clock("jnp_Wx", lambda: wx(wt, xd).block_until_ready())
    try:
        import torch

        tw, tx = torch.from_numpy(np.ascontiguousarray(w.T)), torch.from_numpy(x)
        clock("torch_mv", lambda: torch.mv(tw, tx))
    except ImportError:
        pass
    out["bandwidth"] = max(v for k, v in out.items() if k.endswith("_best"))
    return out


def decode_bytes_per_step(cfg: LlamaConfig, batch: int, kv_len: float, itemsize=4) -> float:
    """Bytes one decode step must read at least: every weight except the embedding table
    (one row per token is gathered) plus the keys and values of `kv_len` cached tokens per
    row (K and V, all layers, per KV head)."""
    weights = n_params(cfg) - cfg.vocab_size * cfg.dim * (0 if cfg.tie_embeddings else 1)
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * kv_len * batch
    return float(itemsize * (weights + kv))


class HerdDecode:
    """herd.lm.generate.generate_tokens (greedy, no stop ids: exactly `new` tokens)."""

    def __init__(self, cfg, params):
        from herd.lm.generate import generate_tokens

        self.cfg, self.params, self.generate_tokens = cfg, params, generate_tokens

    def __call__(self, prompts, new):
        out = self.generate_tokens(self.cfg, self.params, prompts.tolist(), max_new_tokens=new)
        assert all(len(r) == new for r in out), [len(r) for r in out]
        return out


class HFDecode:
    """transformers LlamaForCausalLM.generate (greedy, min_new_tokens = max_new_tokens) on
    the same weights, written by herd.lm.convert.to_hf and loaded with from_pretrained."""

    def __init__(self, cfg, params, workdir):
        import torch
        from transformers import LlamaForCausalLM

        from herd.lm.convert import to_hf

        to_hf(cfg, params, workdir)
        self.torch = torch
        self.model = LlamaForCausalLM.from_pretrained(
            workdir, torch_dtype=torch.float32, attn_implementation="sdpa"
        ).eval()

    def __call__(self, prompts, new):
        t = self.torch
        ids = t.from_numpy(prompts).long()
        with t.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=t.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
        out = out[:, prompts.shape[1] :].numpy()
        assert out.shape == (prompts.shape[0], new), out.shape
        return out.tolist()


def decode_profile(cfg, params, batch, rounds, res_out):
    """Where herd's decode time goes, per token at batch `batch`: one jitted decode step
    (herd.lm.generate's cached forward over the prepared decode weights, outside the
    loop), the same step's weight matmuls alone (every matrix as x @ W, nothing else),
    the one-off preparation of the decode weights (once per params object), and the
    non-scalar copies left in the compiled decode loop's body (0: no weight or cache is
    copied per token); the loop's per-token time is the benchmark's."""
    from herd.lm import generate as gen

    prepare = gen._prepare_fn(cfg)
    jax.block_until_ready(prepare(params))
    t_prep = []
    for _ in range(3):
        t0 = time.perf_counter()
        weights = jax.block_until_ready(prepare(params))
        t_prep.append(time.perf_counter() - t0)
    s = DECODE_PROMPT + DECODE_NEW
    caches = jax.tree.map(jnp.copy, gen._init_caches(cfg, batch, s))  # distinct buffers
    k_pos = jnp.full((batch, s), -1, jnp.int32).at[:, : s // 2 + 1].set(jnp.arange(s // 2 + 1))
    tok = jnp.ones((batch, 1), jnp.int32)
    pos = jnp.full((batch, 1), s // 2, jnp.int32)

    def step(w, c, t, q):
        logits, c = gen._forward_cached(cfg, w, t, q, c, k_pos, s // 2)
        return jnp.argmax(logits[:, -1], -1), c

    step_c = jax.jit(step, donate_argnums=1).lower(weights, caches, tok, pos).compile()

    mats = _weight_mats(weights)
    x = jnp.ones((batch, cfg.dim), jnp.float32)

    @jax.jit
    def matmuls(mats, x):
        acc = jnp.zeros((), jnp.float32)
        for w in mats:  # as the step multiplies: column blocks [blocks, in, out / blocks]
            y = jnp.ones((batch, w.shape[1]), jnp.float32) * x[:, :1]
            acc = acc + jnp.sum(gen._block_matmul(y, w))
        return acc

    matmuls(mats, x).block_until_ready()
    t_step, t_mm = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(8):
            _, caches = step_c(weights, caches, tok, pos)
        jax.block_until_ready(caches)
        t_step.append((time.perf_counter() - t0) / 8)
        t0 = time.perf_counter()
        for _ in range(8):
            matmuls(mats, x).block_until_ready()
        t_mm.append((time.perf_counter() - t0) / 8)
    res_out.update(
        step_s=median(t_step),
        weight_matmuls_s=median(t_mm),
        weight_matmuls=len(mats),
        prepare_weights_s=median(t_prep),
        loop_body_copies=_loop_body_copies(cfg, weights, batch),
        matmul_shapes=_matmul_shapes(mats, batch, rounds),
    )


def _matmul_shapes(mats, batch, rounds, reps=8) -> dict:
    """Per weight shape of the decode step: the best time of one product as herd's step
    does it (column blocks, jitted; the shape's distinct matrices in turn, so none is
    cached) and as torch.nn.functional.linear on the same matrices ([out, in], as HF's
    Linear), and the read bandwidth each reaches (matrix bytes / time)."""
    from herd.lm import generate as gen

    by_shape: dict[tuple, list] = {}
    for w in mats:
        by_shape.setdefault(tuple(w.shape), []).append(w)
    out = {}
    for shape, ws in by_shape.items():
        k, n = shape[1], shape[0] * shape[2]
        x = jnp.ones((batch, k), jnp.float32)
        herd = jax.jit(lambda ws, x: [gen._block_matmul(x, w) for w in ws])
        jax.block_until_ready(herd(ws, x))
        try:
            import torch

            tws = [
                torch.from_numpy(np.asarray(w).transpose(1, 0, 2).reshape(k, n).T.copy())
                for w in ws
            ]
            tx = torch.ones(batch, k)
        except ImportError:
            tws = None
        t_herd, t_torch = [], []
        for _ in range(max(reps, rounds)):
            t0 = time.perf_counter()
            jax.block_until_ready(herd(ws, x))
            t_herd.append((time.perf_counter() - t0) / len(ws))
            if tws is not None:
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    for w in tws:
                        torch.nn.functional.linear(tx, w)
                    t_torch.append((time.perf_counter() - t0) / len(tws))
        nbytes = 4 * k * n
        row = {"count": len(ws), "herd_s": min(t_herd), "herd_GBps": nbytes / min(t_herd) / 1e9}
        if t_torch:
            row.update(torch_s=min(t_torch), torch_GBps=nbytes / min(t_torch) / 1e9)
        out[f"{k}x{n}"] = row
    return out


def _loop_body_copies(cfg, weights, batch) -> list[str]:
    """The non-scalar copy instructions in the optimized HLO of generate's decode loop
    body (greedy, the benchmark's shapes): copies of weights or caches per token."""
    import re

    from herd.lm import generate as gen

    fn = gen._generate_fn(cfg, DECODE_NEW, (0.0, 0, 1.0, 1.0), (), 0, False)
    zeros = np.zeros((batch, DECODE_PROMPT), np.int32)
    hlo = (
        fn.lower(weights, zeros, zeros, zeros[:, 0], jax.random.PRNGKey(0), np.int32(0))
        .compile()
        .as_text()
    )
    body = re.search(r" while\(.*?body=%?([\w.\-]+)", hlo).group(1)
    start = hlo.index("\n%" + body + " ")
    text = hlo[start : hlo.index("\n}\n", start)]
    copies = re.findall(r"= (\w+\[[\d,]+\])\S* copy\(", text)
    sizes = [np.prod([int(d) for d in c[c.index("[") + 1 : -1].split(",")]) for c in copies]
    return [c for c, n in zip(copies, sizes, strict=True) if n > 64]


def _weight_mats(weights):
    """Every matrix a decode step multiplies by (generate's prepared weights, in column
    blocks)."""
    out = []
    for layer in weights["layers"]:
        out.extend(layer[k] for k in ("wqkv", "wo", "w13", "w2"))
    out.append(weights["head"])
    return out


def nn_unbox(params):
    import flax.linen as nn

    return nn.meta.unbox(params)


def section_decode(args, res):
    """Decode tokens/s (batch 1 and 8, prompt 16, 128 new tokens, greedy) and prefill
    tokens/s of herd against transformers generate on the same random float32 weights,
    alternating in one process; the measured memory bandwidth bounds batch-1 decode."""
    import tempfile

    cfg = herd_config(max_seq_len=max(BENCH["max_seq_len"], DECODE_PROMPT + DECODE_NEW))
    params = Llama(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = nn_unbox(params)
    batches = args.decode_batches
    rng = np.random.default_rng(1)
    prompts = {
        b: rng.integers(3, cfg.vocab_size, (b, DECODE_PROMPT)).astype(np.int32) for b in batches
    }
    bytes_b1 = decode_bytes_per_step(cfg, 1, DECODE_PROMPT + (DECODE_NEW - 1) / 2)
    weight_bytes = int(n_params(cfg, False) * 4)
    bw_before = memory_bandwidth(weight_bytes, cfg.dim)
    log("bandwidth (GB/s):", {k: round(v / 1e9, 1) for k, v in bw_before.items()})

    contestants = {"herd": HerdDecode(cfg, params)}
    tmp = tempfile.TemporaryDirectory()
    if not args.no_peer:
        if args.torch_threads:
            import torch

            torch.set_num_threads(args.torch_threads)
        contestants["hf_torch"] = HFDecode(cfg, params, os.path.join(tmp.name, "hf"))
    clock = CompileClock()
    out = {
        "params": n_params(cfg),
        "prompt_len": DECODE_PROMPT,
        "new_tokens": DECODE_NEW,
        "dtype": "float32",
        "bytes_per_token_b1": bytes_b1,
        "compile": {},
    }
    # First calls: herd compiles each (batch, new-token count) once; the peer warms up.
    first = {}
    for k, fn in contestants.items():
        time.sleep(args.pause)  # the previous contestant's worker threads stop spinning
        for b in batches:
            for new in (1, DECODE_NEW):
                clock.reset()
                t0 = time.perf_counter()
                first[(k, b, new)] = fn(prompts[b], new)
                wall = time.perf_counter() - t0
                out["compile"][f"{k} b{b} new{new}"] = {
                    "first_call_s": wall,
                    "compile_s": clock.seconds,
                }
                log(
                    f"first call {k} batch {b} new {new}: {wall:.2f}s "
                    f"(compile {clock.seconds:.2f}s)"
                )
    if "hf_torch" in contestants:
        agree = {}
        for b in batches:
            h, p = (
                np.asarray(first[("herd", b, DECODE_NEW)]),
                np.asarray(first[("hf_torch", b, DECODE_NEW)]),
            )
            same = (h == p).all(axis=0)
            agree[b] = int(np.argmin(same)) if not same.all() else DECODE_NEW
        out["greedy_tokens_equal_before_first_difference"] = agree
        log("greedy agreement (tokens equal before the first difference):", agree)
    times = {(k, b, new): [] for k in contestants for b in batches for new in (1, DECODE_NEW)}
    bandwidths = [bw_before]
    for r in range(args.decode_rounds):
        if r:  # again each round: the load of a shared machine comes and goes
            bandwidths.append(memory_bandwidth(weight_bytes, cfg.dim))
        for k, fn in contestants.items():
            time.sleep(args.pause)
            for b in batches:
                for new in (1, DECODE_NEW):
                    t = timed(fn, prompts[b], new)
                    times[(k, b, new)].append(t)
                    log(f"round {r} {k} batch {b} new {new}: {t:.3f}s")
    bandwidths.append(memory_bandwidth(weight_bytes, cfg.dim))
    log("bandwidth after (GB/s):", {k: round(v / 1e9, 1) for k, v in bandwidths[-1].items()})
    bw = max(m["bandwidth"] for m in bandwidths)
    out["bandwidth_runs"], out["bandwidth"] = bandwidths, bw
    out["bandwidth_median_of_runs"] = median([m["bandwidth"] for m in bandwidths])
    out["bound_tokens_per_s_b1"] = bw / bytes_b1
    for k in contestants:
        row = out[k] = {}
        for b in batches:
            t1, tn = median(times[(k, b, 1)]), median(times[(k, b, DECODE_NEW)])
            row[f"b{b}"] = {
                "prefill_s": t1,
                "generate_s": tn,
                # the first token comes with the prefill; the other 127 are the decode loop
                "decode_tokens_per_s": b * (DECODE_NEW - 1) / (tn - t1),
                "end_to_end_tokens_per_s": b * DECODE_NEW / tn,
                "prefill_tokens_per_s": b * DECODE_PROMPT / t1,
                # the fastest runs: on a shared machine, the closest to an unloaded one
                "decode_tokens_per_s_best": b
                * (DECODE_NEW - 1)
                / (min(times[(k, b, DECODE_NEW)]) - min(times[(k, b, 1)])),
                "runs_prefill_s": times[(k, b, 1)],
                "runs_generate_s": times[(k, b, DECODE_NEW)],
            }
    herd = out["herd"]
    for k in contestants:
        if k.startswith("herd") and "b1" in out[k]:
            out[k]["fraction_of_bound_b1"] = (
                out[k]["b1"]["decode_tokens_per_s"] / out["bound_tokens_per_s_b1"]
            )
            out[k]["fraction_of_bound_b1_best"] = (
                out[k]["b1"]["decode_tokens_per_s_best"] / out["bound_tokens_per_s_b1"]
            )
    if "hf_torch" in out:
        out["ratio_best"] = {
            f"b{b}": herd[f"b{b}"]["decode_tokens_per_s_best"]
            / out["hf_torch"][f"b{b}"]["decode_tokens_per_s_best"]
            for b in batches
        }
        out["ratio"] = {
            f"b{b}": herd[f"b{b}"]["decode_tokens_per_s"]
            / out["hf_torch"][f"b{b}"]["decode_tokens_per_s"]
            for b in batches
        }
        out["ratio_prefill"] = {
            f"b{b}": herd[f"b{b}"]["prefill_tokens_per_s"]
            / out["hf_torch"][f"b{b}"]["prefill_tokens_per_s"]
            for b in batches
        }
    if args.decode_profile:
        prof = out["profile"] = {}
        for b in batches:
            prof[f"b{b}"] = {}
            decode_profile(cfg, params, b, args.profile_rounds, prof[f"b{b}"])
            per_tok = 1 / (herd[f"b{b}"]["decode_tokens_per_s"] / b)
            prof[f"b{b}"]["loop_per_token_s"] = per_tok
            prof[f"b{b}"]["min_bytes_per_step"] = decode_bytes_per_step(
                cfg, b, DECODE_PROMPT + (DECODE_NEW - 1) / 2
            )
            log(f"profile batch {b}:", json.dumps(prof[f"b{b}"]))
    tmp.cleanup()
    res["decode"] = out
    summary = {
        k: {b: round(v[b]["decode_tokens_per_s"], 1) for b in v if b.startswith("b")}
        for k, v in out.items()
        if k in contestants
    }
    log(
        "decode tok/s:",
        summary,
        "bound b1:",
        round(out["bound_tokens_per_s_b1"], 1),
        "fraction:",
        round(herd["fraction_of_bound_b1"], 3),
    )


def _parse_overrides(text: str) -> dict:
    """'dim=256,n_layers=2' -> {'dim': 256, 'n_layers': 2} (ints where they parse)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, val = item.partition("=")
        try:
            out[key] = int(val)
        except ValueError:
            out[key] = val
    return out


def section_accel(args, res):
    """bf16 MFU of Llama-3-8B-shaped layers, once per attention backend in the list."""
    import gc

    dev = jax.devices()[0]
    if dev.platform == "cpu" and not args.accel_on_cpu:
        log("accel: skipped (no GPU/TPU)")
        return
    impls = ["splash"] if dev.platform == "tpu" else args.gpu_attention.split(",")
    seq = args.accel_seq
    measured = matmul_peak(n=args.accel_peak_n, reps=10, dtype=jnp.bfloat16)["peak"]
    vendor = next((v for k, v in VENDOR_BF16_PEAK.items() if k in dev.device_kind), None)
    log(f"accel: {dev.device_kind}, measured bf16 matmul peak {measured / 1e12:.1f} TFLOP/s")
    res["accel"] = {
        "device": dev.device_kind,
        "measured_bf16_peak": measured,
        "vendor_bf16_peak": vendor,
        "runs": [],
    }
    for impl in impls:
        cfg = LlamaConfig.preset("llama3-8b").replace(
            **{
                "n_layers": args.accel_layers,
                "dtype": "bfloat16",
                "param_dtype": "float32",
                "attention_impl": impl,
                "attention_q_chunk": args.q_chunk if impl == "xla_chunked" else None,
                "max_seq_len": max(seq, 8192),
                "remat_policy": args.accel_remat,
                **_parse_overrides(args.accel_override),
            }
        )
        run = {
            "attention_impl": impl,
            "n_layers": cfg.n_layers,
            "dim": cfg.dim,
            "seq": seq,
            "batch": args.accel_batch,
            "remat": args.accel_remat,
            "vocab_chunk": args.accel_vocab_chunk,
        }
        res["accel"]["runs"].append(run)
        try:
            herd = HerdStep(cfg, vocab_chunk=args.accel_vocab_chunk)
            host = make_batch(cfg, batch=args.accel_batch, seq=seq, docs=args.accel_docs)
            b = herd.batch(host)
            lo, co = herd.compile(b)
            mem = herd.compiled.memory_analysis()
            ts, losses = [], []
            for i in range(args.warmup + args.steps):
                t0 = time.perf_counter()
                losses.append(herd(b))
                if i >= args.warmup:
                    ts.append(time.perf_counter() - t0)
        except Exception as e:  # one backend failing must not hide the others' figures
            run["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
            log(f"accel {impl}: FAILED {run['error']}")
            continue
        finally:
            herd = b = None
            gc.collect()
        fpt = flops_per_token(cfg, seq)
        tps = args.accel_batch * seq / median(ts)
        stats = dev.memory_stats() or {}
        run.update(
            compile_s=lo + co,
            step_s_median=median(ts),
            tokens_per_s=tps,
            flops_per_token=fpt,
            model_tflops_per_s=tps * fpt / 1e12,
            mfu_vs_measured=tps * fpt / measured,
            mfu_vs_vendor=(tps * fpt / vendor) if vendor else None,
            losses=losses,
            temp_bytes=getattr(mem, "temp_size_in_bytes", None),
            peak_bytes_in_use=stats.get("peak_bytes_in_use"),
        )
        log(json.dumps(run))


def hbm_bandwidth(nbytes: int, reps: int = 10) -> dict:
    """Read bandwidth (bytes/s) of the accelerator's memory: a jitted float32-accumulated
    sum over a bfloat16 array of `nbytes` (far larger than any cache), best and median of
    `reps`."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    total = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    total(x).block_until_ready()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        total(x).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return {"array_bytes": nbytes, "bandwidth": nbytes / min(ts), "median": nbytes / median(ts)}


def section_accel_decode(args, res):
    """Decode tok/s of a Llama-3-8B-shaped model in bf16 (herd.lm.generate.generate_tokens,
    greedy, prompt 16, 128 new tokens) at each batch of --accel-decode-batches, and the
    fraction of the measured HBM read bandwidth its steps use (the bytes each step must
    read: every weight but the embedding table, plus the cached K/V)."""
    dev = jax.devices()[0]
    if dev.platform == "cpu" and not args.accel_on_cpu:
        log("accel_decode: skipped (no GPU/TPU)")
        return
    cfg = LlamaConfig.preset("llama3-8b").replace(
        **{
            "dtype": "bfloat16",
            "param_dtype": "bfloat16",
            "max_seq_len": DECODE_PROMPT + DECODE_NEW,
            **_parse_overrides(args.accel_override),
        }
    )
    model = Llama(cfg)
    init = jax.jit(lambda key: nn_unbox(model.init(key, jnp.zeros((1, 8), jnp.int32))["params"]))
    params = init(jax.random.PRNGKey(0))
    weight_bytes = n_params(cfg, False) * 2
    bw = hbm_bandwidth(min(int(weight_bytes), 8 << 30))
    log(
        f"accel_decode: {dev.device_kind}, {n_params(cfg) / 1e9:.2f}B params (bf16), "
        f"HBM read {bw['bandwidth'] / 1e9:.0f} GB/s"
    )
    out = res["accel_decode"] = {
        "device": dev.device_kind,
        "params": n_params(cfg),
        "n_layers": cfg.n_layers,
        "dtype": "bfloat16",
        "prompt_len": DECODE_PROMPT,
        "new_tokens": DECODE_NEW,
        "hbm_bandwidth": bw,
        "batches": {},
    }
    herd = HerdDecode(cfg, params)
    rng = np.random.default_rng(1)
    for b in args.accel_decode_batches:
        prompts = rng.integers(3, cfg.vocab_size, (b, DECODE_PROMPT)).astype(np.int32)
        for new in (1, DECODE_NEW):  # compile both shapes before timing
            herd(prompts, new)
        t1 = [timed(herd, prompts, 1) for _ in range(args.decode_rounds)]
        tn = [timed(herd, prompts, DECODE_NEW) for _ in range(args.decode_rounds)]
        steps_per_s = (DECODE_NEW - 1) / (median(tn) - median(t1))
        step_bytes = decode_bytes_per_step(cfg, b, DECODE_PROMPT + (DECODE_NEW - 1) / 2, 2)
        row = out["batches"][f"b{b}"] = {
            "prefill_s": median(t1),
            "generate_s": median(tn),
            "decode_tokens_per_s": b * steps_per_s,
            "prefill_tokens_per_s": b * DECODE_PROMPT / median(t1),
            "bytes_per_step": step_bytes,
            "fraction_of_hbm_bandwidth": steps_per_s * step_bytes / bw["bandwidth"],
        }
        log(f"accel_decode batch {b}:", json.dumps(row))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--sections", default="peak,throughput,compile,memory,profile,accel,accel_decode,decode"
    )
    p.add_argument("--steps", type=int, default=7, help="timed steps per contestant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (per block)")
    p.add_argument("--block", type=int, default=3, help="timed steps per contestant block")
    p.add_argument("--pause", type=float, default=1.0, help="seconds idle before each block")
    p.add_argument("--attention", default="xla_chunked", help="herd attention_impl")
    p.add_argument(
        "--remat",
        default="save_dots",
        help="herd remat_policy for the throughput and profile sections (save_dots: the "
        "fastest here, fewer activations written and read back)",
    )
    p.add_argument("--q-chunk", type=int, default=128, help="attention_q_chunk (xla_chunked)")
    p.add_argument("--vocab-chunk", type=int, default=0, help="0 = whole vocabulary")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--depths", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8, 16])
    p.add_argument("--profile-rounds", type=int, default=5)
    p.add_argument(
        "--gpu-attention",
        default="cudnn",
        help="comma-separated attention backends for the accel section on GPU "
        "(cudnn, pallas_gpu, xla_chunked, xla)",
    )
    p.add_argument("--accel-layers", type=int, default=4)
    p.add_argument("--accel-seq", type=int, default=8192)
    p.add_argument("--accel-batch", type=int, default=1)
    p.add_argument("--accel-remat", default="save_dots")
    p.add_argument("--accel-vocab-chunk", type=int, default=16384)
    p.add_argument("--accel-docs", type=int, default=4, help="packed documents per row")
    p.add_argument("--accel-peak-n", type=int, default=8192, help="bf16 peak matmul size")
    p.add_argument(
        "--accel-override",
        default="",
        help="LlamaConfig overrides for the accel model, e.g. 'dim=256,n_heads=4' "
        "(a shrunken smoke run)",
    )
    p.add_argument(
        "--accel-on-cpu", action="store_true", help="run the accel section on CPU (smoke test)"
    )
    p.add_argument(
        "--decode-batches",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 8],
        help="batch sizes of the decode section",
    )
    p.add_argument("--decode-rounds", type=int, default=5, help="timed rounds (decode)")
    p.add_argument(
        "--accel-decode-batches",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 64],
        help="batch sizes of the accel_decode section (GPU/TPU: Llama-3-8B-shaped, bf16)",
    )
    p.add_argument(
        "--torch-threads", type=int, default=0, help="decode: torch threads (0 = torch's default)"
    )
    p.add_argument(
        "--decode-profile", action="store_true", help="decode: also time one step and its matmuls"
    )
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    sections = args.sections.split(",")

    res = {"machine": machine(), "argv": sys.argv[1:], "config": BENCH, "seq": SEQ, "batch": BATCH}
    log(json.dumps(res["machine"]))
    peak = None
    if "peak" in sections or "throughput" in sections:
        if jax.devices()[0].platform == "cpu":
            res["peak"] = matmul_peak()
            peak = res["peak"]["peak"]
            log("matmul peak (FLOP/s):", json.dumps(res["peak"]))
    if "throughput" in sections and jax.devices()[0].platform == "cpu":
        section_throughput(args, peak, res)
        t = res["throughput"]
        log(f"herd {t['herd']['tokens_per_s']:.0f} tok/s (MFU {t['herd']['mfu']:.1%})")
        if "hf_torch" in t:
            log(
                f"hf_torch {t['hf_torch']['tokens_per_s']:.0f} tok/s "
                f"(MFU {t['hf_torch']['mfu']:.1%}); ratio {t['ratio_median']:.2f} "
                f"(per-round median {t['ratio_per_round_median']:.2f}; CPU-seconds ratio "
                f"{t['ratio_cpu_seconds']:.2f})"
            )
        if "peak" in sections:  # measure the peak again: the load may have changed
            res["peak_after"] = matmul_peak()
            log("matmul peak after (FLOP/s):", json.dumps(res["peak_after"]))
    if "compile" in sections:
        section_compile(args, res)
    if "memory" in sections:
        section_memory(args, res)
    if "profile" in sections:
        section_profile(args, res)
    if "accel" in sections:
        section_accel(args, res)
    if "accel_decode" in sections:
        section_accel_decode(args, res)
    if "decode" in sections:
        section_decode(args, res)
    res["machine"]["uptime_end"] = machine()["uptime"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                res,
                f,
                indent=1,
                default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o),
            )
    return res


if __name__ == "__main__":
    main()
