"The pipeline from a fresh clone: corpus, chunks, index, search, incremental refresh, bad input, no-op rerun."
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import BIN, OWN_CORPUS, OWN_QUESTIONS, ROOT, copy_project, read_json, run
from llmops_tpl.index import Retriever

# (question, pages that answer it): retrieval must put one of them in the top 5
GOLD = [
    ('run a task after the response has been sent', ['background.md']),
    ('serve the files of a folder', ['staticfiles.md']),
    ('run code when the application starts and stops', ['lifespan.md']),
    ('handle each HTTP method in a method of a class', ['endpoints.md']),
    ('render an HTML page from a Jinja2 template', ['templates.md']),
    ('accept a websocket connection and send it text', ['websockets.md']),
    ('show a custom page for 404 errors', ['exceptions.md']),
    ('only let logged-in users call an endpoint', ['authentication.md']),
    ('read settings from environment variables', ['config.md']),
    ('read the JSON body of a request', ['requests.md']),
    ('set a cookie on the response', ['responses.md']),
    ('call my app in tests without starting a server', ['testclient.md']),
]


def embedded_texts(project):
    "Content hashes of what the project's index embedded: its chunks and its sections' summaries."
    index = project/'data'/'index'
    hashes = lambda name: set(pd.read_parquet(index/name).content_hash)
    return hashes('chunks.parquet') | hashes('summaries.parquet')


def test_fresh_clone_builds_corpus_chunks_and_index(small_project):
    prep, idx = read_json(small_project/'metrics'/'prepare.json'), read_json(small_project/'metrics'/'index.json')
    chunks = pd.read_parquet(small_project/'data'/'chunks.parquet')
    assert set(chunks.source) == {p.name for p in OWN_CORPUS.iterdir()}
    assert prep['chunks'] == len(chunks) == idx['chunks'] > 100
    assert idx['cache_embedded'] == len(embedded_texts(small_project)) > len(chunks) and idx['cache_reused'] == 0
    assert 0 < idx['summaries'] < len(chunks), 'a summary for each section, fewer than its chunks'
    assert chunks.chunk_id.is_unique and chunks.n_tokens.max() <= 200
    assert (small_project/'reports'/'prepare.ipynb').exists() and (small_project/'plots'/'chunk_lengths.png').stat().st_size > 1000
    dvc_file = yaml.safe_load((small_project/'data.dvc').read_text())['outs'][0]
    assert (dvc_file['path'], dvc_file['nfiles']) == ('data/raw', len(list(OWN_CORPUS.iterdir()))), 'data.dvc records the new corpus'
    assert run(['git', 'status', '--porcelain', 'data.dvc'], small_project).stdout.strip(), 'data.dvc changed, to be committed'
    assert read_json(small_project/'metrics'/'dataset.json')['eval_questions_curated'] == len(OWN_QUESTIONS.read_text().splitlines())


def test_retrieval_hit_at_5_on_gold_set(small_project):
    retriever = Retriever(small_project/'data'/'index')
    hits = {q: [h['source'] for h in retriever.search(q, k=5)] for q, _ in GOLD}
    found = [bool(set(hits[q]) & set(ok)) for q, ok in GOLD]
    assert sum(found) / len(GOLD) >= 0.9, {q: hits[q] for (q, _), f in zip(GOLD, found) if not f}


def test_cli_search_prints_passages_with_scores(small_project):
    out = run([BIN/'llmops-tpl', 'search', 'serve the files of a folder', '-k', '3'], small_project).stdout
    heads = [line.split() for line in out.splitlines() if line and not line.startswith(' ')]
    scores = [float(h[0]) for h in heads]  # cosine similarities; the order is the hybrid ranking's, not theirs
    assert len(heads) == 3 and all(0 < s <= 1 for s in scores) and scores[0] > 0.3, out
    assert heads[0][1] == 'staticfiles.md', out


def test_second_repro_is_a_fast_noop(small_project):
    "The whole pipeline right after a repro (which takes in whatever other tests did to the project): nothing to do."
    run([BIN/'dvc', 'repro'], small_project)
    start = time.perf_counter()
    res = run([BIN/'dvc', 'repro'], small_project)
    elapsed = time.perf_counter() - start
    assert 'Data and pipelines are up to date' in res.stdout + res.stderr
    assert elapsed < 5, f"no-op repro took {elapsed:.1f}s"
    assert read_json(small_project/'metrics'/'app.json')['sources'] > 0  # the app's smoke test ran in the fixture's repro


@pytest.fixture(scope='module')
def refreshed(small_project, tmp_path_factory):
    "A copy of the project refreshed (a document changed, one deleted, bad inputs added); its chunks before and after, what it embedded before."
    project = tmp_path_factory.mktemp('refreshed')/'project'
    copy_project(small_project, project)  # the shared project stays as the other tests expect it
    before, embedded_before = pd.read_parquet(project/'data'/'chunks.parquet'), embedded_texts(project)
    raw = project/'data'/'raw'
    with open(raw/'background.md', 'a') as f: f.write('\n## Retrying a task\n\nA section added by the refresh test, about retries.\n')
    (raw/'applications.md').unlink()
    shutil.copytree(ROOT/'tests'/'fixtures'/'corpus', raw/'fixtures')
    (raw/'fixtures'/'big.md').write_text('# Big\n\n' + 'a large file of repeated words. ' * 4000)  # ~128 KB > max_file_mb
    (raw/'fixtures'/'archive.md').write_bytes(bytes(range(1, 256)) * 40)  # a binary with no NUL byte: garbled text, not chunks
    interrupt_the_index_stage(project)
    assert embedded_texts(project) == embedded_before, 'an interrupted refresh leaves the index as it was'
    run([BIN/'dvc', 'repro', 'index'], project)  # the stages after it are not this test's subject
    return project, before, pd.read_parquet(project/'data'/'chunks.parquet'), embedded_before


def interrupt_the_index_stage(project):
    "Start `dvc repro index` and press Ctrl-C a few seconds into the `index` stage."
    env = {**os.environ, 'PATH': f"{BIN}{os.pathsep}{os.environ['PATH']}", 'PYTHONUNBUFFERED': '1'}  # each line as written
    proc = subprocess.Popen([BIN/'dvc', 'repro', 'index'], cwd=project, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,  # Ctrl-C acts, as at a terminal,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even if ours is ignored
    for line in proc.stdout:
        if "Running stage 'index'" in line: break
    time.sleep(3)  # the stage has started: DVC would have removed an output it does not keep by now
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode != 0, 'the stage was interrupted, not finished'


def test_incremental_refresh_embeds_only_changed_chunks(refreshed):
    project, before, after, embedded_before = refreshed
    old, new = embedded_before, embedded_texts(project)  # chunks and summaries
    idx = read_json(project/'metrics'/'index.json')
    assert idx['cache_embedded'] == len(new - old) and idx['cache_dropped'] == len(old - new)
    assert 0 < idx['cache_embedded'] < 0.2 * len(new)
    assert idx['cache_reused'] == len(new & old) and idx['chunks'] == len(after)
    assert 'applications.md' in set(before.source) - set(after.source)


def test_bad_input_is_counted_not_fatal(refreshed):
    project, _, after, _ = refreshed
    prep = read_json(project/'metrics'/'prepare.json')
    assert {k: prep[f"files_{k}"] for k in ['empty', 'binary', 'unsupported', 'unreadable', 'undecodable', 'truncated']} == \
           dict(empty=1, binary=2, unsupported=1, unreadable=1, undecodable=1, truncated=1)
    assert {'fixtures/latin1.txt', 'fixtures/big.md', 'fixtures/evaluation.pdf'} <= set(after.source)
    assert not {'fixtures/empty.md', 'fixtures/image.txt', 'fixtures/archive.md', 'fixtures/notes.docx', 'fixtures/broken.pdf'} & set(after.source)


def test_chunk_size_beyond_the_embedder_fails_clearly(tmp_path):
    res = run([BIN/'papermill', 'nbs/stages/10_prepare.ipynb', str(tmp_path/'out.ipynb'), '-p', 'chunk_tokens', '300',
               '-p', 'out_dir', str(tmp_path)], ROOT, check=False)
    assert res.returncode != 0 and 'prepare.chunk_tokens=300 exceeds what' in res.stderr
    assert not (tmp_path/'chunks.parquet').exists()


def test_fresh_clone_pulls_the_exact_corpus_from_a_dvc_remote(small_project, tmp_path):
    project = tmp_path/'project'  # a copy: the remote and its commit stay out of the shared project
    copy_project(small_project, project)
    remote = tmp_path/'remote'
    run([BIN/'dvc', 'remote', 'add', '-d', 'storage', str(remote)], project)
    run([BIN/'dvc', 'commit', '-f', 'data.dvc'], project)
    run([BIN/'dvc', 'push', 'data.dvc'], project)
    run(['git', 'add', '-A'], project)
    run(['git', '-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'remote'], project)
    clone = tmp_path/'clone'
    run(['git', 'clone', '-q', str(project), str(clone)], tmp_path)
    assert run([BIN/'llmops-tpl', 'corpus'], clone).stdout.startswith('corpus pulled')
    files = lambda d: {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob('*') if p.is_file()}
    assert files(clone/'data'/'raw') == files(project/'data'/'raw')


def test_reviewed_feedback_reaches_the_next_round_scrubbed_with_provenance(refreshed, tmp_path):
    "An accepted correction becomes a training example and a regression question; unreviewed feedback does not; personal data is scrubbed."
    from llmops_tpl.feedback import add_feedback, open_store, review
    small_project = refreshed[0]  # a copy: the new round's data stays out of the shared project
    store_url = f"sqlite:///{tmp_path/'feedback.db'}"
    store = open_store(store_url)
    fid = add_feedback(store, 'How do I parse JSON text? Mail me at ana@example.com', 'No idea.', 'down', 'unhelpful',
                       'Call json.loads(text); ring +34 612 345 678 if not.', trace_id='tr-abc', model_version=1, user='ana')
    add_feedback(store, 'Nobody reviewed this one', 'a', 'down', correction='not yet reviewed', user='ben')
    review(store, fid, 'accepted', 'rita', 'a real failure')
    out = run([BIN/'llmops-tpl', 'repro', 'dataset'], small_project, env={'LLMOPS_FEEDBACK_STORE': store_url}).stdout
    assert 'feedback exported: 1 reviewed rows' in out
    lines = lambda name: [json.loads(line) for line in (small_project/'data'/'dataset'/name).read_text().splitlines()]
    correction = 'Call json.loads(text); ring [phone] if not.'
    assert lines('train.jsonl')[-1]['completion'] == [{'role': 'assistant', 'content': correction}]
    assert 'Mail me at [email]' in lines('train.jsonl')[-1]['prompt'][-1]['content']
    assert not any('not yet reviewed' in json.dumps(e) for e in lines('train.jsonl'))
    [reg] = lines('regression.jsonl')
    assert (reg['reference'], reg['feedback_id'], reg['trace_id'], reg['reviewer'], reg['model_version']) == (correction, fid, 'tr-abc', 'rita', '1')
    assert {e['use'] for e in lines('feedback.jsonl')} == {'train', 'regression', 'preference'}  # the correction over the answer
    [pair] = lines('preferences.jsonl')  # and a preference pair: the correction over the answer
    assert (pair['chosen'][0]['content'], pair['rejected'][0]['content']) == (correction, 'No idea.')
    metrics = read_json(small_project/'metrics'/'dataset.json')
    assert (metrics['feedback_train_examples'], metrics['regression_questions']) == (1, 1)
