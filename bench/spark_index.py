"""Chunking and embedding on Spark (`index.engine: spark`, `local[2]`) against this process, on the same corpus.

Usage: .venv/bin/python bench/spark_index.py [CORPUS_DIR] [--chunks 600]   (default: data/raw, after `llmops-tpl corpus`)

Both engines chunk the whole corpus (`prepare_corpus`) and embed its first `--chunks` chunks into an empty cache
(`build_index`'s path), in the same run, Spark first; the tables and vectors are compared. On one machine Spark
cannot be faster than the local build (both use every core); the ratio shows its overhead, which a cluster pays
back by adding executors.
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from transformers import AutoTokenizer

from llmops_tpl.config import load_params, project_path
from llmops_tpl.documents import prepare_corpus
from llmops_tpl.index import embed_with_cache
from llmops_tpl.models import load_embedder, resolve_model
from llmops_tpl.spark import engine_session, spark_chunker, spark_encoder


def timed(f, *args, **kw):
    "`f(...)` and the seconds it took."
    t = time.perf_counter(); out = f(*args, **kw); return out, time.perf_counter() - t


def main(corpus, n_chunks):
    p = load_params()
    emb, prep = p['models']['embedder'], p['prepare']
    settings = (prep['chunk_tokens'], prep['overlap_tokens'], prep['strategy'], int(prep['max_file_mb'] * 2**20))
    tok = AutoTokenizer.from_pretrained(resolve_model(emb))
    spark, start = timed(engine_session, 'spark', p['index']['spark_master'])
    (there, _), spark_chunk_s = timed(prepare_corpus, corpus, tok, *settings, spark_chunker(spark, emb))
    (here, _), local_chunk_s = timed(prepare_corpus, corpus, tok, *settings)
    pd.testing.assert_frame_equal(there, here)
    texts = here.head(n_chunks)
    with tempfile.TemporaryDirectory() as d:
        encode = spark_encoder(spark, emb, p['index']['batch_size'])
        (v_spark, _), spark_embed_s = timed(embed_with_cache, texts, None, Path(d)/'spark.npz', encode=encode)
        model = load_embedder(emb, None)
        (v_local, _), local_embed_s = timed(embed_with_cache, texts, model, Path(d)/'local.npz', p['index']['batch_size'])
    print(f"{corpus}: {len(here):,} chunks; embedding the first {len(texts):,}; Spark {p['index']['spark_master']} "
          f"started in {start:.1f} s; largest vector difference {np.abs(v_spark - v_local).max():.1e}")
    print(f"{'step':>6} {'local s':>8} {'spark s':>8} {'spark / local':>13}")
    for step, a, b in [('chunk', local_chunk_s, spark_chunk_s), ('embed', local_embed_s, spark_embed_s)]:
        print(f"{step:>6} {a:>8.1f} {b:>8.1f} {b / a:>12.2f}x")


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('corpus', nargs='?', default=None)
    ap.add_argument('--chunks', type=int, default=600)
    a = ap.parse_args()
    main(Path(a.corpus) if a.corpus else project_path(load_params()['paths']['raw']), a.chunks)
