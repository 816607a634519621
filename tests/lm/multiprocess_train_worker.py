"""One process of a jax.distributed herd.lm.train run on localhost (run by
test_multiprocess_train.py).

Usage: python multiprocess_train_worker.py PORT N_PROCESSES PROCESS_ID WORKDIR OUT.json
       [config.key=value ...]

Two XLA:CPU devices per process; the tiny config; each process reads its own shard of
the corpus (data.process sharding) and builds its local part of the global batch.
"""

import functools
import json
import os
import sys


def main():
    port, n_proc, pid, workdir, out = sys.argv[1:6]
    n_proc, pid = int(n_proc), int(pid)
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", n_proc, pid)
    from herd.core.config import load_config
    from herd.lm import train

    assert jax.process_count() == n_proc and jax.device_count() == 2 * n_proc
    cfg = load_config("configs/lm/tiny.py", sys.argv[6:])  # config.key=value overrides
    res = train.run(cfg, workdir)
    from jax.experimental import multihost_utils

    gather = functools.partial(multihost_utils.process_allgather, tiled=True)
    params = jax.tree.map(gather, res["state"].params)  # the global arrays, on every process
    summary = dict(
        loss={str(k): float(v) for k, v in res["loss"].items()},
        eval={str(k): float(v["eval_loss"]) for k, v in res["eval"].items()},
        final_step=int(res["final_step"]),
        params_sum=float(sum(float(abs(x).sum()) for x in jax.tree.leaves(params))),
    )  # fmt: skip
    with open(out, "w") as f:
        json.dump(summary, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    # Set before jax is imported (only when run as a process, never on import).
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    main()
