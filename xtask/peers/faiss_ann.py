#!/usr/bin/env python3
"""faiss-cpu as the peer of qcl's approximate nearest-neighbour benchmark.

Builds one faiss index over BASE (timing training and adding apart), then searches every
query with k = 10 for each setting of the knobs swept, ROUNDS times each, and prints ONE JSON
object on stdout:

    {"faiss_version", "threads", "n", "d", "nq", "metric", "config", "by_residual",
     "train_seconds", "add_seconds", "memory_bytes", "code_bytes", "refine_bytes",
     "runs": [{"knobs": {...}, "seconds": [...], "memory_bytes",
               "recall_at_1", "recall_at_10"}]}

Usage:
    faiss_ann.py --base B.npy --queries Q.npy --truth T.npy --metric l2|ip \\
                 (--config JSON | --serve) [--threads 2] [--rounds 3] [--k 10]

With --serve it reads commands as JSON lines on stdin and answers each with one JSON line
(see serve()): `cargo xtask reproduce ann` drives it so, alternating faiss's search rounds
with its own.

B and Q are float32 [n, d] and [nq, d] (for cosine, pass normalised vectors and `ip`); T is
int64 [nq, >= k], the exact neighbours, nearest first. CONFIG names the index and the knobs:

    {"kind": "pq", "m": 16, "nbits": 8}
    {"kind": "pq_fastscan", "m": 16}                        (4-bit codes, faiss's fast scan)
    {"kind": "ivf_pq", "nlist": 1024, "m": 10, "nbits": 8, "opq": true,
     "nprobe": [1, 2, 4, 8, 16, 32, 64], "refine": [0, 2, 4]}
    {"kind": "ivf_pq_fastscan", "nlist": 1024, "m": 10, "nprobe": [...]}

`opq` (an OPQMatrix rotation before the index, IndexPreTransform; `opq_iterations` sets its
alternations, faiss's default 50) and `refine` (the k_factor
of an IndexRefineFlat over the index, re-ranking k_factor × k candidates by exact distance;
0 = none) apply to every kind; `nprobe` and `by_residual` (whether the PQ encodes the
residual from the coarse centroid; faiss's default is true for ivf_pq and false for
ivf_pq_fastscan) to the IVF kinds. Every combination of the knobs is a run. Training uses faiss's defaults on all of BASE (faiss samples what it needs), with the
k-means seeds set to `seed` (default 1234, faiss's own default).

memory_bytes is the size of the index as faiss serialises it (codes, ids, inverted lists,
codebooks, coarse centroids, OPQ matrix); code_bytes is n × the PQ code size (m × nbits / 8);
refine_bytes the n × d float32 vectors an IndexRefineFlat keeps (counted in a run's
memory_bytes when its refine is not 0).

recall_at_10 = mean over queries of |returned top 10 ∩ true top 10| / 10 (ann-benchmarks);
recall_at_1 = fraction of queries whose first result is T[:, 0].
"""
import argparse
import itertools
import json
import sys
import time

import faiss
import numpy as np

KINDS = {
    "pq": {"m", "nbits"},
    "pq_fastscan": {"m", "nbits"},
    "ivf_pq": {"nlist", "m", "nbits", "nprobe", "by_residual"},
    "ivf_pq_fastscan": {"nlist", "m", "nbits", "nprobe", "by_residual"},
}
COMMON = {"kind", "opq", "opq_iterations", "refine", "seed"}


def fail(message):
    print(f"faiss_ann.py: {message}", file=sys.stderr)
    sys.exit(2)


def load(path, dtype, what):
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        fail(f"cannot read {what} {path}: {e}")
    if a.ndim != 2:
        fail(f"{what} {path} has shape {a.shape}, not 2-D")
    if a.dtype != dtype:
        fail(f"{what} {path} is {a.dtype}, not {np.dtype(dtype)}")
    return np.ascontiguousarray(a)


def as_list(value, name):
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and v >= 0 for v in values):
        fail(f"config `{name}` must be a non-negative integer or a list of them")
    return values


def build(config, d, metric):
    """The index CONFIG names (untrained), its PQ or IVF-PQ part, the IVF part if any, and
    the knob lists."""
    kind = config.get("kind")
    if kind not in KINDS:
        fail(f"config kind {kind!r} is not one of {sorted(KINDS)}")
    unknown = set(config) - KINDS[kind] - COMMON
    if unknown:
        fail(f"config keys {sorted(unknown)} do not apply to kind {kind}")
    if "m" not in config:
        fail("config needs `m` (sub-quantizers)")
    m = config["m"]
    seed = config.get("seed", 1234)
    fast = kind.endswith("fastscan")
    nbits = config.get("nbits", 4 if fast else 8)
    if fast and nbits != 4:
        fail(f"{kind} codes have 4 bits, not {nbits}")
    if d % m:
        fail(f"d = {d} is not a multiple of m = {m}")
    ivf = None
    if kind == "pq":
        index = faiss.IndexPQ(d, m, nbits, metric)
    elif kind == "pq_fastscan":
        index = faiss.IndexPQFastScan(d, m, nbits, metric)
    else:
        if "nlist" not in config:
            fail(f"{kind} needs `nlist`")
        nlist = config["nlist"]
        quantizer = faiss.IndexFlatL2(d) if metric == faiss.METRIC_L2 else faiss.IndexFlatIP(d)
        if kind == "ivf_pq":
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits, metric)
        else:
            index = faiss.IndexIVFPQFastScan(quantizer, d, nlist, m, nbits, metric)
        index.own_fields = True
        quantizer.this.disown()
        index.cp.seed = seed
        if "by_residual" in config:
            index.by_residual = bool(config["by_residual"])
        ivf = index
    index.pq.cp.seed = seed
    core = index
    if config.get("opq", False):
        # OPQ's own initial rotation and PQ use faiss's fixed seeds.
        opq = faiss.OPQMatrix(d, m)
        opq.niter = int(config.get("opq_iterations", opq.niter))
        wrapped = faiss.IndexPreTransform(opq, index)
        wrapped.own_fields = True
        index.this.disown()
        opq.this.disown()
        index = wrapped
    knobs = {}
    if ivf is not None:
        knobs["nprobe"] = as_list(config.get("nprobe", [1]), "nprobe")
    elif "nprobe" in config:
        fail(f"`nprobe` does not apply to {kind}")
    if "refine" in config:
        knobs["refine"] = as_list(config["refine"], "refine")
    return index, core, ivf, knobs


def recalls(found, truth, k):
    top1 = float(np.mean(found[:, 0] == truth[:, 0]))
    # faiss returns each id at most once (-1 for a missing result, never a true neighbour).
    hits = int((found[:, :k, None] == truth[:, None, :k]).any(axis=2).sum())
    return top1, hits / (k * len(truth))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--queries", required=True)
    p.add_argument("--truth", required=True)
    p.add_argument("--metric", required=True, choices=["l2", "ip"])
    p.add_argument("--config", help="JSON object: the index and its knobs")
    p.add_argument("--serve", action="store_true",
                   help="read build/search commands as JSON lines on stdin (see serve())")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--k", type=int, default=10)
    args = p.parse_args()
    if args.rounds < 1 or args.threads < 1 or args.k < 1:
        fail("--rounds, --threads and --k must be at least 1")

    faiss.omp_set_num_threads(args.threads)
    base = load(args.base, np.float32, "base")
    queries = load(args.queries, np.float32, "queries")
    truth = load(args.truth, np.int64, "truth")
    n, d = base.shape
    nq = queries.shape[0]
    if queries.shape[1] != d:
        fail(f"queries have {queries.shape[1]} dimensions, the base {d}")
    if truth.shape[0] != nq or truth.shape[1] < args.k:
        fail(f"truth has shape {truth.shape}, expected [{nq}, >= {args.k}]")
    metric = faiss.METRIC_L2 if args.metric == "l2" else faiss.METRIC_INNER_PRODUCT

    if args.serve:
        serve(base, queries, truth, d, metric, args.k)
        return
    if args.config is None:
        fail("--config is required without --serve")
    config = parse_config(args.config)
    built = Built(config, base, d, metric)
    runs = []
    names = list(built.knobs)
    for values in itertools.product(*(built.knobs[name] for name in names)):
        setting = dict(zip(names, values))
        results = [built.search(queries, truth, setting, args.k) for _ in range(args.rounds)]
        runs.append({"knobs": setting, "seconds": [r["seconds"] for r in results],
                     "memory_bytes": results[-1]["memory_bytes"],
                     "recall_at_1": results[-1]["recall_at_1"],
                     "recall_at_10": results[-1]["recall_at_10"]})
    print(json.dumps({
        "faiss_version": faiss.__version__, "threads": args.threads, "n": base.shape[0],
        "d": d, "nq": queries.shape[0], "metric": args.metric, "config": config,
        **built.summary(), "runs": runs,
    }))


def parse_config(text):
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"the config is not JSON: {e}")
    if not isinstance(config, dict):
        fail("the config must be a JSON object")
    return config


class Built:
    """One index CONFIG names, trained and filled over BASE (timed), ready to search."""

    def __init__(self, config, base, d, metric):
        self.index, self.core, self.ivf, self.knobs = build(config, d, metric)
        n = base.shape[0]
        t = time.perf_counter()
        self.index.train(base)
        self.train_seconds = time.perf_counter() - t
        t = time.perf_counter()
        self.index.add(base)
        self.add_seconds = time.perf_counter() - t
        self.memory_bytes = int(faiss.serialize_index(self.index).size)
        self.code_bytes = int(self.core.code_size) * n
        self.refined, self.refine_bytes = None, 0
        if "refine" in self.knobs:
            # Over the trained, filled index: adds only the exact vectors it re-ranks with.
            self.base = base
            self.refined = faiss.IndexRefineFlat(self.index, faiss.swig_ptr(base))
            self.refine_bytes = n * d * 4

    def summary(self):
        return {"by_residual": None if self.ivf is None else bool(self.ivf.by_residual),
                "train_seconds": self.train_seconds, "add_seconds": self.add_seconds,
                "memory_bytes": self.memory_bytes, "code_bytes": self.code_bytes,
                "refine_bytes": self.refine_bytes}

    def search(self, queries, truth, setting, k):
        """One timed search of every query with the knobs of SETTING."""
        if self.ivf is not None:
            self.ivf.nprobe = setting.get("nprobe", 1)
        searcher, memory = self.index, self.memory_bytes
        if setting.get("refine", 0) > 0:
            if self.refined is None:
                fail("`refine` was not among the config's knobs")
            self.refined.k_factor = float(setting["refine"])
            searcher, memory = self.refined, self.memory_bytes + self.refine_bytes
        t = time.perf_counter()
        _, found = searcher.search(queries, k)
        seconds = time.perf_counter() - t
        r1, r10 = recalls(found, truth, k)
        return {"seconds": seconds, "memory_bytes": memory, "recall_at_1": r1,
                "recall_at_10": r10}


def serve(base, queries, truth, d, metric, k):
    """Answers one JSON command per line of stdin with one JSON line on stdout, so that the
    caller can alternate its own rounds with faiss's: {"op": "build", "config": {...}} builds
    (replying with the build's summary), {"op": "search", "knobs": {...}} searches once
    (replying with seconds and recalls). End of input ends the process."""
    built = None
    for line in sys.stdin:
        if not line.strip():
            continue
        command = parse_config(line)
        op = command.get("op")
        if op == "build":
            built = Built(command.get("config", {}), base, d, metric)
            reply = built.summary()
        elif op == "search":
            if built is None:
                fail("search before build")
            reply = built.search(queries, truth, command.get("knobs", {}), k)
        else:
            fail(f"unknown op {op!r}")
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
