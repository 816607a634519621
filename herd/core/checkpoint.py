"""Checkpoints: orbax CheckpointManager for the train state plus the data-iterator state.

One checkpoint per step directory holds two items:
  'state': the whole train state pytree (params, optimiser state, step, RNG), written
           asynchronously by orbax from the (sharded) device arrays;
  'data':  the grain iterator state (JSON, one file per process), captured synchronously
           at save time so it matches the state exactly.
Restoring takes the sharded abstract state (shapes, dtypes and shardings), so each host
reads only its shards. Orbax writes into a temporary directory and renames it when the
save is complete, so a half-written step is never listed or restored; `max_to_keep`
deletes only older steps, never the newest complete one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "abstract_like"]


@dataclasses.dataclass
class _IteratorSnapshot:
    """What grain's orbax handler sees: the iterator state frozen when save() was called."""

    state: bytes = b""

    def get_state(self) -> bytes:
        return self.state

    def set_state(self, state: bytes) -> None:
        self.state = state

    def start_prefetch(self) -> None:  # called by grain's handler after restore
        pass


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target."""

    def leaf(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(leaf, tree)


class Checkpointer:
    """Async, keep-N checkpoints of a train state and (optionally) a data iterator.

    ckpt = Checkpointer(workdir + "/checkpoints", keep=3)
    ckpt.save(step, state, data_iter)          # async; returns at once
    state = ckpt.restore(abstract_like(state), data_iter)   # latest step
    ckpt.close()                                # waits for pending saves
    """

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any = None, force: bool = True) -> bool:
        """Starts saving `state` (and the iterator's current state) as `step`."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            snapshot = _IteratorSnapshot(json.dumps(data_iter.get_state()).encode())
            items["data"] = grain.checkpoint.CheckpointSave(snapshot)
        return self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: Any, data_iter: Any = None, step: int | None = None) -> Any:
        """Restores `step` (default: the latest) onto `abstract_state`'s shardings.

        If `data_iter` is given, its state is set to the one saved with the step.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        snapshot = _IteratorSnapshot()
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(snapshot)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if data_iter is not None:
            if not snapshot.state:
                raise ValueError(f"checkpoint step {step} in {self.directory} has no data state")
            data_iter.set_state(json.loads(snapshot.state.decode()))
        return restored["state"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
