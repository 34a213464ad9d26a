"""Base model against the fine-tuned model on the held-out eval split, under the same retrieval.

Usage: .venv/bin/python bench/finetune_quality.py [--limit 40]   (after `llmops-tpl repro`: reads the index, eval set, base and adapter)

For the first `limit` eval questions, both models answer over the same `dataset.k` retrieved passages with greedy decoding; printed:
mean token F1 against the reference answer, mean semantic similarity (the embedder's cosine), and the share of answers citing a
retrieved source, with the fine-tuned minus base margin. The evaluation stage (ragas, quality gate) will take this over.
"""
import argparse
import json

import mlflow
import pandas as pd

from llmops_tpl.config import load_params, project_path
from llmops_tpl.index import Retriever
from llmops_tpl.rag import LocalGenerator, RAGChain, score_answers


def main(limit):
    mlflow.tracing.disable()  # a benchmark: no traces
    p = load_params()
    paths = p['paths']
    retriever = Retriever(project_path(paths['index']))
    evl = pd.read_json(project_path(paths['dataset'])/'eval.jsonl', lines=True).head(limit).to_dict('records')
    base = project_path(json.loads(project_path(paths['base_model']).read_text())['path'])
    results = {}
    for name, adapter in [('base', None), ('fine-tuned', project_path(paths['adapter']))]:
        results[name] = score_answers(evl, RAGChain(retriever, LocalGenerator(base, adapter), p['dataset']['k'], max_new_tokens=64))
    table = pd.DataFrame({n: {'token_f1': r.token_f1.mean(), 'similarity': r.similarity.mean(), 'cites_source': r.cites_source.mean()}
                          for n, r in results.items()})
    table['margin'] = table['fine-tuned'] - table['base']
    print(f"{len(evl)} held-out questions, k={p['dataset']['k']}")
    print(table.round(3).to_string())
    for q, b, f in list(zip(results['base'].question, results['base'].answer, results['fine-tuned'].answer))[:3]:
        print(f"\nQ: {q}\n  base:       {b[:200]}\n  fine-tuned: {f[:200]}")


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--limit', type=int, default=40)
    main(ap.parse_args().limit)
