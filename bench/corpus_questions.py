"""What the `dataset` stage derives from a corpus, and how well dense and hybrid retrieval find the answers of its eval split.

Usage: .venv/bin/python bench/corpus_questions.py DIR [DIR ...] [--questions FILE] [--k 2] [--retrieval dense,hybrid] [--cache DIR]

For each corpus folder: `prepare_corpus` and `build_index` (a temporary folder, the project's embedder and `prepare`/`index`
parameters), then the `dataset` stage's derivation and split (`dataset` parameters), and hit@1, hit@k and MRR over the eval
split's gold chunks (all, and the curated ones apart) at k = `--k` and at 10 (for the MRR), for each kind of `--retrieval` over the same chunks and embeddings.
`--questions` adds a curated file (it must name that corpus's sources).
"""
import argparse
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from llmops_tpl.config import load_params
from llmops_tpl.dataset import collect_questions, split_by_document
from llmops_tpl.documents import prepare_corpus
from llmops_tpl.evaluate import reciprocal_rank
from llmops_tpl.index import Retriever, build_index
from llmops_tpl.models import load_embedder


def scores(retriever, evl, k):
    "hit@1 and hit@k of `retriever` searching 1 and k chunks (as serving does: a deeper search fuses more candidates), and MRR@10."
    ranked = lambda n: [[h['chunk_id'] for h in retriever.search(q, n)] for q in evl.question]
    hit = lambda n: round(sum(bool(set(r) & set(g)) for r, g in zip(ranked(n), evl.gold_chunk_ids)) / len(evl), 3)
    return {'hit@1': hit(1), f"hit@{k}": hit(k), 'MRR@10': round(sum(map(reciprocal_rank, ranked(10), evl.gold_chunk_ids)) / len(evl), 3)}


def measure(corpus, questions, k, kinds, cache, p):
    "Counts and retrieval figures for one corpus folder, one row per kind of retrieval."
    emb, d = p['models']['embedder'], p['dataset']
    chunks, files = prepare_corpus(corpus, load_embedder(emb).tokenizer, p['prepare']['chunk_tokens'], p['prepare']['overlap_tokens'])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if cache: shutil.copytree(cache, Path(tmp)/'cache')  # embeddings computed before (`paths.embed_cache`), left as they are
        for kind in kinds:
            t0 = time.perf_counter()
            build_index(chunks, Path(tmp)/kind, Path(tmp)/'cache', emb, retrieval=kind)
            retriever = Retriever(Path(tmp)/kind)
            if not rows:  # the questions and the split, as the dataset stage makes them
                qa = collect_questions(chunks, questions or Path(tmp)/'none.jsonl', None, d['max_examples'], d['seed'], retriever.closest)
                train, evl = split_by_document(qa, d['eval_share'], d['seed'])
                counts = {'corpus': Path(corpus).name, 'files': len(files), 'chunks': len(chunks),
                          **{f"q_{o}": n for o, n in qa.origin.value_counts().items()}, 'train': len(train), 'eval': len(evl)}
            mine = evl[evl.origin == 'curated']
            rows.append({**counts, 'retrieval': kind, **scores(retriever, evl, k), 'build_s': round(time.perf_counter() - t0, 1),
                         **({f"curated_{m}": v for m, v in scores(retriever, mine, k).items()} if len(mine) else {})})
    return rows


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('corpora', nargs='+')
    ap.add_argument('--questions', default=None)
    ap.add_argument('--k', type=int, default=2)
    ap.add_argument('--retrieval', default='dense,hybrid')
    ap.add_argument('--cache', default=None, help='a folder of embedding caches to start from (copied), e.g. data/embed_cache')
    a = ap.parse_args()
    rows = [r for c in a.corpora for r in measure(c, a.questions, a.k, a.retrieval.split(','), a.cache, load_params())]
    print(pd.DataFrame(rows).fillna(0).to_string(index=False))
