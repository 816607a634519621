"""k-means across processes: two jax.distributed processes on localhost (gloo CPU
collectives, two devices each) give the same result as one process with four devices."""

import importlib

import jax
import numpy as np

from tests.curation import multiprocess_worker as worker
from tests.distributed import run_job

km = importlib.import_module("herd.curation.kmeans")


def test_two_processes_match_one_process(tmp_path):
    out = tmp_path / "result.npz"
    run_job(worker.__file__, lambda i: [str(out)])
    got = np.load(out)

    # The same computation in this process over four devices (same row layout: 2 x 2).
    x = worker.rows()
    mesh = km.default_mesh(jax.devices()[:4])
    ref = km.kmeans(x, 9, 6, seed=4, mesh=mesh, dtype=np.float64, return_inertia=True)
    ring = km.kmeans(x, 9, 4, seed=4, mesh=mesh, dtype=np.float64, return_inertia=True,
                     max_replicated_centroid_bytes=0)  # fmt: skip
    _, idx, pot = km.kmeans_plusplus(x, 9, 5, mesh=mesh, dtype=np.float64, return_info=True)

    np.testing.assert_array_equal(got["assignment"], ref[1])
    assert got["assignment"][5] == -1 and int(got["n_invalid"]) == 1
    np.testing.assert_allclose(got["centroids"], ref[0], rtol=1e-12, atol=1e-12)
    assert abs(float(got["inertia"]) - ref[2]) <= 1e-10 * ref[2]
    np.testing.assert_array_equal(got["ring_assignment"], ring[1])
    np.testing.assert_allclose(got["ring_centroids"], ring[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got["kpp_index"], idx)
    assert abs(float(got["kpp_potential"]) - pot) <= 1e-10 * pot
    # without a mesh, a medium input runs on each process's own device: the same result
    # on both processes as on one device here
    alone = km.kmeans(worker.medium_rows(), 40, 3, seed=2, dtype=np.float64)
    for pid in range(2):
        np.testing.assert_array_equal(np.load(f"{out}.alone{pid}.npy"), alone[1])
