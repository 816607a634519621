"""Metrics: JSONL + TensorBoard writers, a console progress bar, throughput and MFU.

MFU = model FLOPs per second / peak FLOPs per second. The peak is *measured* (a square
matmul in the compute dtype, once per run; the best value seen on the machine is cached)
rather than looked up, so the figure means the same on a laptop, a GPU or a TPU and never
exceeds 100% because of a wrong table entry. The model FLOPs are the caller's (for the
Llama models see `herd.lm.train.flops_per_token`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MetricsWriter",
    "ProgressBar",
    "mfu",
    "matmul_peak_flops",
    "cache_dir",
]


def cache_dir() -> str:
    """herd's cache directory ($HERD_CACHE, else ~/.cache/herd)."""
    path = os.environ.get("HERD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "herd")
    os.makedirs(path, exist_ok=True)
    return path


def _scalar(v: Any) -> Any:
    if isinstance(v, (jax.Array, np.ndarray, np.generic)):
        v = np.asarray(v)
        return v.item() if v.size == 1 else v.tolist()
    return v


class MetricsWriter:
    """Appends `{"step": s, **metrics}` lines to workdir/metrics.jsonl and to TensorBoard.

    Only process 0 writes. TensorBoard uses tensorboardX (no TensorFlow); pass
    tensorboard=False to skip it.
    """

    def __init__(self, workdir: str, tensorboard: bool = True, filename: str = "metrics.jsonl"):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, filename)
        self._file = None
        self._tb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:  # optional: the JSONL file is the record
                self._tb = None

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.active:
            return
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    @staticmethod
    def read(path: str) -> list[dict]:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]


class ProgressBar:
    """tqdm bar over training steps showing loss, throughput and MFU (process 0 only)."""

    def __init__(self, total: int, initial: int = 0, unit: str = "tok", enabled: bool = True):
        self.unit = unit
        self._bar = None
        if enabled and jax.process_index() == 0:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, **values: Any) -> None:
        if self._bar is None:
            return
        self._bar.n = step
        post = {}
        for k, v in values.items():
            if v is None:
                continue
            if k == "mfu":
                post[k] = f"{100 * v:.1f}%"
            elif k.endswith("_s"):
                post[k.replace("_s", "/s")] = f"{v:,.0f}"
            else:
                post[k] = f"{v:.4g}" if isinstance(v, float) else v
        self._bar.set_postfix(post, refresh=False)
        self._bar.refresh()

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        elif jax.process_index() == 0:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def mfu(flops_per_step: float, seconds_per_step: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak FLOP/s."""
    if seconds_per_step <= 0 or peak_flops <= 0:
        return float("nan")
    return flops_per_step / seconds_per_step / peak_flops


_PEAK_MEMO: dict[tuple, float] = {}


def matmul_peak_flops(
    dtype: str = "float32", n: int | None = None, use_cache: bool = True
) -> float:
    """Peak FLOP/s of a square matmul summed over the devices that compute in parallel.

    Measured once per process (about a second) for each (platform, device kind, device
    count, dtype, size). With `use_cache`, the best figure ever measured on this machine is
    kept in cache_dir()/matmul_peak.json and returned: a measurement taken while other
    jobs load the machine is lower than the real peak and would inflate MFU, so the
    maximum is the honest denominator. On CPU the (fake) devices share the same cores, so
    the peak is one device's; on accelerators it is per device times the device count.
    """
    dev = jax.devices()[0]
    platform = dev.platform
    n_dev = 1 if platform == "cpu" else jax.device_count()
    n = n or (1024 if platform == "cpu" else 8192)
    key = (platform, getattr(dev, "device_kind", "?"), n_dev, str(dtype), n)
    if key in _PEAK_MEMO:
        return _PEAK_MEMO[key]

    a = jax.device_put(jnp.ones((n, n), dtype), dev)
    b = jax.device_put(jnp.ones((n, n), dtype) * 0.5, dev)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    deadline = time.perf_counter() + 1.0
    reps = 0
    while reps < 3 or (time.perf_counter() < deadline and reps < 50):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    peak = 2.0 * n**3 / best * n_dev

    if use_cache:
        cache_file = os.path.join(cache_dir(), "matmul_peak.json")
        skey = "|".join(map(str, key))
        cached = {}
        if os.path.exists(cache_file):
            try:
                with open(cache_file) as fh:
                    cached = json.load(fh)
            except (OSError, ValueError):
                cached = {}
        peak = max(peak, float(cached.get(skey, 0.0)))
        cached[skey] = peak
        try:
            with open(cache_file, "w") as fh:
                json.dump(cached, fh, indent=1)
        except OSError:
            pass
    _PEAK_MEMO[key] = peak
    return peak
