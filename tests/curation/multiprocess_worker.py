"""One process of a jax.distributed job on localhost (run by test_multiprocess.py).

Usage: python multiprocess_worker.py PORT N_PROCESSES PROCESS_ID OUT.npz

Each process holds the same rows in host memory and two XLA:CPU devices; k-means and
k-means++ run over the mesh of all processes' devices (rows sharded across processes, sums
reduced across them), and process 0 writes the results.
"""

import os
import sys


def rows():
    import numpy as np

    rng = np.random.default_rng(11)
    centres = rng.normal(size=(12, 6)) * 4
    x = centres[rng.integers(12, size=3001)] + 0.7 * rng.normal(size=(3001, 6))
    x[5] = np.nan  # a non-finite row, excluded and counted in every process
    return x


def medium_rows():
    """Few enough elements for k-means' one-device default, too much work for the host."""
    import numpy as np

    return np.random.default_rng(12).normal(size=(120_000, 8))


def main():
    port, n_proc, pid, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", n_proc, pid)
    import numpy as np

    from herd.curation.kmeans import default_mesh, kmeans, kmeans_plusplus

    assert jax.process_count() == n_proc and len(jax.devices()) == 2 * n_proc
    x = rows()
    mesh = default_mesh()  # every device of every process
    res = kmeans(x, 9, 6, seed=4, mesh=mesh, dtype=np.float64, return_inertia=True)
    ring = kmeans(x, 9, 4, seed=4, mesh=mesh, dtype=np.float64, return_inertia=True,
                  max_replicated_centroid_bytes=0)  # fmt: skip
    c, idx, pot = kmeans_plusplus(x, 9, 5, mesh=mesh, dtype=np.float64, return_info=True)
    # no mesh: a medium input runs on each process's own first device, alone
    alone = kmeans(medium_rows(), 40, 3, seed=2, dtype=np.float64)
    np.save(f"{out}.alone{pid}.npy", alone[1])
    if pid == 0:
        np.savez(
            out, centroids=res[0], assignment=res[1], inertia=res[2], n_invalid=res.n_invalid,
            ring_centroids=ring[0], ring_assignment=ring[1], kpp_index=idx, kpp_potential=pot,
        )  # fmt: skip
    jax.distributed.shutdown()


if __name__ == "__main__":
    # Set before jax is imported (only when run as a process, never on import by the test).
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    main()
