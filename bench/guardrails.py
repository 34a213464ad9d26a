"""The gateway's default guardrails on each corpus's questions and on the API route's requests, then on a labelled set.

Usage: .venv/bin/python bench/guardrails.py DIR[=QUESTIONS] [DIR[=QUESTIONS] ...] [--cache DIR] [--cases FILE]

For each corpus folder (and its curated questions file, if given): the questions the `dataset` stage derives from it, all of them
and its eval split apart, each checked by `gateway.guardrails` (params.yaml) twice: alone, as the app's question reaches the
`champion` endpoint, and inside the request the API route sends (the question under its `dataset.k` passages, retrieved as the
index is built by default). Refused requests are the false positives (target: none); redacted ones are counted by kind of
personal data. Then the labelled set (`--cases`, default bench/guardrail_cases.jsonl): each kind of personal data found or not,
each injection refused or not, and false alarms on the texts that hold neither.
"""
import argparse
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import pandas as pd

from llmops_tpl.config import load_params
from llmops_tpl.dataset import collect_questions, rag_messages, split_by_document
from llmops_tpl.documents import prepare_corpus
from llmops_tpl.guardrails import guard_messages, plan_guardrails, redact
from llmops_tpl.index import Retriever, build_index
from llmops_tpl.models import load_embedder


def checked(requests, rules):
    "Refused and redacted requests among `requests` (lists of messages), and the kinds redacted."
    verdicts = [guard_messages(m, rules)[1] for m in requests]
    kinds = Counter(k for v in verdicts if v['action'] == 'redacted' for k in v['entities'])
    return {'refused': sum(v['action'] == 'refused' for v in verdicts), 'redacted': sum(v['action'] == 'redacted' for v in verdicts),
            'kinds': dict(kinds) or '-'}


def corpus_rows(arg, cache, p, rules):
    "One row per question set of a corpus: how the guardrails treat its questions alone and inside the API route's requests."
    corpus, _, questions = arg.partition('=')
    chunks, files = prepare_corpus(corpus, load_embedder(p['models']['embedder']).tokenizer, p['prepare']['chunk_tokens'],
                                   p['prepare']['overlap_tokens'])
    with tempfile.TemporaryDirectory() as tmp:
        if cache: shutil.copytree(cache, Path(tmp)/'cache')
        build_index(chunks, Path(tmp)/'index', Path(tmp)/'cache', p['models']['embedder'], retrieval=p['index']['retrieval'])
        retriever = Retriever(Path(tmp)/'index')
        qa = collect_questions(chunks, questions or Path(tmp)/'none.jsonl', None, p['dataset']['max_examples'], p['dataset']['seed'],
                               retriever.closest)
        _, evl = split_by_document(qa, p['dataset']['eval_share'], p['dataset']['seed'])
        rows = []
        for name, q in (('all', qa), ('eval', evl)):
            requests = [rag_messages(x, retriever.search(x, p['dataset']['k'])) for x in q.question]
            alone = checked([[{'role': 'user', 'content': x}] for x in q.question], rules)
            t0 = time.perf_counter()
            routed = checked(requests, rules)
            rows.append({'corpus': Path(corpus).name, 'files': len(files), 'chunks': len(chunks), 'questions': name, 'n': len(q),
                         **{f"alone_{k}": v for k, v in alone.items()}, **{f"api_{k}": v for k, v in routed.items()},
                         'api_ms_per_request': round((time.perf_counter() - t0) * 1000 / len(q), 1)})
    return rows


def labelled(cases, rules):
    "Detection by kind, refusal of injections, and false alarms on the labelled cases."
    rows, alarms, clean = Counter(), 0, 0
    for c in cases:
        verdict = guard_messages([{'role': 'user', 'content': c['text']}], rules)[1]
        found = set(redact(c['text'], rules['entities'])[1])
        if 'refused' in c: rows[('prompt_injection', verdict['reason'] == c['refused'])] += 1
        for kind in c.get('entities', []): rows[(kind, kind in found)] += 1
        if 'refused' not in c and not c.get('entities'):
            clean += 1
            alarms += bool(found or verdict['action'])
    kinds = sorted({k for k, _ in rows})
    table = pd.DataFrame([{'kind': k, 'cases': rows[(k, True)] + rows[(k, False)], 'detected': rows[(k, True)]} for k in kinds])
    return table.assign(rate=(table.detected / table.cases).round(3)), alarms, clean


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('corpora', nargs='*')
    ap.add_argument('--cache', default=None, help='a folder of embedding caches to start from (copied), e.g. data/embed_cache')
    ap.add_argument('--cases', default=Path(__file__).parent/'guardrail_cases.jsonl')
    a = ap.parse_args()
    p = load_params()
    rules = plan_guardrails(p['gateway']['guardrails'])
    if a.corpora:
        print(pd.DataFrame([r for c in a.corpora for r in corpus_rows(c, a.cache, p, rules)]).to_string(index=False))
    # AWS's documented example key, assembled here so that no key-shaped string is committed
    cases = Path(a.cases).read_text().replace('{aws_example_key}', 'AKIA' + 'IOSFODNN7EXAMPLE')
    table, alarms, clean = labelled([json.loads(l) for l in cases.splitlines() if l.strip()], rules)
    print(table.to_string(index=False))
    print(f"detected {table.detected.sum()} of {table.cases.sum()} ({table.detected.sum() / table.cases.sum():.3f}); "
          f"false alarms on {alarms} of {clean} clean texts")
