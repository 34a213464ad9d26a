"Every cache misses when one input that decides its content changes (data, a setting, the prompt, one line of its code) and hits when none does."
import inspect
import json
import shutil

import mlflow
import pandas as pd
import pytest

from conftest import ROOT
from llmops_tpl import evaluate, finetune, hub, index
from llmops_tpl.examples import fixture_index
from llmops_tpl.hub import DEFAULT_BASE_MODEL as BASE, fetch_base_model, recorded_base_model
from llmops_tpl.models import DEFAULT_EMBEDDER as EMBEDDER
from llmops_tpl.rag import LocalGenerator, RAGChain


def edited(func, old, new, tmp_path):
    "`func` with one line of its source changed, compiled from a file (so its source can be read) in its module's namespace."
    src = inspect.getsource(func)
    assert src.count(old) == 1, f"{old!r} is not one line of {func.__name__}"
    path = tmp_path/f"edited_{func.__name__}.py"
    path.write_text(src.replace(old, new))
    namespace = dict(vars(inspect.getmodule(func)))
    exec(compile(path.read_text(), str(path), 'exec'), namespace)
    return namespace[func.__name__]


@pytest.fixture(scope='module')
def base():
    return recorded_base_model()[0]  # converted once per machine, as the notebooks' examples share it


@pytest.fixture(scope='module')
def chain(base, tmp_path_factory):
    index_dir = fixture_index(tmp_path_factory.mktemp('index'))
    mlflow.tracing.disable()  # these answers are not traffic to trace
    yield RAGChain(index.Retriever(index_dir), LocalGenerator(base), k=2, max_new_tokens=4)
    mlflow.tracing.enable()


def test_evaluation_cache_misses_on_a_new_prompt_scoring_line_or_setting_and_hits_unchanged(chain, base, tmp_path, monkeypatch):
    rows = pd.read_json(ROOT/'tests'/'fixtures'/'eval.jsonl', lines=True).head(1)[['question', 'reference', 'gold_chunk_ids']]
    rows, identity = rows.to_dict('records'), {'base_weights_sha256': 'x', 'k': 2, 'max_new_tokens': 4}
    built = []
    def evaluated(identity=identity):
        scored, cached = evaluate.evaluate_variant('base', identity, rows, lambda: built.append(1) or chain, tmp_path/'cache')
        return cached
    assert (evaluated(), evaluated()) == (False, True), 'an unchanged rerun reads the cache'
    assert not evaluated({**identity, 'max_new_tokens': 16}), 'a setting'
    index_dir = fixture_index(tmp_path/'index')
    variants = evaluate.Variants(index_dir, 2, 4, base, hub.recorded_base_model()[1])
    prompted = variants.identity('base')
    assert (evaluated(prompted), evaluated(prompted)) == (False, True), 'a variant as the evaluate stage names it'
    reworded = evaluate.Variants(index_dir, 2, 4, base, hub.recorded_base_model()[1],
                                 system_prompt='Answer in one word.')
    assert not evaluated(reworded.identity('base')), 'the system prompt'
    assert reworded.chain('base').system_prompt == 'Answer in one word.', 'the chain asks with the prompt its identity names'
    with monkeypatch.context() as m:
        m.setattr(evaluate, 'score_rows', edited(evaluate.score_rows, 'token_f1(a, ref)', 'round(token_f1(a, ref), 3)', tmp_path))
        assert not evaluated(), 'one line of the scoring code'
    assert evaluated() and len(built) == 5, 'the original inputs hit again'


def test_fine_tuning_run_key_changes_with_the_code_chat_template_data_or_a_setting(base, tmp_path, monkeypatch):
    train = tmp_path/'train.jsonl'
    train.write_text(json.dumps({'prompt': [{'role': 'user', 'content': 'q'}], 'completion': [{'role': 'assistant', 'content': 'a'}]}) + '\n')
    key = finetune.run_key(base, train, {'lr': 1e-3})
    assert finetune.run_key(base, train, {'lr': 1e-3}) == key, 'unchanged: the same checkpoint folder, so the run resumes'
    assert finetune.run_key(base, train, {'lr': 2e-3}) != key, 'a setting'
    other = tmp_path/'other.jsonl'
    other.write_text(train.read_text().replace('"a"', '"b"'))
    assert finetune.run_key(base, other, {'lr': 1e-3}) != key, 'the training data'
    templated = tmp_path/'templated'
    templated.mkdir()
    for f in base.iterdir(): (templated/f.name).symlink_to(f)
    (templated/'chat_template.jinja').unlink(missing_ok=True)
    (templated/'chat_template.jinja').write_text('{% for m in messages %}{{ m.content }}{% endfor %}')
    assert finetune.run_key(templated, train, {'lr': 1e-3}) != key, 'the chat template (same weights)'
    with monkeypatch.context() as m:
        m.setattr(finetune, 'finetune', edited(finetune.finetune, 'trainer.train(resume_from_checkpoint=last)',
                                               'trainer.train(resume_from_checkpoint=last)  # a comment', tmp_path))
        assert finetune.run_key(base, train, {'lr': 1e-3}) == key, 'a comment is not code: the run resumes'
    monkeypatch.setattr(finetune, 'finetune', edited(finetune.finetune, 'trainer.train(resume_from_checkpoint=last)',
                                                     'trainer.train(resume_from_checkpoint=last or None)', tmp_path))
    assert finetune.run_key(base, train, {'lr': 1e-3}) != key, 'one line of the training code'


def test_embedding_cache_misses_when_the_embedding_code_changes(tmp_path, monkeypatch):
    chunks = pd.read_parquet(ROOT/'tests'/'fixtures'/'chunks.parquet')
    build = lambda: index.build_index(chunks, tmp_path/'index', tmp_path/'embed_cache', EMBEDDER)['cache']
    texts = len(chunks) + len(index.section_summaries(chunks))  # the chunks and their sections' summaries
    assert build()['embedded'] == texts
    assert build() == {'embedded': 0, 'reused': texts, 'dropped': 0}, 'unchanged: every vector from the cache'
    monkeypatch.setattr(index, 'embed_with_cache', edited(index.embed_with_cache, 'batch_size=batch_size,',
                                                          'batch_size=batch_size, show_progress_bar=False,', tmp_path))
    assert build()['embedded'] == texts, 'one line of the embedding code: every text embedded again'


def test_base_model_is_converted_again_when_the_converter_changes(base, tmp_path, monkeypatch):
    hub_dir = tmp_path/'hub'
    shutil.copytree(base, hub_dir/base.name)  # a hub holding this converter's conversion
    weights = lambda: (hub_dir/base.name/'model.safetensors').stat().st_mtime_ns
    before = weights()
    folder, prov = fetch_base_model(BASE, hub_dir)
    assert weights() == before, 'the same file and converter: not converted again'
    monkeypatch.setattr(hub, 'convert_gguf', edited(hub.convert_gguf, 'gguf, out_dir = Path(gguf), Path(out_dir)',
                                                    'gguf, out_dir = Path(gguf).absolute(), Path(out_dir)', tmp_path))
    folder, again = fetch_base_model(BASE, hub_dir)
    assert weights() != before and again['converter_sha256'] != prov['converter_sha256'], 'a new converter converts again'
    assert again['weights_sha256'] == prov['weights_sha256'], 'and the conversion is deterministic'
