"""Base model against the fine-tuned model on the held-out eval split, under the same retrieval, scored as the evaluation scores.

Usage: .venv/bin/python bench/finetune_quality.py [--limit 40]   (after `llmops-tpl repro`: reads the index, eval set, base and adapter)

For the first `limit` eval questions, both models answer over the same `dataset.k` retrieved passages with greedy decoding
(`evaluate.answer_all`), scored by `evaluate.score_rows`; printed: ragas' semantic similarity to the reference, token F1, the share
of answers citing a retrieved source and the share citing the document that holds the answer, with the fine-tuned minus base margin.
Unlike the evaluate stage, nothing is cached and no gate is applied: a quick look after changing the training recipe.
"""
import argparse
import json

import mlflow
import pandas as pd

from llmops_tpl.config import load_params, project_path
from llmops_tpl.evaluate import LocalEmbeddings, answer_all, cites_answer_source, score_rows, summarize
from llmops_tpl.index import Retriever
from llmops_tpl.rag import LocalGenerator, RAGChain

SHOWN = ['similarity', 'token_f1', 'cites_source', 'cites_answer_source']


def main(limit):
    mlflow.tracing.disable()  # a benchmark: no traces
    p = load_params()
    paths = p['paths']
    retriever = Retriever(project_path(paths['index']))
    evl = pd.read_json(project_path(paths['dataset'])/'eval.jsonl', lines=True).head(limit)
    base = project_path(json.loads(project_path(paths['base_model']).read_text())['path'])
    results = {}
    for name, adapter in [('base', None), ('fine-tuned', project_path(paths['adapter']))]:
        chain = RAGChain(retriever, LocalGenerator(base, adapter), p['dataset']['k'], p['rag']['max_new_tokens'])
        scored = score_rows(answer_all(evl.to_dict('records'), chain, f"answering ({name})"), LocalEmbeddings(retriever.model))
        results[name] = scored.assign(cites_answer_source=cites_answer_source(scored.answer, evl.source.tolist()))
    table = pd.DataFrame({n: {m: summarize(r)[m] for m in SHOWN} for n, r in results.items()})
    table['margin'] = table['fine-tuned'] - table['base']
    print(f"{len(evl)} held-out questions, k={p['dataset']['k']}")
    print(table.round(3).to_string())
    for q, b, f in list(zip(results['base'].question, results['base'].answer, results['fine-tuned'].answer))[:3]:
        print(f"\nQ: {q}\n  base:       {b[:200]}\n  fine-tuned: {f[:200]}")


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--limit', type=int, default=40)
    main(ap.parse_args().limit)
