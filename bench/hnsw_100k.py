"""hnswlib at 100,000 vectors of the embedder's dimension: query latency p50/p99 and recall@10 against exact search.

Usage: .venv/bin/python bench/hnsw_100k.py [--n 100000] [--queries 1000]

The vectors are synthetic: a mixture of 2,000 clusters on the unit sphere whose spread matches the default corpus's
real embeddings (a chunk's nearest neighbour at cosine ~0.75), since embedding 100,000 real chunks takes over an hour here.
Each row of the table is one (M, ef_search) setting; the target is recall@10 >= 0.98 at p50 <= 1 ms.
"""
import argparse
import time

import hnswlib
import numpy as np


def clustered(n, dim, clusters, spread, rng):
    centers = rng.standard_normal((clusters, dim)).astype('float32')
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = centers[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)).astype('float32') / np.sqrt(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_top(data, queries, k):
    sims = queries @ data.T
    return np.argsort(-sims, axis=1)[:, :k]


def main(n, n_queries, dim=384, k=10, seed=0):
    rng = np.random.default_rng(seed)
    data = clustered(n, dim, 2000, 0.9, rng)
    queries = clustered(n_queries, dim, 2000, 0.9, np.random.default_rng(seed + 1))
    nn = np.sort(data[:2000] @ data.T, axis=1)[:, -2]
    print(f"{n:,} vectors, dim {dim}; median similarity to the nearest other vector: {np.median(nn):.2f}")
    t = time.perf_counter(); truth = exact_top(data, queries, k); exact_ms = (time.perf_counter() - t) / n_queries * 1e3
    print(f"exact search (numpy matmul, batched): {exact_ms:.3f} ms/query")
    print(f"{'M':>3} {'ef_c':>5} {'build s':>8} {'ef_s':>5} {'p50 ms':>7} {'p99 ms':>7} {'recall@10':>9} {'vs exact p50':>12}")
    for M, ef_c in [(16, 200), (32, 200)]:
        index = hnswlib.Index(space='cosine', dim=dim)
        index.init_index(max_elements=n, ef_construction=ef_c, M=M, random_seed=100)
        t = time.perf_counter(); index.add_items(data, np.arange(n), num_threads=2); build = time.perf_counter() - t
        for ef in [64, 128, 256]:
            index.set_ef(ef)
            lat, found = [], []
            for q in queries:
                t = time.perf_counter(); labels, _ = index.knn_query(q, k=k, num_threads=1); lat.append(time.perf_counter() - t)
                found.append(labels[0])
            recall = np.mean([len(set(f) & set(tr)) / k for f, tr in zip(found, truth)])
            p50, p99 = np.percentile(lat, 50) * 1e3, np.percentile(lat, 99) * 1e3
            print(f"{M:>3} {ef_c:>5} {build:>8.1f} {ef:>5} {p50:>7.3f} {p99:>7.3f} {recall:>9.4f} {exact_ms / p50:>11.1f}x")


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n', type=int, default=100_000)
    ap.add_argument('--queries', type=int, default=1000)
    a = ap.parse_args()
    main(a.n, a.queries)
