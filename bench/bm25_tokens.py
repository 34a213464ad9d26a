"""Would BM25 read the corpus better with identifiers split (`log_metric` also as `log metric`, `LoraConfig` as `lora config`)
or with words stemmed (PyStemmer)? Hit@2 of the fused ranking, as the served retriever fuses it, on the eval split, its curated
questions and 200 training questions.

Usage: .venv/bin/pip install pystemmer && .venv/bin/python bench/bm25_tokens.py
(after `llmops-tpl repro`: it reads the project's chunks, index and curated questions)

The dense side is the project's index (its chunk vectors and section summaries); each BM25 variant is indexed anew over the
same texts the index gives BM25 (`bm25_documents`). Measured 2026-12-03 on the default corpus (eval 63, curated 25, train 200):
fused hit@2 as served 0.746 / 0.44 / 0.945; identifiers split 0.714 / 0.40 / 0.94; stemmed 0.73 / 0.40 / 0.95; both 0.683 /
0.32 / 0.945. Neither was adopted.
"""
import re

import bm25s
import pandas as pd
import Stemmer

from llmops_tpl.config import load_params, project_path
from llmops_tpl.dataset import collect_questions, split_by_document
from llmops_tpl.index import Retriever, bm25_documents, fuse_rankings


def split_identifiers(text):
    "`text` with each snake_case or CamelCase word followed by its parts."
    def parts(m):
        words = re.sub(r'([a-z0-9])([A-Z])', r'\1 \2', m.group(0)).replace('_', ' ').split()
        return m.group(0) + (' ' + ' '.join(words) if len(words) > 1 else '')
    return re.sub(r'\w+', parts, text)


def main():
    p = load_params(); d = p['dataset']
    served = Retriever(project_path(p['paths']['index']))
    chunks = pd.read_parquet(project_path(p['paths']['chunks']))
    qa = collect_questions(chunks, project_path(p['paths']['questions']), None, d['max_examples'], d['seed'], served.closest)
    train, evl = split_by_document(qa, d['eval_share'], d['seed'])
    sets = {'eval': evl, 'curated': evl[evl.origin == 'curated'], 'train200': train.sample(200, random_state=0)}
    stem = Stemmer.Stemmer('english').stemWords
    labels = served.chunks.chunk_id.tolist()
    docs = bm25_documents(served.chunks)
    dense = {q: served._nearest(served.model.encode([q], normalize_embeddings=True), 20) for t in sets.values() for q in t.question}
    for name, split, stemmer in [('as served', False, None), ('identifiers split', True, None), ('stemmed', False, stem),
                                 ('both', True, stem)]:
        tokens = lambda texts: bm25s.tokenize([split_identifiers(t) if split else t for t in texts], stopwords='en',
                                              stemmer=stemmer, show_progress=False)
        bm25 = bm25s.BM25(); bm25.index(tokens(docs), show_progress=False)
        def top2(q):
            ids, scores = bm25.retrieve(tokens([q]), k=20, show_progress=False)
            return [labels[i] for i in fuse_rankings([dense[q], [int(i) for i, s in zip(ids[0], scores[0]) if s > 0]])[:2]]
        hit = {s: round(sum(bool(set(top2(q)) & set(g)) for q, g in zip(t.question, t.gold_chunk_ids)) / len(t), 3)
               for s, t in sets.items()}
        print(f"{name:18s}", hit)


if __name__ == '__main__':
    main()
