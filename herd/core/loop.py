"""The one train loop: step, log, evaluate, checkpoint; SIGTERM and NaN handling.

    state, history = train_loop(state, train_step, train_iter, num_steps=1000,
                                put_batch=lambda b: shard_batch(b, mesh), ...)

`train_step(state, batch) -> (state, metrics)` is already jitted (and donates `state`);
`metrics['loss']` is a scalar. `state.step` counts completed steps, so a restored state
continues where it stopped and the data iterator (restored alongside) yields the next
batch it would have yielded.

The loop never blocks on the device per step: losses stay on the device until a log
point, an eval or a checkpoint, where all pending losses are checked. A non-finite loss
raises NonFiniteLossError naming the first bad step; since a checkpoint is only written
after every loss before it was checked, the last checkpoint on disk is a good one.
SIGTERM (preemption) makes the loop save a checkpoint at the next step boundary and
return with history['preempted'] = True. With several processes (jax.distributed), the
signal may reach only some hosts: JAX's preemption sync service (which orbax's
CheckpointManager.reached_preemption asks) picks one step that every host reaches, so
all hosts save the same step in one collective save; a per-process signal handler could
make one host enter the save while another waits in the next step's collectives.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.struct
import jax
import numpy as np

__all__ = ["train_loop", "NonFiniteLossError", "TrainState"]


@flax.struct.dataclass
class TrainState:
    """What a checkpoint holds: completed steps, params, optimiser state, the RNG key and
    an optional `extra` collection that is not trained by the optimiser (batch statistics,
    EMA params); `extra` is sharded, checkpointed and restored like the rest.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    extra: Any = None


class NonFiniteLossError(FloatingPointError):
    """A training loss was NaN or inf; `.step` is the first bad step."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class _SigtermFlag:
    """Sets a flag on SIGTERM while installed (main thread only); restores the old handler.

    Single-process runs only: under jax.distributed the preemption sync service owns
    SIGTERM (it installs its own handler when the distributed client connects).
    """

    def __init__(self):
        self.raised = False
        self._old = None

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def _reached_preemption(checkpointer, step: int) -> bool:
    """True on every host at the same step once any host got a preemption notice.

    Must be asked at every step by every process (the sync service agrees on the first
    step after the notice that all hosts have not yet passed). One process: always False.
    """
    if checkpointer is None or jax.process_count() == 1:
        return False
    return checkpointer.reached_preemption(step)


# Progress-bar column names of the throughput units ('tok/s', 'img/s').
_SHORT_UNITS = {"tokens": "tok", "images": "img"}


def _at(per_step, step: int):
    return per_step(step) if callable(per_step) else per_step


def _fmt(v: float) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def train_loop(
    state: Any,
    train_step: Callable[[Any, Any], tuple[Any, dict]],
    train_iter: Iterator,
    *,
    num_steps: int,
    put_batch: Callable[[Any], Any] = lambda b: b,
    eval_fn: Callable[[Any], dict] | None = None,
    eval_every: int = 0,
    checkpointer: Any = None,
    checkpoint_every: int = 0,
    writer: Any = None,
    progress: Any = None,
    log_every: int = 10,
    units_per_step: float | Callable[[int], float] | None = None,
    unit: str = "tokens",
    flops_per_step: float | Callable[[int], float] | None = None,
    peak_flops: float | None = None,
    eval_at_start: bool = False,
) -> tuple[Any, dict]:
    """Trains until `state.step == num_steps`; returns (state, history).

    history: {'loss': {step: float}, 'eval': {step: {...}}, 'preempted': bool,
              'steps_run': int, 'seconds': float}

    units_per_step / flops_per_step may be functions of the 0-based step (a batch-size
    ramp); a log row uses the value of the step it ends at.
    """
    step = int(jax.device_get(state.step))
    start_step = step
    history: dict[str, Any] = {"loss": {}, "eval": {}, "preempted": False}
    pending: list[tuple[int, Any, dict]] = []  # (step, loss on device, other metrics)
    last_time, last_step = time.perf_counter(), step
    t_start = last_time
    last_ckpt = checkpointer.latest_step() if checkpointer is not None else None
    short_unit = _SHORT_UNITS.get(unit, unit[:3])

    def check_pending() -> dict:
        """Fetch pending losses; raise on the first non-finite one; return the last metrics."""
        nonlocal pending
        if not pending:
            return {}
        fetched = jax.device_get([(s, loss, m) for s, loss, m in pending])
        pending = []
        last = {}
        for s, loss, m in fetched:
            loss = float(np.asarray(loss))
            if not math.isfinite(loss):
                where = (
                    f"the last good checkpoint is step {last_ckpt} in {checkpointer.directory}"
                    if last_ckpt is not None
                    else "no checkpoint was written"
                )
                raise NonFiniteLossError(
                    f"training loss is {loss} at step {s}; stopping ({where})", s
                )
            history["loss"][s] = loss
            last = {"loss": loss, **{k: float(np.asarray(v)) for k, v in m.items()}}
        return last

    def save(at_step: int) -> None:
        nonlocal last_ckpt
        if checkpointer is None:
            return
        check_pending()  # never checkpoint a state that came from a non-finite loss
        checkpointer.save(at_step, state, train_iter)
        last_ckpt = at_step

    def run_eval(at_step: int) -> None:
        if eval_fn is None:
            return
        check_pending()
        res = {k: float(np.asarray(v)) for k, v in eval_fn(state).items()}
        history["eval"][at_step] = res
        if writer is not None:
            writer.write(at_step, res)
        if progress is not None:
            progress.write(
                f"step {at_step}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in res.items())
            )

    if eval_at_start and step < num_steps:
        run_eval(step)
    try:
        with _SigtermFlag() as sigterm:
            while step < num_steps:
                try:
                    host_batch = next(train_iter)
                except StopIteration:
                    if progress is not None:
                        progress.write(f"data exhausted at step {step}")
                    break
                state, metrics = train_step(state, put_batch(host_batch))
                step += 1
                loss = metrics.pop("loss")
                pending.append((step, loss, metrics))

                if step % max(1, log_every) == 0 or step == num_steps:
                    last = check_pending()
                    now = time.perf_counter()
                    dt = (now - last_time) / max(1, step - last_step)
                    last_time, last_step = now, step
                    row = dict(last)
                    row["seconds_per_step"] = dt
                    units, flops = _at(units_per_step, step - 1), _at(flops_per_step, step - 1)
                    if units:
                        row[f"{unit}_per_second"] = units / dt
                    if flops and peak_flops:
                        row["mfu"] = flops / dt / peak_flops
                    if writer is not None:
                        writer.write(step, row)
                    if progress is not None:
                        progress.update(
                            step,
                            loss=row.get("loss"),
                            **{f"{short_unit}_s": row.get(f"{unit}_per_second")},
                            mfu=row.get("mfu"),
                        )
                if eval_every and step % eval_every == 0 and step < num_steps:
                    run_eval(step)
                if checkpoint_every and step % checkpoint_every == 0 and step < num_steps:
                    save(step)
                if sigterm.raised or _reached_preemption(checkpointer, step):
                    if progress is not None:
                        progress.write(f"SIGTERM: checkpointing step {step} and exiting")
                    save(step)
                    history["preempted"] = True
                    break
            check_pending()
            if not history["preempted"]:
                if eval_fn is not None and (not history["eval"] or max(history["eval"]) < step):
                    run_eval(step)
                if checkpointer is not None and last_ckpt != step and step > start_step:
                    save(step)
    finally:
        if checkpointer is not None:
            checkpointer.wait()  # the last good checkpoint is complete on disk
        if writer is not None:
            writer.flush()
    history["steps_run"] = step - start_step
    history["seconds"] = time.perf_counter() - t_start
    history["final_step"] = step
    return state, history
