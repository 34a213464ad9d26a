"Hybrid retrieval (BM25 fused with the vectors) against the vectors alone, on real documentation asked about by exact API names."
from conftest import OWN_CORPUS
from llmops_tpl.documents import prepare_corpus
from llmops_tpl.index import Retriever, build_index
from llmops_tpl.models import load_embedder

EMB = 'sentence-transformers/all-MiniLM-L6-v2'


def test_hybrid_retrieval_finds_exact_api_names_that_dense_misses(tmp_path):
    chunks = prepare_corpus(OWN_CORPUS, load_embedder(EMB).tokenizer)[0]
    names = sorted({s for s in chunks.section if s and ' ' not in s and s[0].isupper()})  # sections named after an API: FileResponse...
    assert len(names) >= 20, names
    gold = [(f"What is {n} for?", set(chunks[chunks.section == n].chunk_id)) for n in names]
    hit_at_1 = {}
    for kind in ('dense', 'hybrid'):  # the same chunks and embeddings (one cache), two kinds of index
        build_index(chunks, tmp_path/kind, tmp_path/'cache', EMB, retrieval=kind)
        retriever = Retriever(tmp_path/kind)
        hit_at_1[kind] = sum(bool(g & {h['chunk_id'] for h in retriever.search(q, k=1)}) for q, g in gold) / len(gold)
    assert hit_at_1['hybrid'] >= hit_at_1['dense'] + 0.05, hit_at_1
