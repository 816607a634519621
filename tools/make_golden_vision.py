"""Golden files for herd's timm parity tests: random-weight timm ViTs and their logits.

    /work/venv_timm/bin/python tools/make_golden_vision.py [make|verify|bench] [--cases ...]
        make:   write tests/golden/vision_<model>.npz for each case (default: all three)
        verify: rebuild each golden file's weights and images, load them into timm and check
                the stored logits come back bit for bit; then report how far typical
                converter mistakes move the logits (the test's power at its 1e-4 tolerance)
        bench:  median time of a timm deit3_small_patch16_224 training step (batch 16, 224,
                float32, torch AdamW), for the benchmark report only

Needs torch + torchvision + timm, which the main environment does not have; a separate venv:

    python -m venv /work/venv_timm
    /work/venv_timm/bin/pip install torch==2.14.1 torchvision==0.29.1 timm numpy safetensors

Cases (timm names, ``pretrained=False``): deit3_small_patch16_224, deit3_base_patch16_224
(DeiT III, Touvron et al. 2022: LayerScale, no pos-emb on the class token) and
vit_small_patch16_18x2_224 ("Three things everyone should know about ViTs", Touvron et al.
2022: 18 blocks of 2 parallel attention / MLP branches).

No weights are stored. Each file ``tests/golden/vision_<model>.npz`` holds (strings as 0-d
unicode arrays):

- ``model``: the timm model name;
- ``entries_json``: JSON list of ``[name, shape]`` of timm's ``state_dict()``, in order;
- ``seed``: the weights are ``tests.vision.timm_weights.seeded_state_dict(entries, seed)``;
- ``image_seed``, ``image_size``, ``num_images``: the input images are
  ``tests.vision.timm_weights.golden_images(image_seed, num_images, image_size)``,
  float32 NHWC (herd's layout; timm was fed their NCHW transpose);
- ``weights_sha256`` / ``images_sha256``: checksums of the rebuilt weights and images (a
  test should assert them first, so that a numpy whose random streams changed fails as such);
- ``logits``: float32 [num_images, num_classes], timm eval-mode forward in float32;
- ``pre_logits``: float32 [num_images, embed_dim], the pooled, normed features fed to the head;
- ``timm_config_json``: the timm model's configuration as read off the built model (depth,
  embed_dim, num_heads, mlp_hidden, qkv_bias, init_values, num_parallel, class_token,
  no_embed_class, num_reg_tokens, global_pool, fc_norm, norm_eps, act, ...), for checking a
  converter's inferred config;
- ``timm_version``, ``torch_version``, ``numpy_version``: what made the file (rerun this
  tool after upgrading timm and check the diff).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.vision.timm_weights import (  # noqa: E402
    array_sha256,
    golden_images,
    seeded_state_dict,
    state_dict_sha256,
)

GOLDEN_DIR = os.path.join(ROOT, "tests", "golden")
# timm model name -> weights seed (the image seed is the same number; golden_images draws
# from its own stream of it).
CASES = {
    "deit3_small_patch16_224": 0,
    "deit3_base_patch16_224": 1,
    "vit_small_patch16_18x2_224": 2,
}
NUM_IMAGES = 2
IMAGE_SIZE = 224


def golden_path(model_name: str) -> str:
    return os.path.join(GOLDEN_DIR, f"vision_{model_name}.npz")


def _torch_setup():
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return torch


def build_timm(model_name: str):
    """A fresh timm model with its own random init, float32, eval mode."""
    import timm

    model = timm.create_model(model_name, pretrained=False)
    return model.float().eval()


def state_dict_entries(model) -> list[list]:
    """``[name, shape]`` of every state-dict entry, in timm's order."""
    return [[name, list(t.shape)] for name, t in model.state_dict().items()]


def load_numpy_state_dict(model, state_dict: dict[str, np.ndarray]) -> None:
    import torch

    model.load_state_dict(
        {k: torch.from_numpy(v.copy()) for k, v in state_dict.items()}, strict=True
    )


def _branches(block):
    """(attention branches, mlp branches) of a timm block, each a (norm, core, layerscale)
    tuple: Block has one of each, ParallelThingsBlock one per parallel path."""
    if hasattr(block, "attns"):  # ParallelThingsBlock: Sequential(norm, attn, ls, drop_path)
        attns = [(b.norm, b.attn, b.ls) for b in block.attns]
        ffns = [(b.norm, b.mlp, b.ls) for b in block.ffns]
        return attns, ffns
    return [(block.norm1, block.attn, block.ls1)], [(block.norm2, block.mlp, block.ls2)]


def timm_config(model) -> dict:
    """The configuration facts a converter needs, read off a freshly built timm model (so
    LayerScale init values are still at their init)."""
    import torch.nn as nn

    blocks = list(model.blocks)
    attns, ffns = _branches(blocks[0])
    norm, attn, ls = attns[0]
    mlp_norm, mlp, _ = ffns[0]
    gamma = getattr(ls, "gamma", None)
    init_values = None
    if gamma is not None:
        values = gamma.detach().unique()
        if values.numel() != 1:
            raise ValueError(f"LayerScale of a fresh model is not constant: {values}")
        # the float32 value, written as its shortest decimal (1e-06, not 9.99999997e-07)
        init_values = float(str(np.float32(values.item())))
    act = mlp.act
    pe = model.patch_embed
    return {
        "block": type(blocks[0]).__name__,
        "depth": len(blocks),
        "num_parallel": len(attns),
        "embed_dim": int(model.embed_dim),
        "num_heads": int(attn.num_heads),
        "head_dim": int(attn.head_dim),
        "mlp_hidden": int(mlp.fc1.out_features),
        "mlp_ratio": mlp.fc1.out_features / model.embed_dim,
        "qkv_bias": attn.qkv.bias is not None,
        "qk_norm": not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity),
        "attn_scale": float(attn.scale),
        "init_values": init_values,
        "patch_size": list(pe.patch_size),
        "img_size": list(pe.img_size),
        "in_chans": int(pe.proj.in_channels),
        "patch_embed_bias": pe.proj.bias is not None,
        "patch_embed_norm": not isinstance(pe.norm, nn.Identity),
        "class_token": bool(model.has_class_token),
        "num_reg_tokens": int(getattr(model, "num_reg_tokens", 0)),
        "num_prefix_tokens": int(model.num_prefix_tokens),
        "no_embed_class": bool(model.no_embed_class),
        "pos_embed_shape": list(model.pos_embed.shape),
        "global_pool": model.global_pool,
        "norm_pre": not isinstance(model.norm_pre, nn.Identity),
        "fc_norm": not isinstance(model.fc_norm, nn.Identity),
        "final_norm": not isinstance(model.norm, nn.Identity),
        "norm_eps": float(model.norm.eps),
        "block_norm_eps": float(norm.eps),
        "mlp_norm_eps": float(mlp_norm.eps),
        "act": type(act).__name__,
        "act_approximate": getattr(act, "approximate", None),
        "num_classes": int(model.num_classes),
        "head_bias": model.head.bias is not None,
    }


def timm_forward(model, images_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, pre_logits) of an eval-mode timm model on NHWC float32 images."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        logits = model.forward_head(features)
        full = model(x)
    if not torch.equal(full, logits):
        raise AssertionError("forward_features + forward_head != forward")
    return logits.float().numpy(), pre_logits.float().numpy()


def make_case(model_name: str, seed: int) -> dict:
    import timm
    import torch

    model = build_timm(model_name)
    config = timm_config(model)
    entries = state_dict_entries(model)
    weights = seeded_state_dict(entries, seed)
    load_numpy_state_dict(model, weights)
    images = golden_images(seed, NUM_IMAGES, IMAGE_SIZE)
    logits, pre_logits = timm_forward(model, images)
    if not np.all(np.isfinite(logits)):
        raise AssertionError(f"{model_name}: non-finite logits")
    return {
        "model": np.array(model_name),
        "entries_json": np.array(json.dumps(entries)),
        "seed": np.array(seed, np.int64),
        "image_seed": np.array(seed, np.int64),
        "image_size": np.array(IMAGE_SIZE, np.int64),
        "num_images": np.array(NUM_IMAGES, np.int64),
        "weights_sha256": np.array(state_dict_sha256(weights)),
        "images_sha256": np.array(array_sha256(images)),
        "logits": logits.astype(np.float32),
        "pre_logits": pre_logits.astype(np.float32),
        "timm_config_json": np.array(json.dumps(config, sort_keys=True)),
        "timm_version": np.array(timm.__version__),
        "torch_version": np.array(torch.__version__),
        "numpy_version": np.array(np.__version__),
    }


def cmd_make(cases: list[str]) -> None:
    _torch_setup()
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    for name in cases:
        t0 = time.perf_counter()
        arrays = make_case(name, CASES[name])
        path = golden_path(name)
        np.savez_compressed(path, **arrays)
        logits = arrays["logits"]
        print(
            f"{os.path.relpath(path, ROOT)}: {os.path.getsize(path)} bytes, "
            f"{len(json.loads(str(arrays['entries_json'])))} entries, logits std "
            f"{logits.std():.3f}, argmax {logits.argmax(-1).tolist()}, "
            f"{time.perf_counter() - t0:.1f} s"
        )


def _mutations(config: dict):
    """Plausible converter mistakes, as (description, function(state_dict) -> state_dict or
    None to skip); applied to timm's weights they show how much each moves the logits."""

    def each_attn(sd, fn):
        out = dict(sd)
        for k in sd:
            if k.endswith("attn.qkv.weight") or k.endswith("attn.qkv.bias"):
                out[k] = fn(sd[k])
        return out

    dim = config["embed_dim"]
    heads = config["num_heads"]

    def swap_qk(w):
        q, k, v = w[:dim], w[dim : 2 * dim], w[2 * dim :]
        return np.concatenate([k, q, v], 0)

    def interleaved_heads(w):  # read qkv as [dim, 3] instead of [3, dim] along the rows
        return w.reshape(3, heads, -1, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)

    def rename(sd, a, b):
        out = dict(sd)
        for k in sd:
            if a in k:
                out[k], out[k.replace(a, b)] = sd[k.replace(a, b)], sd[k]
        return out

    def set_where(sd, pred, fn):
        return {k: (fn(v) if pred(k) else v) for k, v in sd.items()}

    yield "q and k swapped (all blocks)", lambda sd: each_attn(sd, swap_qk)
    yield "qkv rows read per head (interleaved)", lambda sd: each_attn(sd, interleaved_heads)
    if config["num_parallel"] == 1:
        yield "ls1 <-> ls2 swapped", lambda sd: rename(sd, ".ls1.gamma", ".ls2.gamma")
        yield "norm1 <-> norm2 swapped", lambda sd: rename(sd, ".norm1.", ".norm2.")
    else:
        yield (
            "attns.0.ls <-> attns.1.ls swapped",
            lambda sd: rename(sd, "attns.0.ls.gamma", "attns.1.ls.gamma"),
        )
        yield (
            "attns.0.ls <-> ffns.0.ls swapped",
            lambda sd: rename(sd, "attns.0.ls.gamma", "ffns.0.ls.gamma"),
        )
    yield (
        "LayerScale dropped (gamma = 1)",
        lambda sd: set_where(sd, lambda k: k.endswith(".gamma"), np.ones_like),
    )
    yield (
        "norm biases dropped",
        lambda sd: set_where(sd, lambda k: "norm" in k and k.endswith(".bias"), np.zeros_like),
    )
    yield (
        "final norm weight = 1",
        lambda sd: set_where(sd, lambda k: k == "norm.weight", np.ones_like),
    )
    yield (
        "pos_embed of one patch off (roll by 1)",
        lambda sd: set_where(sd, lambda k: k == "pos_embed", lambda v: np.roll(v, 1, axis=1)),
    )
    yield (
        "patch conv kernel transposed (h <-> w)",
        lambda sd: set_where(
            sd, lambda k: k == "patch_embed.proj.weight", lambda v: v.swapaxes(2, 3).copy()
        ),
    )
    yield "cls_token zero", lambda sd: set_where(sd, lambda k: k == "cls_token", np.zeros_like)


def _module_mutations():
    """Mistakes in the model rather than the weights: (description, fn(model))."""
    import torch.nn as nn

    def ln_eps(model):
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = 1e-5

    def gelu_tanh(model):
        for m in model.modules():
            if isinstance(m, nn.GELU):
                m.approximate = "tanh"

    yield "LayerNorm eps 1e-5 instead of 1e-6", ln_eps
    yield "GELU tanh approximation instead of exact", gelu_tanh


def cmd_verify(cases: list[str], sensitivity: bool = True) -> None:
    import timm
    import torch

    _torch_setup()
    failed = []
    for name in cases:
        g = np.load(golden_path(name))
        entries = json.loads(str(g["entries_json"]))
        weights = seeded_state_dict(entries, int(g["seed"]))
        images = golden_images(int(g["image_seed"]), int(g["num_images"]), int(g["image_size"]))
        checks = {
            "weights_sha256": state_dict_sha256(weights) == str(g["weights_sha256"]),
            "images_sha256": array_sha256(images) == str(g["images_sha256"]),
        }
        model = build_timm(name)
        config = timm_config(model)
        checks["timm_config"] = config == json.loads(str(g["timm_config_json"]))
        checks["entries"] = state_dict_entries(model) == entries
        load_numpy_state_dict(model, weights)
        logits, pre_logits = timm_forward(model, images)
        checks["logits exact"] = np.array_equal(logits, g["logits"])
        checks["pre_logits exact"] = np.array_equal(pre_logits, g["pre_logits"])
        diff = float(np.abs(logits - g["logits"]).max())
        print(
            f"{name}: made with timm {g['timm_version']} torch {g['torch_version']}, "
            f"checked with timm {timm.__version__} torch {torch.__version__}; "
            f"max |logits diff| {diff:.3g}; "
            + ", ".join(f"{k}: {'ok' if v else 'FAIL'}" for k, v in checks.items())
        )
        failed += [f"{name}: {k}" for k, v in checks.items() if not v]
        if not sensitivity:
            continue
        scale = float(np.abs(g["logits"]).max())
        print(f"  sensitivity (max |delta logits|, tolerance 1e-4; max |logit| {scale:.3f}):")
        for desc, fn in _mutations(config):
            m = build_timm(name)
            load_numpy_state_dict(m, fn(weights))
            delta = float(np.abs(timm_forward(m, images)[0] - logits).max())
            print(f"    {desc:45s} {delta:.3g}{'  (UNDETECTED)' if delta <= 1e-4 else ''}")
        for desc, fn in _module_mutations():
            m = build_timm(name)
            load_numpy_state_dict(m, weights)
            fn(m)
            delta = float(np.abs(timm_forward(m, images)[0] - logits).max())
            print(f"    {desc:45s} {delta:.3g}{'  (UNDETECTED)' if delta <= 1e-4 else ''}")
    if failed:
        raise SystemExit("verify FAILED: " + "; ".join(failed))
    print("verify: all golden files reproduced exactly")


def cmd_bench(steps: int = 10, warmup: int = 3, batch: int = 16) -> None:
    """Median wall time of one training step of timm deit3_small_patch16_224 (float32,
    torch AdamW, BCE-free plain cross-entropy; drop-path as timm's default, 0)."""
    import timm

    torch = _torch_setup()
    torch.manual_seed(0)
    model = timm.create_model("deit3_small_patch16_224", pretrained=False).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 1000, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()
    times, cpu_times = [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        loss.item()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    med = float(np.median(times))
    cpu = float(np.median(cpu_times))
    threads = torch.get_num_threads()
    # On a shared machine the wall time includes waiting for the CPU; the process CPU time
    # divided by the threads is what the step would take with the cores to itself.
    print(
        f"timm {timm.__version__} torch {torch.__version__}, threads {threads}, load "
        f"{os.getloadavg()[0]:.1f}: deit3_small_patch16_224 batch {batch} float32 AdamW step: "
        f"wall median {med:.3f} s (min {min(times):.3f}, max {max(times):.3f}) over {steps} "
        f"steps = {batch / med:.1f} images/s; process CPU median {cpu:.3f} s = "
        f"{cpu / threads:.3f} s per step on {threads} free cores"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="make", choices=["make", "verify", "bench"])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--no-sensitivity", action="store_true", help="verify: skip mutations")
    parser.add_argument("--steps", type=int, default=10, help="bench: timed steps")
    args = parser.parse_args(argv)
    if args.command == "make":
        cmd_make(args.cases)
    elif args.command == "verify":
        cmd_verify(args.cases, sensitivity=not args.no_sensitivity)
    else:
        cmd_bench(steps=args.steps)


if __name__ == "__main__":
    main()
