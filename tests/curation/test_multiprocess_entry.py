"""The real curation entry as two jax.distributed processes on localhost (gloo CPU
collectives, two devices each): both exit 0, process 0 alone prints and writes, the outputs
equal those of one process over four devices, and a rerun resumes the saved tree."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from herd.core.config import load_config
from herd.curation import curate as curate_lib
from herd.curation.kmeans import default_mesh
from tests.distributed import REPO, free_port

TEST_CONFIG = os.path.join(REPO, "configs", "curation", "test.py")
# Tiny and float64 (as test_multiprocess.py: sums reduced across processes or across the
# devices of one process agree to rounding, which float64 keeps far below any decision).
OVERRIDES = dict(plots=False, **{"input.synthetic": "long_tail", "hierarchy.dtype": "float64"})


def _launch(workdir, n_processes=2, timeout=300):
    """Runs `python -m herd.curation.curate` as n_processes processes; [(stdout, stderr)]."""
    port = free_port()
    env = dict(
        os.environ,
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    )
    overrides = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "herd.curation.curate",
                f"--config={TEST_CONFIG}",
                f"--workdir={workdir}",
                *overrides,
                f"--coordinator_address=localhost:{port}",
                f"--num_processes={n_processes}",
                f"--process_id={i}",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n_processes)
    ]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    report = "\n".join(f"--- process {i}:\n{o}\n{e[-3000:]}" for i, (o, e) in enumerate(outs))
    assert all(p.returncode == 0 for p in procs), report
    return outs


def _ours(stdout):
    """stdout without what gloo itself prints when it connects the processes: its threads
    write "[Gloo] Rank ..." messages that can run together on one line and leave empty
    lines behind."""
    return [line for line in stdout.splitlines() if line.strip() and "[Gloo]" not in line]


def _files(directory):
    return sorted(
        os.path.relpath(os.path.join(d, f), directory)
        for d, _, fs in os.walk(directory)
        for f in fs
    )


def _figures(summary):
    """The summary without what names the workdir or the time taken."""
    s = json.loads(json.dumps(summary))
    for key in ("seconds", "outputs"):
        s.pop(key)
    s["input"].pop("labels")
    s["labels"].pop("path")
    for lv in s["levels"]:
        lv.pop("centroids")
        lv.pop("assignment")
    return s


def test_two_process_entry_matches_one_process_and_resumes(tmp_path):
    work = tmp_path / "two"
    outs = _launch(work)

    # The reference: one process (this one) over four devices, same config.
    cfg = load_config(TEST_CONFIG)
    for k, v in OVERRIDES.items():
        *path, leaf = k.split(".")
        node = cfg
        for p in path:
            node = node[p]
        node[leaf] = v
    said = []
    one = tmp_path / "one"
    ref = curate_lib.curate(cfg, str(one), say=said.append, mesh=default_mesh(jax.devices()[:4]))

    # Process 0 alone prints; the others print nothing (but gloo's connection lines).
    (out0, _), (out1, _) = outs
    assert "curating 2000 of 2000 points" in out0 and "selected 50 points" in out0
    assert _ours(out1) == [], out1
    assert "resuming level" not in out0

    # One set of outputs, the same files as the single-process run's, and equal results.
    assert _files(work) == _files(one)
    selected = np.load(work / "selected_indices.npy")
    np.testing.assert_array_equal(selected, np.load(one / "selected_indices.npy"))
    assert selected.shape == (50,)
    summary = json.loads((work / "summary.json").read_text())
    assert _figures(summary) == _figures(ref)
    for i in range(2):
        name = f"assignment_level{i}.npy"
        np.testing.assert_array_equal(np.load(work / name), np.load(one / name))
        name = f"centroids_level{i}.npy"
        np.testing.assert_allclose(np.load(work / name), np.load(one / name), rtol=1e-12)

    # A rerun in the same workdir resumes the finished tree, said once by process 0.
    mtime = os.stat(work / "tree" / "tree.json").st_mtime_ns
    (out0, _), (out1, _) = _launch(work)
    assert out0.count("resuming level 2") == 1, out0
    assert _ours(out1) == [], out1
    assert os.stat(work / "tree" / "tree.json").st_mtime_ns == mtime  # nothing recomputed
    np.testing.assert_array_equal(np.load(work / "selected_indices.npy"), selected)
    assert _figures(json.loads((work / "summary.json").read_text())) == _figures(summary)
    assert _files(work) == _files(one)
