"""Benchmark herd's curation k-means against faiss-cpu and scikit-learn.

Parts (``--parts``, comma-separated):
  lloyd  Lloyd on the same data and the same initial centroids (no subsampling):
         herd vs faiss ``Kmeans`` vs scikit-learn ``KMeans`` (lloyd, n_init=1, tol=0):
         seconds per iteration (median), effective GFLOP/s (2 N d k per iteration) as a
         fraction of the measured peak of matmuls of the same shape, final inertia.
  kpp    greedy k-means++: herd vs scikit-learn ``kmeans_plusplus`` (same number of local
         trials), seconds and initial potential; scikit-learn optionally on a subsample
         (``--kpp-peer-n``), herd then timed on both the subsample and the full data.
         herd runs in a subprocess per ``--herd-devices`` count (best compared).
  e2e    a 3-level hierarchical k-means with resampling: herd vs the same algorithm
         assembled from scikit-learn's k-means++ and faiss's Lloyd (below); wall time and
         peak RSS, each in its own subprocess (tracemalloc does not see XLA's buffers).
  e2e4   herd's 4-level curation of a larger set: wall time and peak RSS.

Quick mode: ``--quick`` shrinks every size. Each result is printed as one JSON line and
a summary table at the end. Example (the full run):
  python tools/bench_curation.py --parts lloyd,kpp,e2e,e2e4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM; ru_maxrss can carry the parent's
    high-water mark across fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def make_data(n, d, seed=0, n_modes=256, spread=3.0):
    """A random Gaussian mixture with uneven mode sizes, float32."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_modes, d)) * spread
    p = rng.dirichlet(np.ones(n_modes) * 0.5)
    lab = rng.choice(n_modes, size=n, p=p)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, 1 << 17):  # chunked, to keep the float64 temporaries small
        e = min(n, s + (1 << 17))
        x[s:e] = centers[lab[s:e]] + rng.normal(size=(e - s, d))
    return x


def inertia_of(x, c):
    """Sum of squared distances to the nearest centroid, float64 accumulation, blocked."""
    import numpy as np

    c = np.asarray(c, np.float32)
    cn = (c.astype(np.float64) ** 2).sum(1)
    tot = 0.0
    for s in range(0, len(x), 16384):
        xb = x[s : s + 16384]
        d = cn[None, :] - 2 * (xb @ c.T).astype(np.float64)
        tot += float((d.min(1) + (xb.astype(np.float64) ** 2).sum(1)).clip(0).sum())
    return tot


# ------------------------------------------------------------------------- parts


def matmul_peaks(n, d, k, tile):
    """GFLOP/s of matmuls of the Lloyd shape: numpy BLAS in 16k-row blocks, XLA in
    tile-row blocks, XLA on the whole [n, d] x [d, k]; and a square 2048 matmul."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, d)).astype(np.float32)
    c = rng.normal(size=(k, d)).astype(np.float32)
    fl = 2 * n * d * k
    out = {}

    def best(f, reps=3):
        f()
        ts = []
        for _ in range(reps + 2):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return min(ts)

    ct = np.ascontiguousarray(c.T)
    buf = np.empty((16384, k), np.float32)

    def np_blocked():
        for s in range(0, n, 16384):
            np.matmul(x[s : s + 16384], ct, out=buf[: len(x[s : s + 16384])])

    out["numpy_blocked16k"] = fl / best(np_blocked) / 1e9
    xd, cd = jnp.asarray(x), jnp.asarray(ct)
    nt = n // tile
    f_t = jax.jit(lambda a, b: lax.map(lambda xb: jnp.min(jnp.dot(xb, b), 1), a))
    xt = xd[: nt * tile].reshape(nt, tile, d)
    out[f"xla_tile{tile}"] = (
        2 * nt * tile * d * k / best(lambda: f_t(xt, cd).block_until_ready()) / 1e9
    )
    f_full = jax.jit(lambda a, b: jnp.dot(a, b))
    out["xla_full"] = fl / best(lambda: f_full(xd, cd).block_until_ready()) / 1e9
    sq = jnp.asarray(rng.normal(size=(2048, 2048)).astype(np.float32))
    out["xla_square2048"] = 2 * 2048**3 / best(lambda: f_full(sq, sq).block_until_ready()) / 1e9
    return out


def part_lloyd(a):
    import faiss
    import jax
    import numpy as np
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    from herd.curation.kmeans import default_tile, kmeans
    from herd.curation.kmeans import kmeans_plusplus as herd_kpp

    n, d, k, it = a.n, a.d, a.k, a.iters
    x = make_data(n, d, seed=0)
    # Same initial centroids for all three: herd's k-means++ on a 131072-row subsample
    # (random rows as init make empty clusters likely, and each library handles those
    # differently: faiss splits a big cluster, sklearn and herd move the centroid to far
    # points; with any such event the trajectories, hence the inertias, diverge).
    sub = x[np.sort(np.random.default_rng(123).choice(n, min(n, 131072), replace=False))]
    init = herd_kpp(sub, k, 0)
    fl = 2 * n * d * k
    tile = a.tile or default_tile(jax.default_backend(), k)
    res = {"n": n, "d": d, "k": k, "iters": it, "tile": tile}
    res["peaks_gflops"] = matmul_peaks(min(n, 262144), d, k, tile)
    peak = max(res["peaks_gflops"][key] for key in ("numpy_blocked16k", f"xla_tile{tile}"))
    res["peak_gflops"] = peak
    # Thread counts: on a loaded 2-core machine OpenMP spin-waiting can make 2 threads
    # slower than 1; probe 2 iterations of each setting and keep the faster.
    probe = {}
    for th in (1, 2):
        faiss.omp_set_num_threads(th)
        km = faiss.Kmeans(d, k, niter=2, max_points_per_centroid=n, seed=1)
        t = time.perf_counter()
        km.train(x, init_centroids=init)
        probe[f"faiss_threads{th}"] = (time.perf_counter() - t) / 2
        with threadpool_limits(th):
            skm = KMeans(k, init=init, n_init=1, max_iter=2, tol=0, algorithm="lloyd")
            t = time.perf_counter()
            skm.fit(x)
            probe[f"sklearn_threads{th}"] = (time.perf_counter() - t) / 2
    res["thread_probe_s_per_iter"] = probe
    faiss_th = min((1, 2), key=lambda th: probe[f"faiss_threads{th}"])
    sk_th = min((1, 2), key=lambda th: probe[f"sklearn_threads{th}"])
    res["faiss_threads"], res["sklearn_threads"] = faiss_th, sk_th
    faiss.omp_set_num_threads(faiss_th)
    runs = {"herd": [], "faiss": [], "sklearn": []}
    for rep in range(a.repeats):
        # herd
        t = time.perf_counter()
        r = kmeans(x, k, it, 0, init=init, tile=tile)
        wall = time.perf_counter() - t
        runs["herd"].append(
            dict(wall=wall, per_iter=float(np.median(r.iter_seconds)), centroids=r[0],
                 wall_per_iter=wall / it, n_reseeded=r.n_reseeded)
        )  # fmt: skip
        # faiss: same init, every point used
        km = faiss.Kmeans(d, k, niter=it, max_points_per_centroid=n, seed=1, verbose=False)
        t = time.perf_counter()
        km.train(x, init_centroids=init)
        wall = time.perf_counter() - t
        st = km.iteration_stats
        times = np.diff([0.0] + [s["time"] for s in st]) if st else [wall / it]
        runs["faiss"].append(
            dict(wall=wall, per_iter=float(np.median(times)), centroids=km.centroids.copy(),
                 wall_per_iter=wall / it, nsplit=int(sum(s["nsplit"] for s in st)))
        )  # fmt: skip
        # scikit-learn: lloyd, same init
        with threadpool_limits(sk_th):
            skm = KMeans(k, init=init, n_init=1, max_iter=it, tol=0, algorithm="lloyd")
            t = time.perf_counter()
            skm.fit(x)
            wall = time.perf_counter() - t
        runs["sklearn"].append(
            dict(wall=wall, per_iter=wall / max(skm.n_iter_, 1), centroids=skm.cluster_centers_,
                 n_iter=int(skm.n_iter_))
        )  # fmt: skip
        print(f"[lloyd] repeat {rep} done", file=sys.stderr, flush=True)
    for name, rs in runs.items():
        per = float(np.median([r["per_iter"] for r in rs]))
        res[name] = dict(
            s_per_iter=per,
            wall_s=float(np.median([r["wall"] for r in rs])),
            gflops=fl / per / 1e9,
            frac_of_peak=fl / per / 1e9 / peak,
            inertia=inertia_of(x, rs[-1]["centroids"]),
        )
        for key in ("n_iter", "wall_per_iter", "n_reseeded", "nsplit"):
            if key in rs[-1]:
                res[name][key] = rs[-1][key]
    faster = min(res["faiss"]["s_per_iter"], res["sklearn"]["s_per_iter"])
    res["speedup_vs_faster_peer"] = faster / res["herd"]["s_per_iter"]
    res["inertia_rel_diff_vs_faiss"] = res["herd"]["inertia"] / res["faiss"]["inertia"] - 1
    res["inertia_rel_diff_vs_sklearn"] = res["herd"]["inertia"] / res["sklearn"]["inertia"] - 1
    return res


def worker_kpp(n, d, k, sub_n, trials):
    """herd's k-means++ on the first sub_n rows (compile excluded: a warm-up call on the
    same shape with another seed), and, when sub_n < n, on all rows (incl. compile)."""
    from herd.curation.kmeans import kmeans_plusplus as herd_kpp

    x = make_data(n, d, seed=0)
    xs = x[:sub_n]
    herd_kpp(xs, k, 1, trials)
    t = time.perf_counter()
    _, _, pot = herd_kpp(xs, k, 0, trials, return_info=True)
    res = dict(herd_sub_s=time.perf_counter() - t, herd_sub_potential=pot)
    res["host_devices"] = len(__import__("jax").devices())
    if sub_n < n:
        t = time.perf_counter()
        _, _, pot = herd_kpp(x, k, 0, trials, return_info=True)
        res["herd_full_s_incl_compile"] = time.perf_counter() - t
        res["herd_full_potential"] = pot
    return res


def part_kpp(a):
    """herd in its own subprocess per XLA:CPU device count (--herd-devices; the best is
    compared, as in e2e), scikit-learn here with its default threads."""
    import math

    from sklearn.cluster import kmeans_plusplus

    n, d, k = a.n, a.d, a.k
    trials = 2 + int(math.log(k))
    res = {"n": n, "d": d, "k": k, "n_local_trials": trials}
    sub_n = a.kpp_peer_n or n
    res["peer_n"] = sub_n
    spec = json.dumps(["kpp", n, d, k, sub_n, trials])
    by_dev = {dev: run_worker(["--worker", spec], host_devices=dev) for dev in _csv(a.herd_devices)}
    res["herd_by_devices"] = by_dev
    best = min(by_dev.values(), key=lambda r: r["herd_sub_s"])
    res.update({key: v for key, v in best.items() if key.startswith("herd_")})
    res["herd_devices"] = best["host_devices"]
    xs = make_data(n, d, seed=0)[:sub_n]
    t = time.perf_counter()
    c, _ = kmeans_plusplus(xs, k, n_local_trials=trials, random_state=0)
    res["sklearn_sub_s"] = time.perf_counter() - t
    res["sklearn_sub_potential"] = inertia_of(xs, c)
    res["speedup_sub"] = res["sklearn_sub_s"] / res["herd_sub_s"]
    res["potential_ratio_sub"] = res["herd_sub_potential"] / res["sklearn_sub_potential"]
    return res


def _level_csr(centroids, assignment, dist):
    from herd.curation.hierarchical import build_level

    return build_level(centroids, assignment, dist)


def peer_hierarchical(x, ks, steps, sizes, n_iters, seed=0):
    """The same algorithm as herd.curation.hierarchical_kmeans ('closest' sampling),
    assembled from scikit-learn's greedy k-means++ and faiss's Lloyd and exact search."""
    import faiss
    import numpy as np
    from sklearn.cluster import kmeans_plusplus

    def km(items, k, s):
        c, _ = kmeans_plusplus(items, k, random_state=s)
        kmo = faiss.Kmeans(items.shape[1], k, niter=n_iters, max_points_per_centroid=len(items),
                           min_points_per_centroid=1, seed=s)  # fmt: skip
        kmo.train(np.ascontiguousarray(items, np.float32), init_centroids=c.astype(np.float32))
        return kmo.centroids

    def assign(items, c):
        index = faiss.IndexFlatL2(items.shape[1])
        index.add(np.ascontiguousarray(c, np.float32))
        dist, a = index.search(np.ascontiguousarray(items, np.float32), 1)
        return a[:, 0].astype(np.int32), dist[:, 0]

    levels = []
    items = x
    for lv, k in enumerate(ks):
        c = km(items, k, seed + lv)
        level = _level_csr(c, *assign(items, c))
        if sizes[lv] > 1:
            for st in range(1, steps[lv]):
                pos = np.arange(level.offsets[-1]) - np.repeat(level.offsets[:-1], level.sizes())
                idx = np.sort(level.members[pos < sizes[lv]])
                c = km(items[idx], k, seed + 1000 * lv + st)
                level = _level_csr(c, *assign(items, c))
        levels.append(level)
        items = level.centroids
    return levels


def worker_e2e(a, which, n, d, ks, steps, sizes, n_iters):
    x = make_data(n, d, seed=5)
    t = time.perf_counter()
    if which == "herd":
        from herd.curation import hierarchical_kmeans

        tree = hierarchical_kmeans(x, ks, steps, sizes, n_iters=n_iters, seed=0, tile=a.tile)
        levels = tree.levels
    else:
        import faiss
        from threadpoolctl import threadpool_limits

        threads = int(a.peer_threads)
        faiss.omp_set_num_threads(threads)
        with threadpool_limits(threads):
            levels = peer_hierarchical(x, ks, steps, sizes, n_iters)
    wall = time.perf_counter() - t
    return dict(
        which=which,
        host_devices=len(__import__("jax").devices()) if which == "herd" else None,
        peer_threads=int(a.peer_threads) if which == "peer" else None,
        wall_s=wall,
        peak_rss_mb=_peak_rss_mb(),
        ks=[lv.k for lv in levels],
        level0_inertia=inertia_of(x, levels[0].centroids),
    )


def run_worker(args_list, host_devices=None):
    """Run one side in its own process. host_devices: XLA:CPU devices for herd (rows are
    sharded over them; each runs its loops on one core)."""
    cmd = [sys.executable, os.path.abspath(__file__), *args_list]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if host_devices:
        flag = f"--xla_force_host_platform_device_count={host_devices}"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"worker failed: {' '.join(cmd)}\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _csv(s):
    return [int(v) for v in s.split(",")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="lloyd,kpp,e2e,e2e4")
    ap.add_argument("--quick", action="store_true", help="small sizes everywhere")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument(
        "--tile", type=int, default=None, help="herd's Lloyd tile (default: herd's own choice)"
    )
    ap.add_argument("--kpp-peer-n", type=int, default=0, help="scikit-learn k-means++ subsample")
    ap.add_argument("--e2e-n", type=int, default=300_000)
    ap.add_argument("--e2e-d", type=int, default=32)
    ap.add_argument("--e2e-ks", default="2000,600,200")
    ap.add_argument("--e2e-steps", default="3,3,3")
    ap.add_argument("--e2e-sizes", default="40,2,2")
    ap.add_argument("--e2e-iters", type=int, default=20)
    ap.add_argument("--e2e4-n", type=int, default=1_000_000)
    ap.add_argument("--e2e4-ks", default="4000,1000,250,50")
    ap.add_argument("--e2e4-steps", default="1,3,3,3")
    ap.add_argument("--e2e4-sizes", default="1,4,3,3")
    ap.add_argument("--e2e4-iters", type=int, default=10)
    ap.add_argument(
        "--peer-threads",
        default="1,2",
        help="faiss/BLAS threads of the e2e peer, comma-separated: each is run, the "
        "fastest is compared",
    )
    ap.add_argument(
        "--herd-devices",
        default="1,2",
        help="XLA:CPU host devices for herd's e2e worker, comma-separated: each is run, "
        "the fastest is compared (herd's loops run on one core per device)",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.quick:
        a.n, a.k, a.iters = 50_000, 128, 5
        a.e2e_n, a.e2e_ks, a.e2e_sizes, a.e2e_iters = 20_000, "200,60,20", "20,2,2", 5
        a.e2e4_n, a.e2e4_ks, a.e2e4_iters = 40_000, "400,100,25,5", 5

    if a.worker:
        which, *spec = json.loads(a.worker)
        if which == "kpp":
            print(json.dumps(worker_kpp(*spec)))
        else:
            print(json.dumps(worker_e2e(a, which, *spec)))
        return

    out = {}
    load = os.getloadavg()
    print(f"# load average at start: {load}", flush=True)
    tile_arg = ["--tile", str(a.tile)] if a.tile else []
    for part in a.parts.split(","):
        t = time.perf_counter()
        if part == "lloyd":
            r = part_lloyd(a)
        elif part == "kpp":
            r = part_kpp(a)
        elif part == "e2e":
            spec = [a.e2e_n, a.e2e_d, _csv(a.e2e_ks), _csv(a.e2e_steps), _csv(a.e2e_sizes),
                    a.e2e_iters]  # fmt: skip
            # Each side in each of its configurations (herd: XLA:CPU devices; peer:
            # faiss/BLAS threads); the ratio to quote is best against best.
            rh = {dev: run_worker(["--worker", json.dumps(["herd", *spec]), *tile_arg],
                                  host_devices=dev)
                  for dev in _csv(a.herd_devices)}  # fmt: skip
            rp = {th: run_worker(["--worker", json.dumps(["peer", *spec]), "--peer-threads",
                                  str(th)])
                  for th in _csv(a.peer_threads)}  # fmt: skip
            bh = min(rh.values(), key=lambda r: r["wall_s"])
            bp = min(rp.values(), key=lambda r: r["wall_s"])
            r = dict(spec=spec, herd=bh, peer=bp, speedup=bp["wall_s"] / bh["wall_s"],
                     herd_by_devices=rh, peer_by_threads=rp)  # fmt: skip
        elif part == "e2e4":
            spec = [a.e2e4_n, a.e2e_d, _csv(a.e2e4_ks), _csv(a.e2e4_steps), _csv(a.e2e4_sizes),
                    a.e2e4_iters]  # fmt: skip
            dev = max(_csv(a.herd_devices))  # herd only: its largest configuration
            r = dict(spec=spec, herd=run_worker(["--worker", json.dumps(["herd", *spec]),
                                                 *tile_arg], host_devices=dev))  # fmt: skip
        else:
            raise SystemExit(f"unknown part {part!r}")
        r["part_wall_s"] = time.perf_counter() - t
        r["loadavg_after"] = os.getloadavg()
        out[part] = r
        print(json.dumps({part: r}), flush=True)
    print("# summary")
    for part, r in out.items():
        if part == "lloyd":
            for name in ("herd", "faiss", "sklearn"):
                v = r[name]
                print(f"lloyd {name:8s} {v['s_per_iter']:.3f} s/iter {v['gflops']:.1f} GF/s "
                      f"({100 * v['frac_of_peak']:.0f}% of {r['peak_gflops']:.1f}) "
                      f"inertia {v['inertia']:.6e}")  # fmt: skip
            print(f"lloyd herd speedup vs faster peer: {r['speedup_vs_faster_peer']:.2f}x")
        elif part == "kpp":
            for dev, v in r["herd_by_devices"].items():
                print(f"kpp herd {dev} device(s) {v['herd_sub_s']:.1f}s")
            print(f"kpp n={r['peer_n']} herd {r['herd_sub_s']:.1f}s sklearn "
                  f"{r['sklearn_sub_s']:.1f}s -> {r['speedup_sub']:.1f}x; potential ratio "
                  f"{r['potential_ratio_sub']:.4f}")  # fmt: skip
        elif part == "e2e":
            for dev, v in r["herd_by_devices"].items():
                print(f"e2e herd {dev} device(s) {v['wall_s']:.1f}s {v['peak_rss_mb']:.0f}MB")
            for th, v in r["peer_by_threads"].items():
                print(f"e2e peer {th} thread(s) {v['wall_s']:.1f}s {v['peak_rss_mb']:.0f}MB")
            print(f"e2e best vs best: herd {r['herd']['wall_s']:.1f}s, peer "
                  f"{r['peer']['wall_s']:.1f}s -> {r['speedup']:.2f}x")  # fmt: skip
        elif part == "e2e4":
            print(f"e2e4 herd ({r['herd']['host_devices']} device(s)) {r['herd']['wall_s']:.1f}s "
                  f"{r['herd']['peak_rss_mb']:.0f}MB")  # fmt: skip
    print(f"# load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
