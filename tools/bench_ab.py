"""Before/after A/B of a benchmark command: a base commit against the current checkout.

Usage::

    python tools/bench_ab.py --base 2aab646 --rounds 3 -- \\
        python tools/bench_lm.py --sections throughput --steps 4 --block 2 --warmup 1
    python tools/bench_ab.py --base 2aab646 --rounds 3 -- \\
        "python tools/bench_curation.py --parts lloyd --n 262144 --iters 10"

The base commit is checked out with ``git worktree add --detach`` into a temporary
directory (``--worktree``, default /tmp/herd_base; reused when it already holds that
commit). Each round runs the command once in each tree, alternating the order (A B, then
B A, ...) so that a drift of the shared machine's speed falls on both sides alike. Every
run is its own subprocess, started in that tree's root with ``PYTHONPATH`` set to it, so
``import herd`` and the benchmark script are that tree's own (checked before the rounds:
``herd.__file__`` must lie in the tree). One argument after ``--`` is run with ``bash -c``
(so ``&&`` and ``VAR=... cmd`` work); several are run as an argv.

Figures parsed from each run's stdout:

* ``tools/bench_lm.py`` throughput: herd and HF + torch tokens/s, their MFU, the ratio,
  and the median CPU seconds of each one's timed steps (from the per-step lines; the first
  ``--warmup`` steps of each block, as given in the command, default 2, are skipped);
* ``tools/bench_curation.py``: every JSON result line (lloyd: seconds per iteration of
  herd / faiss / scikit-learn, herd's wall time; kpp: herd seconds; e2e: herd and peer
  wall time; e2e4: herd wall time; a ``--worker`` line: its wall time);
* the wall time and the CPU seconds (user + system, every process of the command) of the
  whole run, and the load average before and after it. On a shared machine CPU seconds
  move far less with other processes' load than wall time does.

Prints the per-round values, the medians, and after / before for every figure (for
tokens/s higher is better, for seconds lower is); ``--json`` writes all of it.
``--pin-after DIR`` runs the checkout's HEAD from a worktree of its own instead of the
checkout (others' uncommitted or in-flight edits stay out; a DIR left by an earlier call
is reused as it is, so several calls compare the same commit). ``--remove-worktree`` removes
the worktrees at the end (``git worktree remove --force``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git(*a, cwd=ROOT) -> str:
    return subprocess.run(
        ["git", *a], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def ensure_worktree(path: str, base: str) -> str:
    want = git("rev-parse", base)
    if os.path.isdir(path):
        have = git("rev-parse", "HEAD", cwd=path)
        if have != want:
            raise SystemExit(f"{path} holds {have[:9]}, not {base}: remove it or pass --worktree")
        return want
    git("worktree", "add", "--detach", path, want)
    return want


def tree_env(tree: str, extra: dict) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = tree
    env.update(extra)
    return env


def check_import(tree: str, env: dict) -> str:
    out = subprocess.run(
        [sys.executable, "-c", "import herd; print(herd.__file__)"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not os.path.realpath(out).startswith(os.path.realpath(tree) + os.sep):
        raise SystemExit(f"import herd in {tree} resolved to {out}")
    return out


# ------------------------------------------------------------------------------ parsing

_LM_HERD = re.compile(r"^herd (\d+) tok/s \(MFU ([\d.]+)%\)", re.M)
_LM_PEER = re.compile(r"^hf_torch (\d+) tok/s \(MFU ([\d.]+)%\); ratio ([\d.]+)", re.M)


_LM_STEP = re.compile(r"^round \d+ (herd|hf_torch) step (\d+): ([\d.]+)s \(cpu ([\d.]+)s\)", re.M)


def parse(stdout: str, command: str = "") -> dict:
    """Figure name -> value (tokens/s, seconds, ratios) from one run's stdout."""
    f: dict[str, float] = {}
    # bench_lm's per-step lines: the median CPU seconds (all threads) of the timed steps,
    # far less sensitive than wall time to other processes on a shared machine.
    m = re.search(r"--warmup[ =](\d+)", command)
    skip = int(m[1]) if m else 2  # bench_lm's default --warmup
    cpu: dict[str, list] = {}
    for who, i, _, c in _LM_STEP.findall(stdout):
        if int(i) >= skip:
            cpu.setdefault(who, []).append(float(c))
    for who, cs in cpu.items():
        f[f"lm.{'herd' if who == 'herd' else 'peer'}_cpu_s_per_step"] = statistics.median(cs)
    if m := _LM_HERD.search(stdout):
        f["lm.herd_tok_s"], f["lm.herd_mfu_pct"] = float(m[1]), float(m[2])
    if m := _LM_PEER.search(stdout):
        f["lm.peer_tok_s"], f["lm.peer_mfu_pct"] = float(m[1]), float(m[2])
        f["lm.herd_over_peer"] = float(m[3])
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(d, dict):
            continue
        if "lloyd" in d:
            r = d["lloyd"]
            for name in ("herd", "faiss", "sklearn"):
                f[f"lloyd.{name}_s_per_iter"] = r[name]["s_per_iter"]
            f["lloyd.herd_wall_s"] = r["herd"]["wall_s"]
            f["lloyd.herd_speedup_vs_faster_peer"] = r["speedup_vs_faster_peer"]
        if "kpp" in d:
            f["kpp.herd_s"] = d["kpp"]["herd_sub_s"]
        if "e2e" in d:
            f["e2e.herd_wall_s"] = d["e2e"]["herd"]["wall_s"]
            f["e2e.peer_wall_s"] = d["e2e"]["peer"]["wall_s"]
            f["e2e.peer_over_herd"] = d["e2e"]["speedup"]
        if "e2e4" in d:
            f["e2e4.herd_wall_s"] = d["e2e4"]["herd"]["wall_s"]
        if "which" in d and "wall_s" in d:  # a bench_curation --worker line
            f[f"worker.{d['which']}_wall_s"] = d["wall_s"]
            f[f"worker.{d['which']}_peak_rss_mb"] = d.get("peak_rss_mb", float("nan"))
    return f


# ------------------------------------------------------------------------------ running


def run_once(cmd, tree: str, env: dict, log_path: str) -> dict:
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    argv = ["bash", "-c", cmd[0]] if len(cmd) == 1 else cmd
    p = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    load1 = os.getloadavg()[0]
    with open(log_path, "w") as fh:
        fh.write(p.stdout + "\n--- stderr ---\n" + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"run failed in {tree} (rc {p.returncode}), log {log_path}:\n"
                         f"{p.stderr[-3000:]}")  # fmt: skip
    figs = parse(p.stdout, " ".join(cmd))
    figs["run_wall_s"] = wall
    figs["run_cpu_s"] = cpu_s  # user + system seconds of the whole command, all processes
    return {"figures": figs, "load_before": load0, "load_after": load1}


def lower_is_better(name: str) -> bool:
    if name.endswith("tok_s"):  # tokens per second
        return False
    return name.endswith("_s") or "_s_per_" in name or name.endswith("_mb")


def summarize(runs: dict) -> dict:
    """Medians per side and after / before for every figure both sides have; printed."""
    names = sorted(set.intersection(*(set(x["figures"]) for rs in runs.values() for x in rs)))
    summary = {}
    print(f"\n{'figure':40s} {'before':>10s} {'after':>10s} {'after/before':>13s}  (medians)")
    for n in names:
        b = statistics.median(x["figures"][n] for x in runs["before"])
        f = statistics.median(x["figures"][n] for x in runs["after"])
        ratio = f / b if b else float("nan")
        summary[n] = {
            "before_median": b,
            "after_median": f,
            "after_over_before": ratio,
            "before_all": [x["figures"][n] for x in runs["before"]],
            "after_all": [x["figures"][n] for x in runs["after"]],
            "lower_is_better": lower_is_better(n),
        }
        print(f"{n:40s} {b:10.3f} {f:10.3f} {ratio:13.3f}"
              f"  {'(lower is better)' if lower_is_better(n) else ''}")  # fmt: skip
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="2aab646", help="the 'before' commit")
    ap.add_argument("--worktree", default="/tmp/herd_base", help="where the base is checked out")
    ap.add_argument("--after", default=ROOT, help="the 'after' tree (default: this checkout)")
    ap.add_argument(
        "--pin-after",
        default=None,
        metavar="DIR",
        help="check the after tree's HEAD out into DIR and run that instead, so edits made "
        "in the checkout while the rounds run (or uncommitted ones) do not enter",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for both sides")
    ap.add_argument("--logs", default="/tmp/bench_ab_logs", help="each run's stdout/stderr")
    ap.add_argument("--json", default=None, help="write everything here")
    ap.add_argument("--remove-worktree", action="store_true")
    ap.add_argument(
        "--from-logs",
        default=None,
        metavar="DIR",
        help="run nothing: parse DIR's round*_{before,after}.log files (a --logs DIR of an "
        "earlier call, with the same command after --) and print the summary again",
    )
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the benchmark command")
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("no command given (put it after --)")
    extra = dict(kv.split("=", 1) for kv in a.env)
    if a.from_logs:
        runs = {"before": [], "after": []}
        for r in range(a.rounds):
            for side in runs:
                with open(os.path.join(a.from_logs, f"round{r}_{side}.log")) as fh:
                    stdout = fh.read().split("\n--- stderr ---\n")[0]
                runs[side].append({"figures": parse(stdout, " ".join(cmd)), "round": r})
        return {"runs": runs, "summary": summarize(runs)}

    base_sha = ensure_worktree(a.worktree, a.base)
    if a.pin_after:
        if not os.path.isdir(a.pin_after):  # an existing DIR is kept: runs then share a commit
            ensure_worktree(a.pin_after, git("rev-parse", "HEAD", cwd=a.after))
        a.after = a.pin_after
    after_sha = git("rev-parse", "HEAD", cwd=a.after)
    dirty = git("status", "--short", "--untracked-files=no", "--", "herd", "tools", cwd=a.after)
    trees = {"before": a.worktree, "after": a.after}
    envs = {k: tree_env(t, extra) for k, t in trees.items()}
    info = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "command": " ".join(shlex.quote(c) for c in cmd) if len(cmd) > 1 else cmd[0],
        "before": {"tree": a.worktree, "commit": base_sha},
        "after": {"tree": a.after, "commit": after_sha, "uncommitted_herd_tools": dirty},
        "env": extra,
    }
    for k, t in trees.items():
        info[k]["herd_file"] = check_import(t, envs[k])
    print(json.dumps(info, indent=1), flush=True)
    os.makedirs(a.logs, exist_ok=True)

    runs: dict[str, list] = {"before": [], "after": []}
    load_start = os.getloadavg()
    for r in range(a.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for side in order:
            log_path = os.path.join(a.logs, f"round{r}_{side}.log")
            res = run_once(cmd, trees[side], envs[side], log_path)
            res["round"] = r
            runs[side].append(res)
            short = {k: round(v, 3) for k, v in res["figures"].items()}
            print(f"round {r} {side:6s} load {res['load_before']:.2f}->{res['load_after']:.2f} "
                  f"{json.dumps(short)}", flush=True)  # fmt: skip
    load_end = os.getloadavg()

    summary = summarize(runs)
    print(f"load average (1, 5, 15 min): start {load_start}, end {load_end}")
    out = dict(info, runs=runs, summary=summary, load_start=load_start, load_end=load_end)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)
    if a.remove_worktree:
        for path in (a.worktree, a.pin_after):
            if path:
                git("worktree", "remove", "--force", path)
    return out


if __name__ == "__main__":
    main()
