"The evaluate stage of a fresh clone, and honest metrics: a broken retriever and a broken generator score lower and trip the gate."
import random

import mlflow
import pandas as pd
import pytest

from conftest import read_json
from llmops_tpl.evaluate import LocalEmbeddings, answer_all, gate, gate_message, score_rows, summarize
from llmops_tpl.index import Retriever
from llmops_tpl.rag import LocalGenerator, RAGChain


class RandomRetriever:
    "A broken retriever: random passages, whatever the question."
    release = 'random'  # what answers name as their index, as a `Retriever`'s release
    def __init__(self, retriever): self.model, self.chunks, self.rng = retriever.model, retriever.chunks, random.Random(0)
    def search(self, query, k): return [{**self.chunks.iloc[i].to_dict(), 'score': 0.0} for i in self.rng.sample(range(len(self.chunks)), k)]


class PassageGenerator:
    "A generator with no model: it answers with the first sentence of the first passage, citing it (fast, and as good as the retrieval)."
    name = 'first-passage'
    def complete(self, messages, max_new_tokens=0):
        body = messages[-1]['content'].split('Passages:\n\n', 1)[1]
        source, text = body.split(']\n', 1)
        return {'text': f"{text.split('. ')[0]}. {source}]", 'prompt_tokens': 0, 'completion_tokens': 0}


class EmptyGenerator:
    "A broken generator: empty answers."
    name = 'empty'
    def complete(self, messages, max_new_tokens=0): return {'text': '', 'prompt_tokens': 0, 'completion_tokens': 0}


@pytest.fixture(scope='module')
def setting(small_project):
    retriever = Retriever(small_project/'data'/'index')
    evl = pd.read_json(small_project/'data'/'dataset'/'eval.jsonl', lines=True)
    rows = evl[evl.origin == 'section'].head(8).to_dict('records')  # derived questions: their gold chunk is exact
    mlflow.tracing.disable()  # these answers are not traffic: no traces (they would go to the default store in the working directory)
    yield retriever, rows, LocalEmbeddings(retriever.model)
    mlflow.tracing.enable()


def score(rows, chain, emb): return summarize(score_rows(answer_all(rows, chain), emb))


def test_evaluate_stage_writes_metrics_gate_and_links_register(small_project):
    ev = read_json(small_project/'metrics'/'eval.json')
    assert set(ev) == {'base', 'finetuned'} and ev['base']['questions'] == 6
    assert ev['base']['hit_at_k'] == ev['finetuned']['hit_at_k'], 'same retrieval for both variants'
    verdict = read_json(small_project/'metrics'/'gate.json')
    assert verdict['candidate'] == 'finetuned' and verdict['passed'] is False, 'the clone sets an unreachable similarity floor'
    assert any(c['metric'] == 'similarity' and not c['passed'] for c in verdict['checks'])
    reg = read_json(small_project/'metrics'/'register.json')
    assert (reg['gate'], reg['challenger']) == ('failed', False)
    table = pd.read_csv(small_project/'reports'/'eval_questions.csv')
    assert len(table) == 12 and set(table.variant) == {'base', 'finetuned'}


def test_a_broken_retriever_scores_clearly_lower_and_trips_the_gate(setting):
    retriever, rows, emb = setting
    good = score(rows, RAGChain(retriever, PassageGenerator(), k=2), emb)
    broken = score(rows, RAGChain(RandomRetriever(retriever), PassageGenerator(), k=2), emb)
    assert good['hit_at_k'] >= 0.5 and broken['hit_at_k'] <= good['hit_at_k'] - 0.4, (good, broken)
    assert broken['context_recall'] < good['context_recall'] and broken['similarity'] < good['similarity']
    floors = {'hit_at_k': 0.5, 'context_recall': 0.5}
    assert gate({'good': good}, 'good', floors)['passed']
    verdict = gate({'broken': broken}, 'broken', floors)
    assert not verdict['passed'] and 'hit_at_k = ' in gate_message(verdict)


def test_a_broken_generator_scores_clearly_lower_and_trips_the_gate(small_project, setting):
    retriever, rows, emb = setting
    base = small_project/read_json(small_project/'models'/'base_model.json')['path']
    real = score(rows[:4], RAGChain(retriever, LocalGenerator(base), k=2, max_new_tokens=24), emb)
    empty = score(rows[:4], RAGChain(retriever, EmptyGenerator(), k=2), emb)
    assert empty['similarity'] < real['similarity'] - 0.2 and empty['token_f1'] == 0.0, (real, empty)
    verdict = gate({'base': real, 'empty': empty}, 'empty', {'similarity': 0.3}, {'similarity': 0.0})
    assert not verdict['passed'] and 'similarity = ' in gate_message(verdict)
