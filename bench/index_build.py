"""Index build throughput against plain `SentenceTransformer.encode`, and an incremental refresh against a full build.

Usage: .venv/bin/python bench/index_build.py [--n 2000] [--changed 0.01]

Reads the `prepare` stage's chunks (`paths.chunks`; run `llmops-tpl repro prepare` first) and takes the first N of them.
1. plain encode: `SentenceTransformer.encode` of the N texts, same batch size, normalised (the baseline);
2. full build: `build_index` with an empty embedding cache (hashing, caching, hnswlib graph, files);
3. refresh: the texts of a share `--changed` of the source documents are edited, and `build_index` runs again on the same cache.
All three run in this process, one after the other, on the same machine; ratios are what to read.
"""
import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from llmops_tpl.config import load_params, project_path
from llmops_tpl.documents import chunk_id, content_hash
from llmops_tpl.index import build_index, load_embedder


def timed(f):
    t = time.perf_counter(); out = f(); return out, time.perf_counter() - t


def edit_documents(chunks, share, seed=0):
    "The chunk table after the chunks of a `share` of the source documents got new text (as if those files were edited)."
    sources = chunks.source.drop_duplicates().sample(frac=share, random_state=seed) if share else []
    out = chunks.copy()
    hit = out.source.isin(set(sources))
    out.loc[hit, 'text'] = out.loc[hit, 'text'] + ' (revised)'
    out.loc[hit, 'content_hash'] = out.loc[hit, 'text'].map(content_hash)
    out.loc[hit, 'chunk_id'] = [chunk_id(s, t) for s, t in zip(out.source[hit], out.text[hit])]
    return out, int(hit.sum()), len(sources)


def main(n, changed):
    p = load_params()
    chunks = pd.read_parquet(project_path(p['paths']['chunks']))
    chunks = chunks.iloc[:n] if n else chunks
    emb, bs, ix = p['models']['embedder'], p['index']['batch_size'], p['index']
    model = load_embedder(emb)
    model.encode(chunks.text.iloc[:bs].tolist(), batch_size=bs)  # warm up
    _, t_plain = timed(lambda: model.encode(chunks.text.tolist(), batch_size=bs, normalize_embeddings=True))
    with tempfile.TemporaryDirectory() as d:
        build = lambda c: build_index(c, Path(d)/'index', Path(d)/'cache', emb, bs, ix['M'], ix['ef_construction'], ix['ef_search'])
        m_full, t_full = timed(lambda: build(chunks))
        edited, n_edit, n_docs = edit_documents(chunks, changed)
        m_inc, t_inc = timed(lambda: build(edited))
    n_chunks = len(chunks)
    print(f"{n_chunks:,} chunks, batch size {bs}")
    print(f"plain encode:  {t_plain:7.1f} s  {n_chunks / t_plain:6.1f} chunks/s")
    print(f"full build:    {t_full:7.1f} s  {n_chunks / t_full:6.1f} chunks/s   ratio to plain encode: {t_plain / t_full:.3f}x (target >= 0.9)")
    print(f"refresh after editing {n_docs} of {chunks.source.nunique()} documents ({n_edit} chunks; embedded {m_inc['cache']['embedded']}):"
          f" {t_inc:.1f} s = {t_inc / t_full:.1%} of the full build (target <= 5%)")


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n', type=int, default=0, help='chunks to use (0: all)')
    ap.add_argument('--changed', type=float, default=0.01, help='share of documents edited before the refresh')
    a = ap.parse_args()
    main(a.n, a.changed)
