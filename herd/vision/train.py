"""Train (or fine-tune) a ViT or PatchConvNet classifier with the DeiT III recipe on a mesh.

Usage::

    python -m herd.vision.train                                 # the embedded default
    python -m herd.vision.train --config=configs/vision/deit3_vit_b.py --workdir=/ckpt/b \
        --config.data.source=tfds --config.data.path=imagenet2012
    python -m herd.vision.train --config=configs/vision/attn_only_finetune.py \
        --config.finetune.init_from=/ckpt/b --workdir=/ckpt/b_384_attn

With no arguments it trains a small ViT on scikit-learn's handwritten digits (upscaled,
a fixed held-out split) in a few CPU minutes, shows a progress bar with loss, images/s
and MFU, evaluates held-out top-1 / top-5, checkpoints to ``--workdir`` (default
``./workdir/vision``; rerunning resumes, data iterator included), prints the held-out
top-1 and writes ``attention_maps.png`` (the class token's attention over the patches in
the last block, for a few test images) into the workdir.

The recipe (DeiT III, Touvron et al. 2022, Table 1): LAMB or AdamW from herd.core.optim
with a per-epoch cosine and warmup from ``optim.start_lr``; BCE on binarised mixup /
cutmix targets or CE with label smoothing (herd.vision.losses); uniform stochastic depth
(``model.drop_path``, a per-step key folded from the run's seed); BatchNorm statistics of
the hMLP-BN stem travel in the train state's ``extra``.

- ``cosub=True`` (cosub, Touvron et al. 2022): each batch is duplicated, stochastic depth
  makes the two copies two submodels, and the loss is the four-term cosub loss.
- ``finetune.init_from``: start from another run's params (its workdir), at a new
  resolution (the position embedding is interpolated bicubically) and, with
  ``finetune.reinit_head``, a new head; a num_classes that differs from the checkpoint's
  head without it is refused.
- ``finetune.attention_only`` ("Three things", sec. 4): only the attention layers' qkv and
  proj weights, the head and the position embedding train; every other param is frozen
  by the core optimiser's mask (exact zero updates, no optimiser state).

Config errors (unknown variant, image size vs patch, loss names, cosub without stochastic
depth, batch vs data-parallel size, an empty data folder, a checkpoint of another model)
are one ``error:`` line and exit 2, before anything compiles.
"""

from __future__ import annotations

import functools
import math
import os
import time
import types
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from herd.core import mesh as mesh_lib
from herd.core import step as step_lib
from herd.core.checkpoint import Checkpointer, read_config, restore_params
from herd.core.config import run_entry
from herd.core.loop import TrainState, train_loop
from herd.core.metrics import MetricsWriter, ProgressBar, matmul_peak_flops
from herd.core.optim import DEIT3_NO_DECAY, make_optimizer
from herd.vision import data as data_lib
from herd.vision import losses as losses_lib
from herd.vision import models
from herd.vision.sharding import VISION_RULES

__all__ = [
    "ATTENTION_ONLY_TRAINABLE",
    "build_model_config",
    "validate_config",
    "make_loss_fn",
    "make_eval_loss_fn",
    "flops_per_image",
    "forward_flops",
    "run",
    "main",
]

# "Three things" sec. 4: fine-tune the attention layers (the qkv and output projections of
# every attention branch), the classifier head and the (interpolated) position embedding.
ATTENTION_ONLY_TRAINABLE = r"(^|/)attn_\d+/(qkv|proj)/|(^|/)(head|pos_embed)(/|$)"
# Params a new head replaces when fine-tuning with finetune.reinit_head.
HEAD = r"^head(/|$)"
SOURCES = ("digits", "folder", "tfds")


# ----------------------------------------------------------------------------- config


# Fields of a config's `model` group that are not ViTConfig / PatchConvNetConfig overrides.
_MODEL_FIXED = ("name", "image_size", "num_classes", "drop_path", "dtype", "param_dtype")


def build_model_config(model_cfg):
    """The model config (herd.vision.models) of a config's `model` group: the variant
    `name` with every field that is set (not None) as an override."""
    overrides = {
        k: v for k, v in dict(model_cfg).items() if k not in _MODEL_FIXED and v is not None
    }
    if overrides.get("layerscale_init") == 0.0:
        overrides["layerscale_init"] = None  # 0 = no LayerScale
    return models.model_config(
        model_cfg["name"],
        image_size=int(model_cfg["image_size"]),
        num_classes=int(model_cfg["num_classes"]),
        drop_path=float(model_cfg["drop_path"]),
        dtype=model_cfg["dtype"],
        param_dtype=model_cfg["param_dtype"],
        **overrides,
    )


def validate_config(cfg: ml_collections.ConfigDict, mesh) -> None:
    """Raises ValueError naming the bad value before anything is compiled."""
    if cfg.loss.name not in losses_lib.LOSSES:
        raise ValueError(
            f"unknown loss.name {cfg.loss.name!r}; valid: {', '.join(map(repr, losses_lib.LOSSES))}"
        )
    smoothing = float(cfg.loss.label_smoothing)
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"loss.label_smoothing must be in [0, 1), got {smoothing}")
    if cfg.loss.name == "bce" and smoothing:
        raise ValueError(
            f"loss.label_smoothing {smoothing} with loss.name 'bce': DeiT III binarises the "
            "targets (> 0 -> 1), which would make every smoothed class a positive; use "
            "loss.name='ce' or label_smoothing=0"
        )
    if cfg.cosub:
        if cfg.loss.name != "bce":
            raise ValueError(
                f"cosub's loss is a BCE (each submodel's sigmoid is the other's target); "
                f"loss.name is {cfg.loss.name!r}: set --config.loss.name=bce"
            )
        if float(cfg.model.drop_path) <= 0:
            raise ValueError(
                "cosub needs stochastic depth (model.drop_path > 0) to draw two different "
                f"submodels; model.drop_path is {cfg.model.drop_path}"
            )
    if cfg.data.source not in SOURCES:
        raise ValueError(
            f"unknown data.source {cfg.data.source!r}; valid: {', '.join(map(repr, SOURCES))}"
        )
    if cfg.data.source in ("folder", "tfds") and not cfg.data.path:
        what = "an ImageNet-style folder" if cfg.data.source == "folder" else "a tfds dataset name"
        raise ValueError(f"data.source {cfg.data.source!r} needs data.path ({what})")
    if cfg.train.steps is None and float(cfg.train.epochs) <= 0:
        raise ValueError(f"train.epochs must be > 0, got {cfg.train.epochs}")
    if cfg.train.steps is not None and int(cfg.train.steps) < 1:
        raise ValueError(f"train.steps must be >= 1, got {cfg.train.steps}")
    accum = int(cfg.train.grad_accum_steps)
    if accum < 1:
        raise ValueError(f"train.grad_accum_steps must be >= 1, got {accum}")
    mesh_lib.check_global_batch(int(cfg.data.global_batch_size), mesh, accum)
    try:
        mesh_lib.check_global_batch(int(cfg.data.eval_batch_size), mesh)
    except ValueError as e:
        raise ValueError(f"data.eval_batch_size: {e}") from None
    init_from = cfg.finetune.init_from
    if init_from and not os.path.isdir(init_from):
        raise ValueError(f"finetune.init_from {init_from!r} is not a directory")
    if cfg.finetune.attention_only and not str(cfg.model.name).startswith("vit"):
        raise ValueError(
            f"finetune.attention_only trains a ViT's attention layers; model.name is "
            f"{cfg.model.name!r}"
        )


def _checkpoint_dir(path: str) -> str:
    """A workdir's checkpoints/ directory, or `path` itself if it holds the steps."""
    sub = os.path.join(path, "checkpoints")
    return sub if os.path.isdir(sub) else path


# ----------------------------------------------------------------------- step functions


def _variables(params, extra):
    return {"params": params} if extra is None else {"params": params, "batch_stats": extra}


def _apply(model, params, extra, images, train: bool, rng=None):
    """logits, new batch statistics (or `extra` unchanged when there are none)."""
    kwargs = {"rngs": {"drop_path": jax.random.wrap_key_data(rng)}} if train else {}
    if train and extra is not None:
        logits, updates = model.apply(
            _variables(params, extra), images, train=True, mutable=["batch_stats"], **kwargs
        )
        return logits, updates["batch_stats"]
    return model.apply(_variables(params, extra), images, train=train, **kwargs), extra


def make_loss_fn(model, loss: str = "bce", label_smoothing: float = 0.0, cosub: bool = False):
    """The core step contract `(params, batch, rng, extra) -> (loss_sum, images, aux)`.

    batch: 'image' [B, H, W, 3] float32 and 'target' [B, C] (mixed soft targets, smoothed
    by the pipeline) or 'label' [B] int (smoothed here). With `cosub` the images go through
    the model twice in one batch of 2B (stochastic depth draws each row's own submodel) and
    the loss is the cosub loss.
    """

    def loss_fn(params, batch, rng, extra):
        images = batch["image"]
        targets = batch["target"] if "target" in batch else batch["label"]
        n = images.shape[0]
        if cosub:
            both = jnp.concatenate([images, images], axis=0)
            logits, extra = _apply(model, params, extra, both, True, rng)
            y = losses_lib.binarize_targets(losses_lib._as_targets(targets, logits.shape[-1]))
            per_image = losses_lib.cosub_loss(logits[:n], logits[n:], y)
        else:
            logits, extra = _apply(model, params, extra, images, True, rng)
            # Soft targets come from the pipeline already smoothed (and mixed).
            smoothing = label_smoothing if "target" not in batch else 0.0
            per_image = losses_lib.classification_loss(
                logits, targets, loss, label_smoothing=smoothing
            )
        aux = {} if extra is None else {"extra": extra}
        return jnp.sum(per_image), jnp.asarray(n, jnp.float32), aux

    return loss_fn


def make_eval_loss_fn(model):
    """Eval contract: (summed CE, images, {'top1', 'top5'} counts); rows with mask 0 (the
    padding of the last batch) count for nothing."""

    def loss_fn(params, batch, rng, extra):
        del rng
        logits, _ = _apply(model, params, extra, batch["image"], False)
        logits = logits.astype(jnp.float32)
        labels, mask = batch["label"], batch["mask"]
        ce = losses_lib.cross_entropy(logits, labels)
        k = min(5, logits.shape[-1])
        _, top = jax.lax.top_k(logits, k)
        hit_k = jnp.any(top == labels[:, None], axis=-1)
        hit_1 = top[:, 0] == labels
        aux = {"top1": jnp.sum(hit_1 * mask), "top5": jnp.sum(hit_k * mask)}
        return jnp.sum(ce * mask), jnp.sum(mask), aux

    return loss_fn


def flops_per_image(model_config) -> float:
    """Training FLOPs per image: 3 x the forward pass's (the backward pass costs about twice
    the forward), as XLA's cost analysis counts the forward of one image (every op, so a
    little more than the matmul / conv count: ViT-S/16 at 224 gives 28.4 G against the
    analytic 27.6 G). Returns 0 when the backend gives no count.

    XLA counts a while loop's body once, so the scanned trunk (nn.scan) would count one
    block of ``depth``. The count here is of unrolled copies of the model with 1 and 2
    blocks (abstract shapes, lowered, never compiled or run): every block has the same
    shapes, so forward(depth) = f(1) + (depth - 1) * (f(2) - f(1)), for ViT (parallel
    blocks and either stem included) and PatchConvNet alike, scanned or not, at the cost of
    two one-block lowerings whatever the depth. With cosub the caller counts both copies.
    """
    counts = [forward_flops(model_config.replace(depth=d, scan_blocks=False)) for d in (1, 2)]
    if not all(counts):
        return 0.0
    one, two = counts
    return 3.0 * (one + (model_config.depth - 1) * (two - one))


def forward_flops(model_config) -> float:
    """XLA's cost-analysis FLOPs of the model's forward on one image (0 if unavailable).
    A scanned trunk counts one block: XLA counts a while loop's body once."""
    model = models.make_model(model_config)
    variables = nn.meta.unbox(models.abstract_variables(model_config))
    size = model_config.image_size
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    try:
        lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images)
        cost = lowered.cost_analysis()
    except Exception:  # noqa: BLE001 - a missing cost model only loses the MFU column
        return 0.0
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


# ------------------------------------------------------------------------------ build


@functools.lru_cache(maxsize=8)
def _build(model_config, optim_items, total_steps, steps_per_epoch, mesh, accum, loss_items):
    """Model, optimiser and jitted init / train / eval functions for one set-up (cached, so
    repeated run() calls in one process reuse the compiled executables)."""
    loss_cfg = dict(loss_items)
    model = models.make_model(model_config)
    optimizer, schedule = make_optimizer(dict(optim_items), total_steps, steps_per_epoch)
    size = model_config.image_size

    def init_fn(rng):
        rng, init_rng = jax.random.split(rng)
        variables = model.init(
            {"params": init_rng, "drop_path": init_rng},
            jnp.zeros((1, size, size, 3), jnp.float32),
            train=False,
        )
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=rng,
            extra=variables.get("batch_stats"),
        )

    rng0 = jax.random.key_data(jax.random.key(0))
    abstract, shardings = mesh_lib.abstract_state(init_fn, rng0, mesh=mesh, rules=VISION_RULES)
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(VISION_RULES)):
        init = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)
        init_opt = jax.jit(optimizer.init, out_shardings=shardings.opt_state)
    batch_sh = {
        "image": mesh_lib.batch_sharding(mesh, 4),
        "label": mesh_lib.batch_sharding(mesh, 1),
        "target": mesh_lib.batch_sharding(mesh, 2),
    }
    loss_fn = make_loss_fn(model, loss_cfg["name"], loss_cfg["label_smoothing"], loss_cfg["cosub"])

    def train_step_for(keys):
        return step_lib.make_train_step(
            loss_fn,
            optimizer,
            mesh=mesh,
            state_shardings=shardings,
            batch_shardings={k: batch_sh[k] for k in keys},
            rules=VISION_RULES,
            grad_accum_steps=accum,
            weight_name="images",
        )

    eval_step = step_lib.make_eval_step(
        make_eval_loss_fn(model),
        mesh=mesh,
        param_shardings=shardings.params,
        batch_shardings={
            "image": batch_sh["image"],
            "label": batch_sh["label"],
            "mask": mesh_lib.batch_sharding(mesh, 1),
        },
        extra_shardings=shardings.extra,
        rules=VISION_RULES,
    )
    flops = flops_per_image(model_config)
    return types.SimpleNamespace(
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        abstract=abstract,
        shardings=shardings,
        init=init,
        init_opt=init_opt,
        train_step_for=functools.lru_cache(maxsize=2)(train_step_for),
        eval_step=eval_step,
        flops_per_image=flops,
    )


def _optim_dict(cfg, attention_only: bool) -> dict:
    o = cfg.optim
    d = dict(
        optimizer=o.optimizer,
        schedule="warmup_cosine",
        lr=float(o.lr),
        warmup_epochs=float(o.warmup_epochs),
        start_lr=float(o.start_lr),
        min_lr=float(o.min_lr),
        per_epoch=True,
        warmup_prefix=False,  # timm's CosineLRScheduler: the warmup replaces the first epochs
        weight_decay=float(o.weight_decay),
        clip_norm=float(o.clip_norm),
        no_decay=DEIT3_NO_DECAY,
        stacked=r"(^|/)blocks/",  # nn.scan stacks: rank rule and LAMB trust ratio per layer
    )
    if o.optimizer in ("adamw", "lamb"):
        d.update(b1=float(o.b1), b2=float(o.b2), eps=float(o.eps))
    if attention_only:
        d["trainable"] = ATTENTION_ONLY_TRAINABLE
    return d


# ------------------------------------------------------------------------------- data


def _source(cfg, split: str, image_size: int):
    if cfg.data.source == "digits":
        return data_lib.digits_source(split, image_size)
    if cfg.data.source == "folder":
        return data_lib.folder_source(os.path.join(cfg.data.path, split))
    return data_lib.tfds_source(cfg.data.path, split)


def _train_iterator(cfg, source, image_size: int):
    d = cfg.data
    return data_lib.make_pipeline(
        source,
        train=True,
        image_size=image_size,
        global_batch_size=int(d.global_batch_size),
        seed=int(d.seed),
        augment=d.augment,
        repeated_aug=int(d.repeated_aug),
        color_jitter=float(d.color_jitter),
        mixup_alpha=float(d.mixup_alpha),
        cutmix_alpha=float(d.cutmix_alpha),
        switch_prob=float(d.mixup_switch_prob),
        # applied to the (mixed) soft targets the pipeline makes; the loss then takes them
        # as they are
        label_smoothing=float(cfg.loss.label_smoothing),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        worker_count=int(d.worker_count),
    )


def _eval_batches(cfg, source, image_size: int) -> list[dict]:
    """This process's eval batches (the last one padded with mask 0), up to data.eval_images
    images in all (0 = the whole split), kept on the host."""
    d = cfg.data
    size = int(d.eval_batch_size)
    it = data_lib.make_pipeline(
        source,
        train=False,
        image_size=image_size,
        global_batch_size=size,
        seed=0,
        crop_ratio=float(d.crop_ratio),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    limit = int(d.eval_images)
    max_batches = -(-limit // size) if limit else None
    batches = []
    for batch in it:
        batches.append({k: np.asarray(batch[k]) for k in ("image", "label", "mask")})
        if max_batches and len(batches) >= max_batches:
            break
    if not batches:
        raise ValueError(f"the eval split {d.eval_split!r} of data.source {d.source!r} is empty")
    return batches


# ------------------------------------------------------------------------ fine-tuning


def _check_resume_model(ckpt_dir: str, model_config) -> None:
    """Refuses (naming the file) a resume whose checkpoint holds another model's params."""
    try:
        stored = read_config(ckpt_dir)
    except FileNotFoundError:
        return
    theirs = build_model_config(stored["model"])
    if _param_shapes(theirs) != _param_shapes(model_config):
        step = max(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
        raise ValueError(
            f"the checkpoint {os.path.join(ckpt_dir, str(step), 'config')} was trained with "
            f"another model ({stored['model']['name']}, {theirs.num_classes} classes, image "
            f"{theirs.image_size}) than the config asks for; use another --workdir, or "
            "finetune.init_from to start from it"
        )


@functools.lru_cache(maxsize=16)
def _param_shapes(model_config) -> dict:
    model = models.make_model(model_config)
    size = model_config.image_size
    shapes = jax.eval_shape(
        lambda: model.init(
            {"params": jax.random.key(0), "drop_path": jax.random.key(0)},
            jnp.zeros((1, size, size, 3)),
            train=False,
        )
    )
    return {
        jax.tree_util.keystr(p): tuple(x.shape)
        for p, x in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(shapes))
    }


def _check_pretrained(cfg, model_config):
    """(checkpoint dir, its model config) of finetune.init_from after checking that it fits
    this run's model: same architecture, the head's classes unless reinit_head."""
    ckpt_dir = _checkpoint_dir(cfg.finetune.init_from)
    try:
        stored = read_config(ckpt_dir)
    except FileNotFoundError as e:
        raise ValueError(
            f"finetune.init_from {cfg.finetune.init_from!r} holds no herd.vision.train "
            f"checkpoint with its config ({e})"
        ) from None
    src_config = build_model_config(stored["model"])
    src_shapes, new_shapes = _param_shapes(src_config), _param_shapes(model_config)
    is_head = lambda key: key.startswith("['params']['head']")  # noqa: E731
    head_src = {k: v for k, v in src_shapes.items() if is_head(k)}
    head_new = {k: v for k, v in new_shapes.items() if is_head(k)}
    if head_src != head_new and not cfg.finetune.reinit_head:
        raise ValueError(
            f"model.num_classes {model_config.num_classes} disagrees with the head of the "
            f"checkpoint in {ckpt_dir} ({src_config.num_classes} classes): set "
            "--config.finetune.reinit_head=true to re-initialise the head"
        )
    # Everything else must be the same architecture (the pos-emb row count follows the
    # image size and is interpolated).
    other = sorted(
        k
        for k in set(src_shapes) | set(new_shapes)
        if not is_head(k) and "pos_embed" not in k and src_shapes.get(k) != new_shapes.get(k)
    )
    if other:
        raise ValueError(
            f"the checkpoint in {ckpt_dir} holds another architecture than model "
            f"{cfg.model.name!r}: {', '.join(other[:4])} differ; fine-tuning changes only "
            "image_size, num_classes (with reinit_head) and drop_path"
        )
    return ckpt_dir, src_config, stored["model"]["name"]


def _pretrained(cfg, model_config, mesh, say):
    """(params, batch_stats) of finetune.init_from, fitted to this run's model: position
    embedding interpolated to the new image size, head kept or re-initialised."""
    from herd.vision.vit import interpolate_pos_emb

    ckpt_dir, src_config, src_name = _check_pretrained(cfg, model_config)
    say(
        f"fine-tuning from {ckpt_dir} ({src_name} at {src_config.image_size} px, "
        f"{src_config.num_classes} classes)"
    )
    src_built_abstract = _abstract_for(src_config, mesh)
    params = restore_params(ckpt_dir, src_built_abstract.params)
    extra = None
    if src_built_abstract.extra is not None:
        extra = restore_params(ckpt_dir, src_built_abstract.extra, item="extra")
    if src_config.image_size != model_config.image_size:
        params = interpolate_pos_emb(params, src_config, model_config.image_size)
        say(
            f"position embedding interpolated {src_config.image_size} -> "
            f"{model_config.image_size} px"
        )
    return params, extra


@functools.lru_cache(maxsize=4)
def _abstract_for(model_config, mesh):
    """Abstract params / batch stats (with shardings) of `model_config` on `mesh`."""
    model = models.make_model(model_config)
    size = model_config.image_size

    def init(rng):
        images = jnp.zeros((1, size, size, 3))
        v = model.init({"params": rng, "drop_path": rng}, images, train=False)
        return {"params": v["params"], "extra": v.get("batch_stats")}

    boxed = jax.eval_shape(lambda: init(jax.random.key(0)))
    shardings = mesh_lib.logical_to_sharding(boxed, mesh, VISION_RULES)
    unboxed = nn.meta.unbox(boxed)
    tree = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unboxed, shardings
    )
    return types.SimpleNamespace(params=tree["params"], extra=tree["extra"])


def _merge_pretrained(state, params, extra, built, reinit_head: bool):
    """The fresh state with the pre-trained params (head: the fresh one if re-initialised)
    and batch statistics, placed on the state's shardings; optimiser state rebuilt."""

    def pick(path, fresh, loaded):
        if reinit_head and jax.tree_util.keystr(path).startswith("['head']"):
            return fresh
        return loaded

    merged = jax.tree_util.tree_map_with_path(pick, state.params, params)
    merged = jax.device_put(merged, built.shardings.params)
    new_extra = state.extra
    if extra is not None and state.extra is not None:
        new_extra = jax.device_put(extra, built.shardings.extra)
    return state.replace(params=merged, opt_state=built.init_opt(merged), extra=new_extra)


# ----------------------------------------------------------------------- attention PNG


def attention_map_png(model, params, extra, images, path: str, labels=None) -> str:
    """Writes the class token's attention over the patches (last block, mean over heads;
    PatchConvNet: its attention-based pooling) next to each image. Returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the vision axis rules in context: the models' logical constraints need them
    with nn.logical_axis_rules(list(VISION_RULES)):
        logits, attn = model.apply(
            _variables(params, extra), jnp.asarray(images), train=False, return_attention=True
        )
    a = np.asarray(attn, np.float32)
    if a.ndim == 5:  # [blocks, B, heads, T, T]: the last block's class-token row
        a = a[-1, :, :, 0, :]
    elif a.ndim == 4:  # [B, heads, queries, T]
        a = a[:, :, 0, :]
    a = a.mean(axis=1)[:, 1:]  # over heads; drop the class token's attention to itself
    grid = math.isqrt(a.shape[-1])
    a = a[:, : grid * grid].reshape(-1, grid, grid)
    preds = np.argmax(np.asarray(logits), -1)
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.4), squeeze=False)
    for i in range(n):
        img = np.asarray(images[i], np.float32)
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
        axes[0, i].imshow(img)
        title = f"pred {preds[i]}" + (f" / true {labels[i]}" if labels is not None else "")
        axes[0, i].set_title(title, fontsize=9)
        axes[1, i].imshow(img.mean(-1), cmap="gray")
        axes[1, i].imshow(
            a[i],
            cmap="inferno",
            alpha=0.6,
            extent=(-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5),  # imshow's pixels
            interpolation="bilinear",
        )
        axes[0, i].axis("off")
        axes[1, i].axis("off")
    axes[1, 0].set_title("class-token attention", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------- run


def run(
    cfg: ml_collections.ConfigDict,
    workdir: str,
    *,
    progress: bool | None = None,
    devices: Sequence | None = None,
) -> dict:
    """Trains as `cfg` says in `workdir` (resuming if it holds checkpoints); returns a summary.

    summary: {'top1', 'top5', 'eval_loss' (final held-out), 'eval': {step: {...}},
              'loss': {step: train loss}, 'final_step', 'steps_per_epoch',
              'images_per_second', 'mfu', 'seconds', 'attention_png', 'state', 'workdir'}
    `devices`: the devices of the mesh (default all).
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
    model_config = build_model_config(cfg.model)  # unknown variant, image size vs patch
    mesh = mesh_lib.make_mesh(dict(cfg.mesh), devices)
    validate_config(cfg, mesh)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    resuming = os.path.isdir(ckpt_dir) and any(s.isdigit() for s in os.listdir(ckpt_dir))
    if resuming:
        _check_resume_model(ckpt_dir, model_config)
    elif cfg.finetune.init_from:
        _check_pretrained(cfg, model_config)
    size = model_config.image_size
    train_source = _source(cfg, cfg.data.train_split, size)
    eval_source = _source(cfg, cfg.data.eval_split, size)
    n_classes = getattr(train_source, "num_classes", None)
    if n_classes and n_classes != model_config.num_classes:
        raise ValueError(
            f"model.num_classes is {model_config.num_classes} but data.source "
            f"{cfg.data.source!r} has {n_classes} classes"
        )
    n_train = len(train_source)
    batch = int(cfg.data.global_batch_size)
    train_iter = _train_iterator(cfg, train_source, size)
    steps_per_epoch = int(train_iter.plan.steps)
    if cfg.train.steps is not None:
        total_steps = int(cfg.train.steps)
    else:
        total_steps = max(1, int(round(float(cfg.train.epochs) * steps_per_epoch)))
    say(f"workdir: {workdir}")
    say(f"mesh: {dict(mesh.shape)} on {mesh.devices.size} {jax.devices()[0].platform} devices")
    say(
        f"data: {cfg.data.source} {n_train} train images, {steps_per_epoch} steps per epoch, "
        f"{total_steps} steps ({total_steps / steps_per_epoch:.1f} epochs)"
    )

    attention_only = bool(cfg.finetune.attention_only)
    optim = _optim_dict(cfg, attention_only)
    loss_items = (
        ("cosub", bool(cfg.cosub)),
        ("label_smoothing", float(cfg.loss.label_smoothing)),
        ("name", cfg.loss.name),
    )
    built = _build(
        model_config,
        tuple(sorted(optim.items())),
        total_steps,
        steps_per_epoch,
        mesh,
        int(cfg.train.grad_accum_steps),
        loss_items,
    )
    model = built.model
    pretrained = None
    if cfg.finetune.init_from and not resuming:
        pretrained = _pretrained(cfg, model_config, mesh, say)

    eval_batches = _eval_batches(cfg, eval_source, size)
    n_eval = int(sum(b["mask"].sum() for b in eval_batches))

    ckpt = Checkpointer(
        ckpt_dir,
        keep=int(cfg.train.keep_checkpoints),
        async_save=bool(cfg.train.get("async_checkpoints", True)),
        config=cfg,
    )
    state, start = step_lib.init_or_restore(
        ckpt,
        built.init,
        built.abstract,
        jax.random.key_data(jax.random.key(int(cfg.train.seed))),
        train_iter,
        say,
    )
    if pretrained is not None and start is None:
        state = _merge_pretrained(state, *pretrained, built, bool(cfg.finetune.reinit_head))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(built.abstract.params))
    trainable = n_params
    if attention_only:
        from herd.core.optim import frozen_mask

        frozen = frozen_mask(built.abstract.params, None, ATTENTION_ONLY_TRAINABLE)
        trainable = sum(
            int(np.prod(x.shape))
            for x, f in zip(
                jax.tree.leaves(built.abstract.params), jax.tree.leaves(frozen), strict=True
            )
            if not f
        )
    say(
        f"model: {cfg.model.name} {n_params / 1e6:.2f}M params"
        + (f" ({trainable / 1e6:.2f}M trainable: attention-only)" if attention_only else "")
        + f", image {size}, {model_config.num_classes} classes; "
        f"{'cosub, ' if cfg.cosub else ''}loss {cfg.loss.name}, {cfg.optim.optimizer} "
        f"lr {cfg.optim.lr:g}"
    )

    def eval_fn(st):
        loss_sum = count = top1 = top5 = 0.0
        for b in eval_batches:
            s, n, aux = built.eval_step(st.params, mesh_lib.shard_batch(b, mesh), st.extra)
            loss_sum += float(s)
            count += float(n)
            top1 += float(aux["top1"])
            top5 += float(aux["top5"])
        count = max(count, 1.0)
        return {"eval_loss": loss_sum / count, "top1": top1 / count, "top5": top5 / count}

    images_per_step = batch
    flops_per_step = built.flops_per_image * batch * (2 if cfg.cosub else 1)
    peak = matmul_peak_flops(cfg.model.dtype)
    writer = MetricsWriter(workdir, tensorboard=bool(cfg.train.get("tensorboard", True)))
    writer.write(
        int(jax.device_get(state.step)),
        {
            "n_params": n_params,
            "trainable_params": trainable,
            "peak_flops": peak,
            "flops_per_image": built.flops_per_image,
            "eval_images": n_eval,
        },
    )
    bar = ProgressBar(
        total_steps, initial=int(jax.device_get(state.step)), unit="img", enabled=show
    )
    bar_holder.append(bar)

    def every(epochs: float) -> int:
        return max(1, int(round(float(epochs) * steps_per_epoch))) if epochs else 0

    stop_after = int(cfg.train.get("stop_after") or 0)
    num_steps = min(total_steps, stop_after) if stop_after else total_steps
    batch_keys: list[tuple] = []

    def put_batch(host_batch):
        keys = ("image", "target") if "target" in host_batch else ("image", "label")
        if not batch_keys:
            batch_keys.append(keys)
        return mesh_lib.shard_batch({k: host_batch[k] for k in keys}, mesh)

    def train_step(st, b):
        return built.train_step_for(tuple(sorted(b)))(st, b)

    history = {"loss": {}, "eval": {}}
    try:
        state, history = train_loop(
            state,
            train_step,
            train_iter,
            num_steps=num_steps,
            put_batch=put_batch,
            eval_fn=eval_fn,
            eval_every=every(cfg.train.eval_every_epochs),
            checkpointer=ckpt,
            checkpoint_every=every(cfg.train.checkpoint_every_epochs),
            writer=writer,
            progress=bar,
            log_every=int(cfg.train.log_every),
            units_per_step=images_per_step,
            unit="images",
            flops_per_step=flops_per_step or None,
            peak_flops=peak,
            eval_at_start=bool(cfg.train.get("eval_at_start", False)) and start is None,
        )
    finally:
        bar.close()
        bar_holder.clear()
        ckpt.close()
        writer.close()

    final_step = int(jax.device_get(state.step))
    if not history["eval"] and not history.get("preempted"):
        history["eval"][final_step] = eval_fn(state)
    rows = [r for r in MetricsWriter.read(writer.path) if "images_per_second" in r]
    rows = [r for r in rows if r["step"] > (start or 0) + int(cfg.train.log_every)] or rows
    summary = {
        "workdir": workdir,
        "eval": history["eval"],
        "loss": history["loss"],
        "final_step": final_step,
        "steps_per_epoch": steps_per_epoch,
        "preempted": history.get("preempted", False),
        "images_per_second": float(np.median([r["images_per_second"] for r in rows]))
        if rows
        else None,
        "mfu": float(np.median([r["mfu"] for r in rows])) if rows and "mfu" in rows[0] else None,
        "n_params": n_params,
        "trainable_params": trainable,
        "state": state,
    }
    if history["eval"]:
        last = history["eval"][max(history["eval"])]
        summary.update(top1=last["top1"], top5=last["top5"], eval_loss=last["eval_loss"])
        say(
            f"held-out top-1 {100 * last['top1']:.2f}%, top-5 {100 * last['top5']:.2f}% "
            f"on {n_eval} images (step {max(history['eval'])})"
        )
    n_maps = int(cfg.train.get("attention_maps") or 0)
    summary["attention_png"] = None
    if n_maps and not summary["preempted"] and jax.process_index() == 0:
        first = eval_batches[0]
        k = min(n_maps, int(first["mask"].sum()))
        host = jax.device_get((state.params, state.extra))
        path = attention_map_png(
            model,
            host[0],
            host[1],
            first["image"][:k],
            os.path.join(workdir, "attention_maps.png"),
            labels=first["label"][:k],
        )
        summary["attention_png"] = path
        say(f"attention maps: {path}")
    summary["seconds"] = time.perf_counter() - t_run
    say(f"done in {summary['seconds']:.0f}s; workdir {workdir}")
    return summary


DEFAULT_CONFIG = "vision/default.py"
DEFAULT_WORKDIR = os.path.join(".", "workdir", "vision")


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m herd.vision.train [--config=path.py[:arg]] [--config.k=v] [--workdir=DIR]`."""
    run_entry(run, DEFAULT_CONFIG, DEFAULT_WORKDIR, "Checkpoints, metrics and plots go here.", argv)


if __name__ == "__main__":
    main()
