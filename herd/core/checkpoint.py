"""Checkpoints: orbax CheckpointManager for the train state plus the data-iterator state.

One checkpoint per step directory holds up to three items:
  'state':  the whole train state pytree (params, optimiser state, step, RNG, extra),
            written asynchronously by orbax from the (sharded) device arrays;
  'data':   the grain iterator state (JSON, one file per process), captured synchronously
            at save time so it matches the state exactly;
  'config': the run's config as JSON, so that generation, fine-tuning and embedding need
            only the checkpoint directory (`read_config`).
Restoring takes the sharded abstract state (shapes, dtypes and shardings), so each host
reads only its shards; `restore_params` reads the params alone straight onto a mesh
(the optimiser state is never read, and no host holds a full copy). Orbax writes into a
temporary directory and renames it when the save is complete, so a half-written step is
never listed or restored; `max_to_keep` deletes only older steps, never the newest
complete one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "abstract_like", "read_config", "restore_params"]


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

    def __init__(
        self,
        directory: str,
        keep: int = 3,
        async_save: bool = True,
        config: Mapping[str, Any] | None = None,
    ):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config")
        )
        # JSON-able now, so that a config orbax cannot write fails here and not in a save
        self._config = _to_json(config) if config is not None else None

    def reached_preemption(self, step: int) -> bool:
        """Whether all processes agreed to save `step` for a preemption (jax.distributed)."""
        return self._manager.reached_preemption(int(step))

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
        if self._config is not None:
            items["config"] = ocp.args.JsonSave(self._config)
        return self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: Any, data_iter: Any = None, step: int | None = None) -> Any:
        """Restores `step` (default: the latest) onto `abstract_state`'s shardings.

        If `data_iter` is given, its state is set to the one saved with the step.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        snapshot = _IteratorSnapshot()

        def restore(target):
            items = {"state": ocp.args.StandardRestore(target)}
            if data_iter is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(snapshot)
            return self._manager.restore(step, args=ocp.args.Composite(**items))["state"]

        try:
            state = restore(abstract_state)
        except ValueError:
            # Train states saved before TrainState had its `extra` field have no such
            # entry; one without extra restores from them onto the same fields.
            fields = _fields_but_empty_extra(abstract_state)
            if fields is None:
                raise
            try:
                state = abstract_state.replace(**restore(fields))
            except ValueError:
                raise ValueError(
                    f"checkpoint step {step} in {self.directory} does not match the train "
                    "state asked for (another model or optimiser?)"
                ) from None
        if data_iter is not None:
            if not snapshot.state:
                raise ValueError(f"checkpoint step {step} in {self.directory} has no data state")
            data_iter.set_state(json.loads(snapshot.state.decode()))
        return state

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _fields_but_empty_extra(state) -> dict | None:
    """A train state's fields without `extra`, if it has an empty one; else None."""
    if not dataclasses.is_dataclass(state) or getattr(state, "extra", 0) is not None:
        return None
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "extra"}


def _to_json(config: Mapping[str, Any]) -> dict:
    """A config (ConfigDict or mapping) as plain JSON types; tuples become lists."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return json.loads(json.dumps(config))


def _latest(directory: str, step: int | None) -> tuple[ocp.CheckpointManager, int]:
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    manager = ocp.CheckpointManager(directory, item_names=("state", "data", "config"))
    step = manager.latest_step() if step is None else int(step)
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    if step not in manager.all_steps():
        raise FileNotFoundError(
            f"no checkpoint step {step} in {directory} (steps: {list(manager.all_steps())})"
        )
    return manager, step


def read_config(directory: str, step: int | None = None) -> dict:
    """The config (a dict) saved with checkpoint `step` (default: the latest) in `directory`."""
    manager, step = _latest(directory, step)
    path = os.path.join(directory, str(step), "config")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint step {step} in {directory} holds no config")
    try:
        return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
            "config"
        ]
    finally:
        manager.close()


def restore_params(
    directory: str, abstract_params: Any, step: int | None = None, item: str = "params"
) -> Any:
    """The params alone of checkpoint `step` (default: the latest), onto their shardings.

    `abstract_params` holds ShapeDtypeStructs with shardings (mesh.abstract_state of the
    model's init, `.params`). Orbax's partial restore reads only the 'params' subtree of
    the saved state, each host only its own shards: the optimiser state is never read
    and no host materialises the full model. A param asked for that the checkpoint lacks,
    or holds with another shape, is refused naming the file; params it holds beyond those
    asked for are not read (a backbone restored without its head). `item` names another
    field of the train state to read the same way ('extra': BatchNorm statistics).
    """
    manager, step = _latest(directory, step)
    where = os.path.join(manager.directory, str(step), "state")
    _check_params_match(where, abstract_params, item)
    target = {item: abstract_params}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target, restore_args=restore_args, partial_restore=True
                )
            ),
        )
    finally:
        manager.close()
    return restored["state"][item]


def _check_params_match(where: str, abstract_params: Any, item: str = "params") -> None:
    """Raises ValueError naming `where` unless it holds params of exactly these shapes.

    Checked on orbax's metadata before reading: a partial restore would hand back the
    request itself for a param the checkpoint lacks, and fail mid-read on another shape.
    """
    from etils import epath

    stored = ocp.PyTreeCheckpointHandler().metadata(epath.Path(where)).tree.get(item)
    if stored is None:
        raise ValueError(f"{where} holds no {item}")
    stored = {
        jax.tree_util.keystr(path): tuple(x.shape)
        for path, x in jax.tree_util.tree_leaves_with_path(stored)
    }
    wanted = {
        jax.tree_util.keystr(path): tuple(x.shape)
        for path, x in jax.tree_util.tree_leaves_with_path(abstract_params)
    }
    missing = sorted(set(wanted) - set(stored))
    if missing:
        raise ValueError(
            f"{where} holds no params {', '.join(missing[:5])}"
            + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
            + ": it was saved from another model"
        )
    other = [f"{k} {stored[k]} (asked {v})" for k, v in sorted(wanted.items()) if stored[k] != v]
    if other:
        raise ValueError(
            f"{where} does not hold params of the requested shapes: {'; '.join(other[:5])}"
        )
