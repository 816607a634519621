"""Launching a jax.distributed job of worker processes on localhost, for the tests."""

import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_job(worker: str, args_of_process, n_processes: int = 2, timeout: int = 600):
    """Runs `python worker PORT N PROCESS_ID *args_of_process(i)` for every process i at
    once (the coordinator on a free local port) and fails with their output if any
    exits non-zero. The workers import herd from this checkout."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(port), str(n_processes), str(i), *args_of_process(i)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(n_processes)
    ]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
