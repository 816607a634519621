"""Multi-process runs: start `jax.distributed` when this process is one of several.

Every entry calls `initialize_from_flags()` before it touches a device. It initializes
jax.distributed when the process was launched as one of several:

- by flags, e.g. on one machine (all three are needed without a cluster launcher):
  `--coordinator_address=localhost:1234 --num_processes=2 --process_id=0`;
- by a cluster launcher that `jax.distributed.initialize()` detects by itself (jax 0.10,
  jax/_src/clusters): SLURM (`srun`: SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS,
  SLURM_PROCID, SLURM_LOCALID), Open MPI (`mpirun`: OMPI_MCA_orte_hnp_uri with
  OMPI_COMM_WORLD_SIZE), or a Cloud TPU VM (GCE metadata, or TPU_WORKER_HOSTNAMES /
  TPU_PROCESS_ADDRESSES on GKE); flags given as well take precedence over what jax detects.

Otherwise (one process) it does nothing. Nothing here initializes a jax backend: jax is
imported only to read whether it found TPU chips (`import jax` checks the PCI bus) and to
call jax.distributed.initialize, which must come before any backend use.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["Launch", "define_flags", "detect_launch", "initialize_from_flags", "maybe_initialize"]

_SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process was launched: the launcher and what jax.distributed is told.

    `launcher` is 'flags', 'slurm', 'ompi', 'tpu' (hosts listed in the environment) or
    'tpu-vm' (a Cloud TPU VM; jax asks the metadata server); `kwargs` are the arguments of
    jax.distributed.initialize (those left out jax detects from the launcher).
    """

    launcher: str
    kwargs: dict[str, Any]


def _count(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ.get(name, "1"))
    except ValueError:
        return 1


def _tpu_hosts(environ: Mapping[str, str]) -> int | None:
    # GKE (and some TPU VM images) list the slice's hosts; GCE TPU VMs keep them in the
    # metadata server, which jax queries itself.
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES")
    return len([h for h in hosts.split(",") if h.strip()]) if hosts else None


def _on_cloud_tpu_vm() -> bool:
    # Set by `import jax` (cloud_tpu_init) from the PCI bus and libtpu, before any backend.
    import jax  # noqa: F401
    from jax._src import cloud_tpu_init

    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)


def _check_flags(coordinator_address, num_processes, process_id) -> None:
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
    if process_id is not None and process_id < 0:
        raise ValueError(f"--process_id must be >= 0, got {process_id}")
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise ValueError(
            f"--process_id={process_id} is out of range for --num_processes={num_processes} "
            f"(valid: 0 to {num_processes - 1})"
        )
    if coordinator_address:
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(
                f"--coordinator_address={coordinator_address!r} is not host:port "
                "(e.g. localhost:12345, the address of process 0)"
            )


def detect_launch(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    on_tpu_vm: bool | None = None,
) -> Launch | None:
    """The multi-process launch this process is part of, or None for a single process.

    Raises ValueError for flags that are inconsistent or incomplete. `environ` defaults to
    os.environ and `on_tpu_vm` to what `import jax` found (for tests).
    """
    environ = os.environ if environ is None else environ
    coordinator_address = coordinator_address or None
    _check_flags(coordinator_address, num_processes, process_id)
    given = {
        k: v
        for k, v in dict(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        ).items()
        if v is not None
    }
    if all(k in environ for k in _SLURM_VARS) and _count(environ, "SLURM_NTASKS") > 1:
        return Launch("slurm", given)
    if "OMPI_MCA_orte_hnp_uri" in environ and _count(environ, "OMPI_COMM_WORLD_SIZE") > 1:
        return Launch("ompi", given)
    tpu_hosts = _tpu_hosts(environ)
    if tpu_hosts is not None and tpu_hosts > 1:
        return Launch("tpu", given)
    if given:
        missing = [
            f"--{k}"
            for k in ("coordinator_address", "num_processes", "process_id")
            if k not in given
        ]
        if missing:
            set_ = " ".join(f"--{k}={v}" for k, v in given.items())
            raise ValueError(
                f"{set_} also needs {' and '.join(missing)}: without a cluster launcher "
                "(SLURM, Open MPI, TPU pod) a multi-process run gives all three of "
                "--coordinator_address=HOST:PORT (process 0), --num_processes and --process_id"
            )
        return Launch("flags", given)
    if tpu_hosts is None and "TPU_SKIP_MDS_QUERY" not in environ:
        if on_tpu_vm if on_tpu_vm is not None else _on_cloud_tpu_vm():
            # A GCE TPU VM: only the metadata server knows the slice's hosts; jax asks it
            # (a one-host slice makes a one-process system, which is harmless).
            return Launch("tpu-vm", {})
    return None


def maybe_initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> Launch | None:
    """Calls jax.distributed.initialize if this process is one of several; returns how.

    Does nothing (returns None) for a single process or if jax.distributed is already
    initialized; raises ValueError for bad flags.
    """
    launch = detect_launch(coordinator_address, num_processes, process_id)
    if launch is None:
        return None
    import jax

    if jax.distributed.is_initialized():
        return None
    try:
        jax.distributed.initialize(**launch.kwargs)
    except ValueError:
        if launch.launcher != "tpu-vm":
            raise
        return None  # the metadata server describes no slice: a lone TPU VM, one process
    return launch


def define_flags(flag_values=None) -> None:
    """Defines --coordinator_address, --num_processes, --process_id (once per FlagValues)."""
    from absl import flags

    fv = flags.FLAGS if flag_values is None else flag_values
    if "coordinator_address" not in fv:
        flags.DEFINE_string(
            "coordinator_address",
            None,
            "host:port of process 0 for a multi-process run (jax.distributed); cluster "
            "launchers (SLURM, Open MPI, TPU pods) are detected without it.",
            flag_values=fv,
        )
    if "num_processes" not in fv:
        flags.DEFINE_integer(
            "num_processes", None, "Processes in a multi-process run.", flag_values=fv
        )
    if "process_id" not in fv:
        flags.DEFINE_integer(
            "process_id", None, "This process's index, 0 to num_processes - 1.", flag_values=fv
        )


def initialize_from_flags(flag_values=None) -> Launch | None:
    """`maybe_initialize` with the values of the flags of `define_flags` (parsed)."""
    from absl import flags

    fv = flags.FLAGS if flag_values is None else flag_values
    return maybe_initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
