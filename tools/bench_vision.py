"""Vision training throughput: herd's ViT-S/16 against timm + torch, GEMMs timed on both.

Usage::

    flock /tmp/herd_bench.lock python tools/bench_vision.py          # ~10-15 min, 2 cores
    python tools/bench_vision.py --rounds 2 --block 2 --no-patchconvnet --optimizers adamw
    python tools/bench_vision.py --profile-only                      # where herd's step goes
    python tools/bench_vision.py --accel       # GPU/TPU: ViT-B/16, ViT-L/16 bf16 MFU, batch 256

What runs (CPU, float32, batch 16, 224 x 224):

* ``peak``: the float32 1024^3 square matmul, best of 15, in jnp (this process) and in
  torch (the worker); the larger is the MFU denominator. Measured before and after; the
  best of all counts.
* ``vit``: the DeiT III training step (forward, BCE on binarised mixup targets, backward,
  gradient clipping at 1.0, optimizer update) of ViT-S/16 with LayerScale (1e-4) and
  drop path 0.05 (the recipe's rate for S), on both sides:
  herd: ``herd.vision.train``'s own jitted step (``_build``: the trainer's model, loss,
  ``herd.core.step`` train step, donated state) on a 1-device mesh;
  peer: timm ``deit3_small_patch16_224(drop_path_rate=0.05)`` + ``timm.optim.
  create_optimizer_v2`` (torch AdamW / timm Lamb, weight decay 0.05 on matrices only)
  + ``nn.BCEWithLogitsLoss`` + ``clip_grad_norm_(1.0)``, in a worker process running
  ``/work/venv_timm/bin/python`` (the main environment has no timm). The worker stays up
  and is driven round by round over a pipe, so the contestants alternate in blocks of
  steps within one run (a pause before each block, untimed warm-up steps, the order
  swapped every round); figures are medians. ``--optimizers adamw,lamb`` adds the LAMB
  pair (herd's ``lamb`` vs timm's ``Lamb``, the DeiT III optimizer).
* ``gemm``: the model's own GEMMs at batch 16 x 197 tokens, forward and backward shapes
  (qkv [3152, 384] x [384, 1152], proj 384 -> 384, fc1 384 -> 1536, fc2 1536 -> 384; for
  each the forward, the input gradient and the weight gradient), in each framework's own
  layout (herd's kernels [in, out]: x @ W, dy @ W^T, x^T @ dy; torch's Linear weight
  [out, in]: x @ W^T, dy @ W, dy^T @ x, as autograd runs them), timed in every round
  next to the steps. GEMM seconds per step = 12 layers x the sum over the 12 shapes.
  Normalised target: herd's step <= timm's step x (jnp GEMM s / torch GEMM s), i.e.
  herd adds no more time than timm around the same GEMMs.
* ``patchconvnet``: herd's PatchConvNet-S60 step (the recipe: LAMB, BCE, drop path 0.1),
  herd only (timm has no PatchConvNet): images/s and MFU.

FLOPs: counted analytically from the model (every matmul and conv, 2 FLOPs per
multiply-add; training = 3 x forward), the MFU numerator for both contestants; XLA's
cost analysis of herd's forward (x 3, ``herd.vision.train.flops_per_image``, which also
counts element-wise ops) is printed beside it as a check.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMM_PYTHON = "/work/venv_timm/bin/python"
TIMM_MODEL = "deit3_small_patch16_224"

BATCH, SIZE, CLASSES = 16, 224, 1000
VIT_S = dict(dim=384, depth=12, heads=6, mlp=1536, patch=16)
TOKENS = 1 + (SIZE // VIT_S["patch"]) ** 2  # 197
DROP_PATH_VIT = 0.05  # DeiT III Table 1, ViT-S
DROP_PATH_PCN = 0.1  # configs/vision/patchconvnet_s60.py
# Both sides: DeiT III's optimiser settings (Table 1): wd 0.05, betas (0.9, 0.999), eps
# 1e-8, global clip 1.0. The lr does not change the work; a small one keeps the random-data
# run far from overflow on both sides.
LR, WD, CLIP = 1e-4, 0.05, 1.0


def log(*a):
    print(*a, file=sys.stderr if WORKER else sys.stdout, flush=True)


WORKER = False


def median(xs):
    return float(statistics.median(xs))


def host_batch(seed: int = 0, batch: int = BATCH, size: int = SIZE):
    """Random images (NHWC float32) and binarised mixup targets: two classes set to 1 per
    row, as DeiT III's BCE sees after mixing two images (the same arrays on both sides)."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, size, size, 3), dtype=np.float32)
    targets = np.zeros((batch, CLASSES), np.float32)
    for i in range(batch):
        targets[i, rng.choice(CLASSES, 2, replace=False)] = 1.0
    return images, targets


def gemm_shapes(batch: int = BATCH) -> list[dict]:
    """The qkv, proj, fc1 and fc2 GEMMs of one ViT-S block, forward and backward, as
    (name, M, K, N) of the 2-D products [M, K] x [K, N] autograd runs."""
    rows = batch * TOKENS
    d, f = VIT_S["dim"], VIT_S["mlp"]
    out = []
    for layer, (k_in, n_out) in {
        "qkv": (d, 3 * d),
        "proj": (d, d),
        "fc1": (d, f),
        "fc2": (f, d),
    }.items():
        out.append(dict(name=f"{layer} fwd", kind="fwd", m=rows, k=k_in, n=n_out))
        out.append(dict(name=f"{layer} dx", kind="dx", m=rows, k=n_out, n=k_in))
        out.append(dict(name=f"{layer} dw", kind="dw", m=k_in, k=rows, n=n_out))
    return out


def vit_flops_per_image() -> dict:
    """Analytic training FLOPs of one 224 x 224 image through ViT-S/16 (2 per multiply-add,
    backward = 2 x forward): patch embedding, qkv / proj / MLP, attention's two batched
    products, head. Element-wise ops (LN, GELU, softmax, optimizer) are not counted."""
    d, f, depth = VIT_S["dim"], VIT_S["mlp"], VIT_S["depth"]
    t, n = TOKENS, TOKENS - 1
    gemm = depth * 2 * t * (d * 3 * d + d * d + 2 * d * f)
    attn = depth * 2 * 2 * t * t * d
    embed = 2 * n * (VIT_S["patch"] ** 2 * 3) * d
    head = 2 * d * CLASSES
    fwd = gemm + attn + embed + head
    return {"forward": fwd, "train": 3 * fwd, "gemm_train": 3 * gemm}


def patchconvnet_flops_per_image(dim=384, depth=60, pool_mlp_ratio=3, se_ratio=0.25) -> dict:
    """Analytic training FLOPs of PatchConvNet at 224 (patchconvnet_models.py): the conv
    stem (4 x conv3x3 / 2: 3 -> D/8 -> D/4 -> D/2 -> D), `depth` trunk blocks (conv1x1 D->D,
    depthwise 3x3, squeeze-excite D -> D/4 -> D on the pooled vector, conv1x1 D->D) at 14 x
    14, the class-attention pooling block (1 query over 197 tokens) and the head."""
    widths = [3, dim // 8, dim // 4, dim // 2, dim]
    side, stem = SIZE, 0
    for cin, cout in zip(widths, widths[1:], strict=False):
        side //= 2
        stem += 2 * side * side * 9 * cin * cout
    hw = side * side
    se = round(dim * se_ratio)
    block = 2 * hw * (2 * dim * dim + 9 * dim) + 2 * 2 * dim * se
    t = hw + 1
    pool = 2 * (dim * dim + 2 * t * dim * dim + t * dim * 2 + dim * dim)  # q, k/v, attn, proj
    pool += 2 * 2 * dim * pool_mlp_ratio * dim
    fwd = stem + depth * block + pool + 2 * dim * CLASSES
    return {"forward": fwd, "train": 3 * fwd}


# =============================================================================== worker
# Runs inside the timm venv: no jax, no herd. One JSON request per stdin line, one JSON
# reply per stdout line; logs go to stderr.


class TimmWorker:
    def __init__(self):
        import torch

        self.torch = torch
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        self.steps = {}
        self.batch = None
        self.gemm_inputs = {}

    def info(self, req):
        import timm

        t = self.torch
        return {
            "torch": t.__version__,
            "timm": timm.__version__,
            "numpy": np.__version__,
            "threads": t.get_num_threads(),
            "mkldnn": bool(t.backends.mkldnn.is_available()),
            "config": t.__config__.parallel_info().splitlines()[:6],
        }

    def _data(self):
        if self.batch is None:
            images, targets = host_batch()
            t = self.torch
            x = t.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
            self.batch = (x, t.from_numpy(targets))
        return self.batch

    def init(self, req):
        import timm
        import timm.optim

        t = self.torch
        t.manual_seed(0)
        model = timm.create_model(TIMM_MODEL, pretrained=False, drop_path_rate=req["drop_path"])
        model = model.float().train()
        # timm's recipe optimiser: no weight decay on 1-D params and model.no_weight_decay()
        # (pos_embed, cls_token), like herd's DEIT3_NO_DECAY.
        opt = timm.optim.create_optimizer_v2(
            model, opt=req["opt"], lr=LR, weight_decay=WD, betas=(0.9, 0.999), eps=1e-8
        )
        loss_fn = t.nn.BCEWithLogitsLoss()
        params = [p for p in model.parameters() if p.requires_grad]
        x, y = self._data()

        def step():
            loss = loss_fn(model(x), y)
            loss.backward()
            t.nn.utils.clip_grad_norm_(params, CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        self.steps[req["key"]] = step
        n = sum(p.numel() for p in params)
        return {"params": n, "optimizer": type(opt).__name__}

    def steps_block(self, req):
        step = self.steps[req["key"]]
        walls, cpus, losses = [], [], []
        for i in range(req["warmup"] + req["n"]):
            t0, c0 = time.perf_counter(), time.process_time()
            losses.append(step())
            w, c = time.perf_counter() - t0, time.process_time() - c0
            if i >= req["warmup"]:
                walls.append(w)
                cpus.append(c)
        return {"wall": walls, "cpu": cpus, "loss": losses[-1]}

    def gemm(self, req):
        t = self.torch
        out = {}
        for s in req["shapes"]:
            key = (s["kind"], s["m"], s["k"], s["n"])
            if key not in self.gemm_inputs:
                g = t.Generator().manual_seed(0)
                m, k, n = s["m"], s["k"], s["n"]
                # torch Linear: weight W [out, in]. fwd x[M,K] @ W.T (W [N, K]);
                # dx = dy[M,K] @ W (W [K, N]); dW = dy.T @ x (dy [K, M], x [K, N]).
                if s["kind"] == "fwd":
                    a, b = t.randn(m, k, generator=g), t.randn(n, k, generator=g)
                    fn = lambda a=a, b=b: t.mm(a, b.t())  # noqa: E731
                elif s["kind"] == "dx":
                    a, b = t.randn(m, k, generator=g), t.randn(k, n, generator=g)
                    fn = lambda a=a, b=b: t.mm(a, b)  # noqa: E731
                else:
                    a, b = t.randn(k, m, generator=g), t.randn(k, n, generator=g)
                    fn = lambda a=a, b=b: t.mm(a.t(), b)  # noqa: E731
                fn()
                self.gemm_inputs[key] = fn
            fn = self.gemm_inputs[key]
            ts = []
            for _ in range(req["reps"]):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            out[s["name"]] = {"best": min(ts), "median": median(ts)}
        return out

    def profile(self, req):
        from torch.profiler import ProfilerActivity, profile

        step = self.steps[req["key"]]
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            step()
            wall = time.perf_counter() - t0
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        top = [[e.key, e.self_cpu_time_total / 1e6] for e in rows[: req["top"]]]
        return {"step_s": wall, "top_ops": top}

    def peak(self, req):
        t = self.torch
        n = req["n"]
        x = t.randn(n, n)
        t.mm(x, x)
        ts = []
        for _ in range(req["reps"]):
            t0 = time.perf_counter()
            t.mm(x, x)
            ts.append(time.perf_counter() - t0)
        return {"best": 2 * n**3 / min(ts), "median": 2 * n**3 / median(ts)}


def worker_main():
    global WORKER
    WORKER = True
    w = TimmWorker()
    handlers = {
        "info": w.info,
        "init": w.init,
        "steps": w.steps_block,
        "gemm": w.gemm,
        "peak": w.peak,
        "profile": w.profile,
    }
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "quit":
            break
        try:
            reply = {"ok": handlers[req["cmd"]](req)}
        except Exception as e:  # noqa: BLE001 - reported to the driver, which stops
            import traceback

            traceback.print_exc()
            reply = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class Peer:
    """The driver's handle on the timm worker process."""

    def __init__(self, python: str):
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
        self.proc = subprocess.Popen(
            [python, os.path.abspath(__file__), "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )

    def call(self, cmd: str, **kw):
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the timm worker died (exit {self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"timm worker, {cmd}: {reply['error']}")
        return reply["ok"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


# ================================================================================= herd


def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import jax

    return dict(
        cpu=cpu,
        cores=os.cpu_count(),
        jax=jax.__version__,
        load=os.getloadavg(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "-C", ROOT, "status", "--porcelain", "--", "herd", "tools/bench_vision.py"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return out.stdout.strip() + (" (+uncommitted herd/ or tool changes)" if dirty else "")
    except OSError:
        return "?"


def jnp_peak(n: int = 1024, reps: int = 15, dtype: str = "float32") -> dict:
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return {"best": 2 * n**3 / min(ts), "median": 2 * n**3 / median(ts)}


class JnpGemms:
    """The GEMM shapes jitted one by one, in herd's layout (Dense kernels are [in, out])."""

    def __init__(self, shapes):
        import jax
        import jax.numpy as jnp
        from jax import lax

        self.jax = jax
        self.fns = {}
        rng = np.random.default_rng(0)
        for s in shapes:
            m, k, n = s["m"], s["k"], s["n"]
            if s["kind"] == "fwd":  # x[M,K] @ W[K,N]
                a, b, dims = (m, k), (k, n), (((1,), (0,)), ((), ()))
            elif s["kind"] == "dx":  # dy[M,K] @ W^T, W [N, K] as stored ([in, out])
                a, b, dims = (m, k), (n, k), (((1,), (1,)), ((), ()))
            else:  # dW = x^T @ dy: x [K_rows, M], dy [K_rows, N]
                a, b, dims = (k, m), (k, n), (((0,), (0,)), ((), ()))
            xa = jnp.asarray(rng.standard_normal(a, dtype=np.float32))
            xb = jnp.asarray(rng.standard_normal(b, dtype=np.float32))
            fn = jax.jit(lambda x, y, d=dims: lax.dot_general(x, y, d))
            fn(xa, xb).block_until_ready()
            self.fns[s["name"]] = (fn, xa, xb)

    def __call__(self, reps: int) -> dict:
        out = {}
        for name, (fn, a, b) in self.fns.items():
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn(a, b).block_until_ready()
                ts.append(time.perf_counter() - t0)
            out[name] = {"best": min(ts), "median": median(ts)}
        return out


class HerdStep:
    """herd.vision.train's jitted train step (the trainer's own _build) on one device."""

    def __init__(
        self,
        name: str,
        optimizer: str,
        drop_path: float,
        batch: int = BATCH,
        size: int = SIZE,
        **model_overrides,
    ):
        import jax

        from herd.core import mesh as mesh_lib
        from herd.vision import train as vtrain

        cfg = _base_config()
        cfg.model.name = name
        cfg.model.image_size = size
        cfg.model.num_classes = CLASSES
        cfg.model.drop_path = drop_path
        for k, v in model_overrides.items():
            cfg.model[k] = v
        cfg.optim.optimizer = optimizer
        cfg.optim.lr = LR
        cfg.optim.weight_decay = WD
        cfg.optim.clip_norm = CLIP
        self.mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
        self.model_config = vtrain.build_model_config(cfg.model)
        optim = vtrain._optim_dict(cfg, False)
        loss_items = (("cosub", False), ("label_smoothing", 0.0), ("name", "bce"))
        self.built = vtrain._build(
            self.model_config, tuple(sorted(optim.items())), 10_000, 1000, self.mesh, 1, loss_items
        )
        self.state = self.built.init(jax.random.key_data(jax.random.key(0)))
        images, targets = host_batch(batch=batch, size=size)
        self.batch = mesh_lib.shard_batch({"image": images, "target": targets}, self.mesh)
        step = self.built.train_step_for(("image", "target"))
        t0 = time.perf_counter()
        lowered = step.lower(self.state, self.batch)
        self.lowered = lowered
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - t0
        self.params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state.params))
        self.trainer_flops_per_image = self.built.flops_per_image
        self.xla_flops_per_image = xla_flops_per_image(self.model_config)
        self.last_loss = float("nan")

    def __call__(self) -> float:
        self.state, metrics = self.compiled(self.state, self.batch)
        self.last_loss = float(metrics["loss"])  # blocks
        return self.last_loss

    def block(self, n: int, warmup: int) -> dict:
        walls, cpus = [], []
        for i in range(warmup + n):
            t0, c0 = time.perf_counter(), time.process_time()
            self()
            w, c = time.perf_counter() - t0, time.process_time() - c0
            if i >= warmup:
                walls.append(w)
                cpus.append(c)
        return {"wall": walls, "cpu": cpus, "loss": self.last_loss}


def xla_flops_per_image(model_config) -> float:
    """3 x XLA's cost analysis of one image's forward with every block unrolled: the
    check printed beside the trainer's flops_per_image (which extrapolates from 1- and
    2-block models)."""
    from herd.vision.train import forward_flops

    return 3.0 * forward_flops(model_config.replace(scan_blocks=False))


def vit_overrides(args) -> dict:
    return {"remat_policy": args.remat} if args.remat else {}


def _base_config():
    sys.path.insert(0, ROOT)
    from configs.vision.common import base_config

    return base_config()


# ============================================================================== sections


def section_accel(args, res):
    """GPU/TPU (issue 13): bf16 training MFU of each model in --accel-models (DeiT III
    step: LAMB, BCE, the recipe's drop path) at 224 and batch --accel-batch, one device.
    FLOPs are the trainer's own count (``flops_per_image``: every block, training = 3 x
    forward); the peak is a bf16 8192^3 matmul measured in the same run."""
    import jax

    from configs.vision.common import DEIT3_DROP_PATH

    dev = jax.devices()[0]
    n = args.accel_peak_n
    peak = jnp_peak(n, reps=10, dtype="bfloat16")["best"]
    out = res["accel"] = {"device": dev.device_kind, "bf16_peak": peak, "runs": []}
    log(f"accel: {dev.device_kind}, bf16 {n}^3 matmul peak {peak / 1e12:.1f} TFLOP/s")
    for name in args.accel_models.split(","):
        run = {"model": name, "batch": args.accel_batch, "size": args.accel_size}
        out["runs"].append(run)
        try:
            herd = HerdStep(
                name,
                "lamb",
                DEIT3_DROP_PATH.get(name, 0.1),
                batch=args.accel_batch,
                size=args.accel_size,
                dtype="bfloat16",
            )
            timing = herd.block(args.accel_steps, warmup=2)
        except Exception as e:  # one model failing (e.g. memory) must not hide the other
            run["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
            log(f"accel {name}: FAILED {run['error']}")
            continue
        step = median(timing["wall"])
        images_per_s = args.accel_batch / step
        run.update(
            params=herd.params,
            compile_s=herd.compile_s,
            step_s=step,
            images_per_s=images_per_s,
            flops_per_image=herd.trainer_flops_per_image,
            mfu=images_per_s * herd.trainer_flops_per_image / peak,
            loss=timing["loss"],
            peak_bytes_in_use=(dev.memory_stats() or {}).get("peak_bytes_in_use"),
        )
        herd = None
        log(f"accel {name}:", json.dumps(run))


def measure_peak(peer) -> dict:
    out = {"jnp": jnp_peak()}
    if peer is not None:
        out["torch"] = peer.call("peak", n=1024, reps=15)
    out["peak"] = max(v["best"] for v in out.values())
    return out


def gemm_seconds_per_step(times: dict, shapes, stat: str = "median") -> float:
    return VIT_S["depth"] * sum(times[s["name"]][stat] for s in shapes)


def section_vit(args, peer, res):
    shapes = gemm_shapes()
    gemm_flops = sum(2 * s["m"] * s["k"] * s["n"] for s in shapes) * VIT_S["depth"]
    herd = {}
    for opt in args.optimizers:
        t0 = time.perf_counter()
        herd[opt] = HerdStep("vit_s", opt, DROP_PATH_VIT, **vit_overrides(args))
        log(
            f"herd vit_s/{opt}: {herd[opt].params / 1e6:.2f}M params, lower+compile "
            f"{herd[opt].compile_s:.1f}s (build {time.perf_counter() - t0:.1f}s)"
        )
        if peer is not None:
            info = peer.call("init", key=opt, opt=opt, drop_path=DROP_PATH_VIT)
            log(f"timm {TIMM_MODEL}/{opt}: {info['params'] / 1e6:.2f}M params, {info}")
    jg = JnpGemms(shapes)
    steps = {f"{side}/{opt}": [] for opt in args.optimizers for side in ("herd", "timm")}
    cpu = {k: [] for k in steps}
    losses = {}
    gemm_t = {"jnp": [], "torch": []}
    for r in range(args.rounds):
        order = ["herd", "timm"] if r % 2 == 0 else ["timm", "herd"]
        if peer is None:
            order = ["herd"]
        # GEMM shapes, in the same order as the steps of this round
        for side in order:
            time.sleep(args.pause)
            if side == "herd":
                g = jg(args.gemm_reps)
                gemm_t["jnp"].append(g)
            else:
                g = peer.call("gemm", shapes=shapes, reps=args.gemm_reps)
                gemm_t["torch"].append(g)
            log(
                f"round {r} gemm {'jnp' if side == 'herd' else 'torch'}: "
                f"{gemm_seconds_per_step(g, shapes):.3f} s/step "
                f"({gemm_flops / gemm_seconds_per_step(g, shapes) / 1e9:.0f} GFLOP/s)"
            )
        for opt in args.optimizers:
            for side in order:
                time.sleep(args.pause)
                if side == "herd":
                    out = herd[opt].block(args.block, args.warmup)
                else:
                    out = peer.call("steps", key=opt, n=args.block, warmup=args.warmup)
                k = f"{side}/{opt}"
                steps[k] += out["wall"]
                cpu[k] += out["cpu"]
                losses[k] = out["loss"]
                log(
                    f"round {r} {k}: "
                    + ", ".join(
                        f"{w:.2f}s (cpu {c:.2f})"
                        for w, c in zip(out["wall"], out["cpu"], strict=True)
                    )
                    + f"; loss {out['loss']:.4f}; load {os.getloadavg()[0]:.1f}"
                )
    # per-shape medians over rounds (each round's own median of reps)
    gemm = {}
    for fw, rounds in gemm_t.items():
        if rounds:
            per = {s["name"]: median([g[s["name"]]["median"] for g in rounds]) for s in shapes}
            gemm[fw] = {
                "per_shape_s": per,
                "per_step_s": VIT_S["depth"] * sum(per.values()),
                "gflops": gemm_flops / (VIT_S["depth"] * sum(per.values())) / 1e9,
            }
    flops = vit_flops_per_image()
    out = {
        "flops_per_image": flops,
        "xla_flops_per_image": herd[args.optimizers[0]].xla_flops_per_image,
        "trainer_flops_per_image": herd[args.optimizers[0]].trainer_flops_per_image,
        "gemm_flops_per_step": gemm_flops,
        "gemm": gemm,
        "params": {opt: h.params for opt, h in herd.items()},
        "compile_s": {opt: h.compile_s for opt, h in herd.items()},
        "losses": losses,
    }
    for k, ts in steps.items():
        if ts:
            out[k] = {
                "step_s_median": median(ts),
                "step_s_min": min(ts),
                "cpu_s_median": median(cpu[k]),
                "images_per_s": BATCH / median(ts),
                "steps": ts,
                "cpu_steps": cpu[k],
            }
    for opt in args.optimizers:
        h, t = out.get(f"herd/{opt}"), out.get(f"timm/{opt}")
        if h and t:
            ratio = t["step_s_median"] / h["step_s_median"]
            pairs = [b / a for a, b in zip(steps[f"herd/{opt}"], steps[f"timm/{opt}"], strict=True)]
            row = {
                "ratio": ratio,
                "ratio_per_step_pair_median": median(pairs),
                "ratio_cpu_seconds": t["cpu_s_median"] / h["cpu_s_median"],
            }
            if "jnp" in gemm and "torch" in gemm:
                g = gemm["jnp"]["per_step_s"] / gemm["torch"]["per_step_s"]
                row["gemm_ratio_jnp_over_torch"] = g
                row["normalised_target_step_s"] = t["step_s_median"] * max(g, 1.0)
                row["normalised_ratio"] = t["step_s_median"] * max(g, 1.0) / h["step_s_median"]
                row["herd_outside_gemm_s"] = h["step_s_median"] - gemm["jnp"]["per_step_s"]
                row["timm_outside_gemm_s"] = t["step_s_median"] - gemm["torch"]["per_step_s"]
            out[f"compare/{opt}"] = row
    res["vit"] = out


def section_patchconvnet(args, res):
    t0 = time.perf_counter()
    h = HerdStep("patchconvnet_s60", "lamb", DROP_PATH_PCN, scan_blocks=args.pcn_scan)
    log(
        f"herd patchconvnet_s60/lamb (scan_blocks={args.pcn_scan}): {h.params / 1e6:.2f}M "
        f"params, lower+compile {h.compile_s:.1f}s"
    )
    walls, cpus = [], []
    for r in range(args.pcn_rounds):
        time.sleep(args.pause)
        out = h.block(args.block, args.warmup if r == 0 else 0)
        walls += out["wall"]
        cpus += out["cpu"]
        log(
            f"patchconvnet round {r}: "
            + ", ".join(
                f"{w:.2f}s (cpu {c:.2f})" for w, c in zip(out["wall"], out["cpu"], strict=True)
            )
            + f"; loss {out['loss']:.4f}"
        )
    flops = patchconvnet_flops_per_image()
    res["patchconvnet"] = {
        "params": h.params,
        "scan_blocks": args.pcn_scan,
        "compile_s": h.compile_s,
        "flops_per_image": flops,
        "xla_flops_per_image": h.xla_flops_per_image,
        "trainer_flops_per_image": h.trainer_flops_per_image,
        "step_s_median": median(walls),
        "step_s_min": min(walls),
        "cpu_s_median": median(cpus),
        "images_per_s": BATCH / median(walls),
        "steps": walls,
        "seconds": time.perf_counter() - t0,
    }


# (pattern on the thunk's op_name, pattern on its thunk name) -> what it is; first match wins
THUNK_KINDS = (
    (r"/(qkv|proj|fc1|fc2)/dot_general", "", "linear GEMMs (qkv, proj, fc1, fc2)"),
    (r"bqhd|bhqk", "", "attention products (scores, context)"),
    ("", r"ynn_fusion|^dot|convolution|custom-call", "other dots"),
    ("", r"broadcast", "broadcast (zero-fill of the scan's stacked buffers)"),
    ("", r"dynamic-update-slice", "scan: write a layer's slice into a stacked buffer"),
    ("", r"dynamic-slice", "scan: read a layer's slice of a stacked buffer"),
    ("", r"transpose|copy", "transposes and copies"),
    ("", r".", "element-wise and reduction fusions"),
)


def thunk_kind(name: str, op_name: str) -> str:
    for op_pat, name_pat, kind in THUNK_KINDS:
        if op_pat and re.search(op_pat, op_name):
            return kind
        if name_pat and re.search(name_pat, name):
            return kind
    return "other"


def profile_herd(args, res, peer=None):
    """Where herd's ViT-S step goes: jax.profiler traces `--profile-steps` steps; the time of
    each XLA:CPU thunk (one optimized-HLO instruction or fusion, as the executor's threads
    record it) is summed per step, by kind and for the largest thunks with the model code
    they come from (the HLO's op_name). With the peer, timm's step under torch.profiler too
    (self CPU time per aten op)."""
    import collections
    import tempfile

    import jax

    h = HerdStep("vit_s", args.optimizers[0], DROP_PATH_VIT, **vit_overrides(args))
    hlo = h.compiled.as_text()
    if args.hlo_out:
        with open(args.hlo_out, "w") as f:
            f.write(hlo)
    op_name = dict(re.findall(r'%([\w.\-]+) = [^\n]*?op_name="([^"]+)"', hlo))
    h()
    h()
    walls = []
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(args.profile_steps):
                t0 = time.perf_counter()
                h()
                walls.append(time.perf_counter() - t0)
        path = next(
            os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith(".xplane.pb")
        )
        data = jax.profiler.ProfileData.from_file(path)
        per_thunk = collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                if not line.name.startswith("tf_XLAEigen"):
                    continue
                for ev in line.events:
                    if "::" not in ev.name:  # skip the executor's own spans
                        per_thunk[ev.name] += ev.duration_ns / 1e9 / args.profile_steps
    kinds = collections.Counter()
    for name, sec in per_thunk.items():
        kinds[thunk_kind(name, op_name.get(name, ""))] += sec
    top = [
        {"thunk": n, "s_per_step": s, "op_name": op_name.get(n, "")}
        for n, s in per_thunk.most_common(args.profile_top)
    ]
    out = {
        "step_s": walls,
        "thunk_s_per_step": sum(per_thunk.values()),
        "by_kind_s_per_step": dict(kinds.most_common()),
        "top_thunks": top,
    }
    log(f"herd profile: steps {[round(w, 2) for w in walls]} s, thunks {sum(kinds.values()):.2f}")
    for k, sec in kinds.most_common():
        log(f"  {sec:7.3f} s/step  {k}")
    for t in top:
        log(f"  {t['s_per_step']:7.3f} s/step  {t['thunk']:45s} {t['op_name'][-90:]}")
    if peer is not None:
        peer.call("init", key=args.optimizers[0], opt=args.optimizers[0], drop_path=DROP_PATH_VIT)
        out["timm"] = peer.call("profile", key=args.optimizers[0], top=args.profile_top)
        log(f"timm profile: step {out['timm']['step_s']:.2f} s")
        for name, sec in out["timm"]["top_ops"]:
            log(f"  {sec:7.3f} s self CPU  {name}")
    res["profile"] = out


# ================================================================================== main


def summarize(res):
    peak = res["peak_best"]
    v = res.get("vit")
    if v:
        fl = v["flops_per_image"]["train"]
        log(
            f"ViT-S/16 training FLOPs per image: {fl / 1e9:.2f} G analytic, "
            f"{v['xla_flops_per_image'] / 1e9:.2f} G XLA cost analysis (x3 forward, unrolled; "
            f"the trainer's count: {v['trainer_flops_per_image'] / 1e9:.2f} G); "
            f"peak {peak / 1e9:.0f} GFLOP/s"
        )
        for k, s in v.items():
            if k.startswith(("herd/", "timm/")):
                s["mfu"] = s["images_per_s"] * fl / peak
                log(
                    f"  {k}: {s['step_s_median']:.3f} s/step (min {s['step_s_min']:.3f}, cpu "
                    f"{s['cpu_s_median']:.2f}) = {s['images_per_s']:.2f} img/s, MFU {s['mfu']:.1%}"
                )
        for fw, g in v["gemm"].items():
            log(f"  GEMMs {fw}: {g['per_step_s']:.3f} s/step, {g['gflops']:.0f} GFLOP/s")
        for k, c in v.items():
            if k.startswith("compare/"):
                log(f"  {k}: " + ", ".join(f"{a} {b:.3f}" for a, b in c.items()))
    p = res.get("patchconvnet")
    if p:
        p["mfu"] = p["images_per_s"] * p["flops_per_image"]["train"] / peak
        log(
            f"PatchConvNet-S60: {p['step_s_median']:.3f} s/step = {p['images_per_s']:.2f} img/s, "
            f"MFU {p['mfu']:.1%} (FLOPs/img {p['flops_per_image']['train'] / 1e9:.2f} G analytic,"
            f" {p['xla_flops_per_image'] / 1e9:.2f} G XLA unrolled, "
            f"{p['trainer_flops_per_image'] / 1e9:.2f} G the trainer's)"
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds")
    p.add_argument("--block", type=int, default=2, help="timed steps per contestant per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before each block")
    p.add_argument("--pause", type=float, default=1.0, help="idle seconds before each block")
    p.add_argument("--gemm-reps", type=int, default=5, help="timings of each GEMM per round")
    p.add_argument("--optimizers", default="adamw", help="comma list of adamw, lamb")
    p.add_argument("--no-peer", action="store_true", help="herd only (no timm worker)")
    p.add_argument(
        "--remat", default="", help="herd ViT remat_policy override (default: the model's own)"
    )
    p.add_argument("--no-patchconvnet", action="store_true")
    p.add_argument("--pcn-rounds", type=int, default=1, help="PatchConvNet blocks of steps")
    p.add_argument(
        "--pcn-scan",
        action="store_true",
        help="PatchConvNet with its blocks scanned (the model's default); off: unrolled, as "
        "XLA:CPU runs the input gradient of a depthwise conv inside a loop body ~100x slower",
    )
    p.add_argument("--profile", action="store_true", help="also profile herd's ViT step")
    p.add_argument("--profile-only", action="store_true")
    p.add_argument("--profile-steps", type=int, default=2, help="steps traced (profile)")
    p.add_argument("--profile-top", type=int, default=15, help="largest ops listed (profile)")
    p.add_argument("--hlo-out", default="", help="profile: write the step's optimized HLO here")
    p.add_argument(
        "--accel",
        action="store_true",
        help="GPU/TPU: bf16 training MFU of --accel-models at batch --accel-batch (herd only)",
    )
    p.add_argument("--accel-models", default="vit_b,vit_l")
    p.add_argument("--accel-batch", type=int, default=256)
    p.add_argument("--accel-size", type=int, default=SIZE)
    p.add_argument("--accel-steps", type=int, default=5)
    p.add_argument("--accel-peak-n", type=int, default=8192, help="bf16 peak matmul size")
    p.add_argument("--timm-python", default=TIMM_PYTHON)
    p.add_argument("--json", default=None, help="write all results here")
    args = p.parse_args(argv)
    if args.worker:
        return worker_main()
    args.optimizers = [o for o in args.optimizers.split(",") if o]
    bad = [o for o in args.optimizers if o not in ("adamw", "lamb")]
    if bad or not args.optimizers:
        raise ValueError(f"--optimizers {bad or args.optimizers}: valid are adamw, lamb")
    for name in ("rounds", "block", "gemm_reps", "pcn_rounds", "profile_steps", "profile_top"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    peer_wanted = not (args.no_peer or args.accel)
    if peer_wanted and not os.path.exists(args.timm_python):
        raise ValueError(
            f"--timm-python {args.timm_python} does not exist: create the timm venv "
            "(python -m venv /work/venv_timm && /work/venv_timm/bin/pip install torch==2.14.1 "
            "torchvision==0.29.1 timm==1.0.31 numpy safetensors) or pass --no-peer"
        )
    sys.path.insert(0, ROOT)
    t_start = time.perf_counter()
    res = {"machine": machine(), "commit": commit(), "argv": sys.argv[1:]}
    log(json.dumps(res["machine"]), res["commit"])
    peer = Peer(args.timm_python) if peer_wanted else None
    try:
        if peer is not None:
            res["peer_info"] = peer.call("info")
            log("peer:", json.dumps(res["peer_info"]))
        if args.accel:
            section_accel(args, res)
        elif args.profile_only:
            res["peak"] = measure_peak(None)
            res["peak_best"] = res["peak"]["peak"]
            profile_herd(args, res, peer)
        else:
            res["peak"] = measure_peak(peer)
            log("peak FLOP/s:", json.dumps(res["peak"]))
            section_vit(args, peer, res)
            if not args.no_patchconvnet:
                section_patchconvnet(args, res)
            res["peak_after"] = measure_peak(peer)
            log("peak after FLOP/s:", json.dumps(res["peak_after"]))
            res["peak_best"] = max(res["peak"]["peak"], res["peak_after"]["peak"])
            if args.profile:
                profile_herd(args, res, peer)
            summarize(res)
    finally:
        if peer is not None:
            peer.close()
    res["seconds"] = time.perf_counter() - t_start
    res["load_end"] = os.getloadavg()
    log(f"total {res['seconds']:.0f}s, load at end {res['load_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return res


if __name__ == "__main__":
    main()
