"""One process of a jax.distributed herd.lm.train run on localhost (run by
test_multiprocess_train.py).

Usage: python multiprocess_train_worker.py PORT N_PROCESSES PROCESS_ID WORKDIR OUT.json
       [sigterm=PROCESS:BATCH] [config.key=value ...]

sigterm=1:3 makes process 1 send itself a real SIGTERM as it reads its 3rd training
batch (a preemption notice that reaches one host only).

Two XLA:CPU devices per process; the tiny config; each process reads its own shard of
the corpus (data.process sharding) and builds its local part of the global batch.
"""

import functools
import json
import os
import signal
import sys
import time


class _SigtermAtBatch:
    """A training iterator that SIGTERMs its own process when batch `at` is read."""

    def __init__(self, it, at):
        self.it, self.at, self.n = it, at, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.n += 1
        if self.n == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
            # A cluster's notice comes well before the kill; here the signal handler only
            # starts the notice's trip through the coordination service, and a tiny model's
            # steps could all end before it arrives. Hold this process (and so, through the
            # collectives, the other) until it surely has.
            time.sleep(3)
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def main():
    port, n_proc, pid, workdir, out = sys.argv[1:6]
    n_proc, pid = int(n_proc), int(pid)
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", n_proc, pid)
    from herd.core.config import load_config
    from herd.lm import train

    assert jax.process_count() == n_proc and jax.device_count() == 2 * n_proc
    args = sys.argv[6:]
    sigterm = [a for a in args if a.startswith("sigterm=")]
    if sigterm:
        proc, at = map(int, sigterm[0].removeprefix("sigterm=").split(":"))
        if proc == pid:
            from herd.lm import data as data_lib

            make = data_lib.make_lm_iterator

            def make_lm_iterator(*a, **kw):  # the training iterator (the one that shuffles)
                it = make(*a, **kw)
                return _SigtermAtBatch(it, at) if kw.get("shuffle") else it

            data_lib.make_lm_iterator = make_lm_iterator
    overrides = ["--config." + a for a in args if not a.startswith("sigterm=")]
    cfg = load_config("configs/lm/tiny.py", overrides)
    res = train.run(cfg, workdir)
    from jax.experimental import multihost_utils

    gather = functools.partial(multihost_utils.process_allgather, tiled=True)
    params = jax.tree.map(gather, res["state"].params)  # the global arrays, on every process
    summary = dict(
        loss={str(k): float(v) for k, v in res["loss"].items()},
        eval={str(k): float(v["eval_loss"]) for k, v in res["eval"].items()},
        final_step=int(res["final_step"]),
        preempted=bool(res["preempted"]),
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
