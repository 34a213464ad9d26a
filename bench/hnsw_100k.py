"""hnswlib at 100,000 vectors of the embedder's dimension: query latency p50/p99 and recall@10 against exact search.

Usage: .venv/bin/python bench/hnsw_100k.py [--n 100000] [--queries 1000]   (after `llmops-tpl repro`: it reads the built index)

Embedding 100,000 real chunks would take about 80 minutes here, so the 100,000 vectors are made from the default corpus's
real embeddings (`paths.index`), held-out real chunk vectors are the queries, and two data sets bracket reality:
- `manifold`: points between a real vector and one of its 10 nearest real neighbours, plus a little noise; this keeps the
  local structure of real embeddings (median similarity to the nearest other vector 0.86 here, 0.84 in the real index);
- `gaussian`: samples of a Gaussian with the real vectors' mean and covariance; no local structure, a pessimistic case.
Exact search is a batched numpy matrix product over all vectors. Target: recall@10 >= 0.98 at p50 <= 1 ms.
"""
import argparse
import time

import hnswlib
import numpy as np

from llmops_tpl.config import load_params, project_path
from llmops_tpl.index import Retriever


def manifold(base, n, rng, noise=0.02):
    "Points on segments between each of `n` random base vectors and one of its 10 nearest neighbours."
    sims = base @ base.T
    np.fill_diagonal(sims, -1)
    nbrs = np.argsort(-sims, axis=1)[:, :10]
    a = rng.integers(0, len(base), n)
    b = nbrs[a, rng.integers(0, 10, n)]
    t = rng.random((n, 1)).astype('float32')
    return base[a] + t * (base[b] - base[a]) + noise * rng.standard_normal(base[a].shape).astype('float32')


def gaussian(base, n, rng):
    "Samples of a Gaussian with the mean and covariance of `base`."
    L = np.linalg.cholesky(np.cov(base, rowvar=False) + 1e-6 * np.eye(base.shape[1])).astype('float32')
    return base.mean(0) + rng.standard_normal((n, base.shape[1])).astype('float32') @ L.T


def measure(data, queries, k, M, ef_construction, efs):
    "Build an index over `data`, then time each query alone at each ef_search and compare with exact search."
    t = time.perf_counter()
    truth = np.argsort(-(queries @ data.T), axis=1)[:, :k]
    exact_ms = (time.perf_counter() - t) / len(queries) * 1e3
    index = hnswlib.Index(space='cosine', dim=data.shape[1])
    index.init_index(max_elements=len(data), ef_construction=ef_construction, M=M, random_seed=100)
    t = time.perf_counter(); index.add_items(data, np.arange(len(data)), num_threads=2); build = time.perf_counter() - t
    for ef in efs:
        index.set_ef(ef)
        lat, found = [], []
        for q in queries:
            t = time.perf_counter(); labels, _ = index.knn_query(q, k=k, num_threads=1); lat.append(time.perf_counter() - t)
            found.append(labels[0])
        recall = np.mean([len(set(f) & set(tr)) / k for f, tr in zip(found, truth)])
        yield build, ef, np.percentile(lat, 50) * 1e3, np.percentile(lat, 99) * 1e3, recall, exact_ms


def main(n, n_queries, k=10, seed=0):
    p = load_params()
    r = Retriever(project_path(p['paths']['index']))
    real = r.vectors(range(r.manifest['count'])).astype('float32')
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(real))
    queries, base = real[perm[:n_queries]], real[perm[n_queries:]]
    print(f"{len(real):,} real vectors (dim {real.shape[1]}): {len(queries)} held out as queries, {len(base):,} seed the {n:,} indexed")
    print(f"{'data':>9} {'M':>3} {'ef_c':>5} {'build s':>8} {'ef_s':>5} {'p50 ms':>7} {'p99 ms':>7} {'recall@10':>9} {'exact ms':>8} {'p50 speed-up':>12}")
    for name, make in [('manifold', manifold), ('gaussian', gaussian)]:
        data = make(base, n, rng)
        data /= np.linalg.norm(data, axis=1, keepdims=True)
        M, ef_c = p['index']['M'], p['index']['ef_construction']
        for build, ef, p50, p99, recall, exact_ms in measure(data, queries, k, M, ef_c, [32, 64, 128, 256]):
            print(f"{name:>9} {M:>3} {ef_c:>5} {build:>8.1f} {ef:>5} {p50:>7.3f} {p99:>7.3f} {recall:>9.4f} {exact_ms:>8.3f} {exact_ms / p50:>11.1f}x")


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n', type=int, default=100_000)
    ap.add_argument('--queries', type=int, default=1000)
    a = ap.parse_args()
    main(a.n, a.queries)
