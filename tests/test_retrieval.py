"Hybrid retrieval (BM25 fused with the vectors) against the vectors alone, on real documentation asked about by exact API names."
import re
from collections import Counter

from conftest import OWN_CORPUS
from llmops_tpl.documents import prepare_corpus
from llmops_tpl.index import Retriever, build_index
from llmops_tpl.models import load_embedder

EMB = 'sentence-transformers/all-MiniLM-L6-v2'


def api_names_in_text_only(chunks):
    "Code names (`max_age`, `WebSocketRoute`) in one chunk's text and in no heading, where summaries cannot help."
    named = chunks.text.map(lambda t: set(re.findall(r'`([A-Za-z_][\w.]*)`', t)))
    once = Counter(n for names in named for n in names)
    code = [n for n, c in once.items() if c == 1 and len(n) >= 6 and ('_' in n or re.search(r'[a-z][A-Z]', n))]
    headings = ' '.join(chunks.section.fillna(''))
    return {n: set(chunks[named.map(lambda names: n in names)].chunk_id) for n in sorted(code) if n not in headings}


def test_hybrid_retrieval_finds_exact_api_names_that_dense_misses(tmp_path):
    chunks = prepare_corpus(OWN_CORPUS, load_embedder(EMB).tokenizer)[0]
    gold = api_names_in_text_only(chunks)
    assert len(gold) >= 20, gold
    hit_at_1 = {}
    for kind in ('dense', 'hybrid'):  # the same chunks and embeddings (one cache), two kinds of index
        build_index(chunks, tmp_path/kind, tmp_path/'cache', EMB, retrieval=kind)
        retriever = Retriever(tmp_path/kind)
        hit_at_1[kind] = sum(bool(g & {h['chunk_id'] for h in retriever.search(f"What is `{n}` for?", k=1)})
                             for n, g in gold.items()) / len(gold)
    assert hit_at_1['hybrid'] >= hit_at_1['dense'] + 0.2, hit_at_1
