"The pipeline from a fresh clone: corpus, chunks, index, search, incremental refresh, bad input, no-op rerun."
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import BIN, ROOT, read_json, run
from llmops_tpl.index import Retriever

# (question, sections that answer it): retrieval must put one of them in the top 5
GOLD = [
    ('serialize a Python object to a JSON formatted string', ['json.dumps', 'json.JSONEncoder.encode']),
    ('parse command line arguments', ['argparse.ArgumentParser']),
    ('run a child program and wait for it to complete', ['subprocess.run', 'subprocess.call', 'subprocess.check_call', 'subprocess.Popen.wait']),
    ('read the contents of a file tracked by DVC', ['dvc.api.read', 'dvc.api.open']),
    ('open a connection to an SQLite database', ['sqlite3.connect']),
    ('write rows to a CSV file', ['csv.writer', 'csv.DictWriter']),
    ('get a logger with a given name', ['logging.getLogger']),
    ('create a directory and any missing parents', ['pathlib.Path.mkdir']),
    ('find files matching a glob pattern in a directory', ['pathlib.Path.glob', 'pathlib.Path.rglob']),
    ('get the URL of a file in DVC remote storage', ['dvc.api.get_url']),
]


def test_fresh_clone_builds_corpus_chunks_and_index(small_project):
    prep, idx = read_json(small_project/'metrics'/'prepare.json'), read_json(small_project/'metrics'/'index.json')
    chunks = pd.read_parquet(small_project/'data'/'chunks.parquet')
    assert {Path(s).parts[0] for s in chunks.source} == {'json', 'pathlib', 'sqlite3', 'csv', 'argparse', 'logging', 'subprocess', 'dvc'}
    assert prep['chunks'] == len(chunks) == idx['chunks'] > 200
    assert idx['cache_embedded'] == chunks.content_hash.nunique() and idx['cache_reused'] == 0
    assert chunks.chunk_id.is_unique and chunks.n_tokens.max() <= 200
    assert (small_project/'reports'/'prepare.ipynb').exists() and (small_project/'plots'/'chunk_lengths.png').stat().st_size > 1000
    assert 'data/raw' in (small_project/'data.dvc').read_text()


def test_retrieval_hit_at_5_on_gold_set(small_project):
    retriever = Retriever(small_project/'data'/'index')
    hits = {q: [h['section'] for h in retriever.search(q, k=5)] for q, _ in GOLD}
    found = [any(s.endswith(tuple(ok)) for s in hits[q]) for q, ok in GOLD]
    assert sum(found) / len(GOLD) >= 0.9, {q: hits[q] for (q, _), f in zip(GOLD, found) if not f}


def test_cli_search_prints_passages_with_scores(small_project):
    out = run([BIN/'llmops-tpl', 'search', 'open a connection to an SQLite database', '-k', '3'], small_project).stdout
    heads = [line.split() for line in out.splitlines() if line and not line.startswith(' ')]
    scores = [float(h[0]) for h in heads]
    assert len(heads) == 3 and scores == sorted(scores, reverse=True) and scores[0] > 0.3, out
    assert 'sqlite3/sqlite3/connect.md' in [h[1] for h in heads], out


def test_second_repro_is_a_fast_noop(small_project):
    "Before the refresh below: the whole pipeline, with nothing changed since the fixture's run (the app stage included)."
    start = time.perf_counter()
    res = run([BIN/'dvc', 'repro'], small_project)
    elapsed = time.perf_counter() - start
    assert 'Data and pipelines are up to date' in res.stdout + res.stderr
    assert elapsed < 5, f"no-op repro took {elapsed:.1f}s"
    assert read_json(small_project/'metrics'/'app.json')['sources'] > 0  # the app's smoke test ran in the fixture's repro


@pytest.fixture(scope='module')
def refreshed(small_project):
    "The project after one document changed, one was deleted and the bad-input fixtures were added; with the chunks before and after."
    before = pd.read_parquet(small_project/'data'/'chunks.parquet')
    raw = small_project/'data'/'raw'
    with open(raw/'json'/'json'/'dumps.md', 'a') as f: f.write('\n## json.new_helper\n\nA helper added by the refresh test, about parsing JSON lines.\n')
    (raw/'csv'/'csv'/'DictReader.md').unlink()
    shutil.copytree(ROOT/'tests'/'fixtures'/'corpus', raw/'fixtures')
    (raw/'fixtures'/'big.md').write_text('# Big\n\n' + 'a large file of repeated words. ' * 4000)  # ~128 KB > max_file_mb
    run([BIN/'dvc', 'repro', 'index'], small_project)  # the stages after it are not this test's subject
    return before, pd.read_parquet(small_project/'data'/'chunks.parquet')


def test_incremental_refresh_embeds_only_changed_chunks(small_project, refreshed):
    before, after = refreshed
    old, new = set(before.content_hash), set(after.content_hash)
    idx = read_json(small_project/'metrics'/'index.json')
    assert idx['cache_embedded'] == len(new - old) and idx['cache_dropped'] == len(old - new)
    assert 0 < idx['cache_embedded'] < 0.2 * len(new)
    assert idx['cache_reused'] == len(new & old) and idx['chunks'] == len(after)
    assert 'csv/csv/DictReader.md' in set(before.source) - set(after.source)


def test_bad_input_is_counted_not_fatal(small_project, refreshed):
    prep = read_json(small_project/'metrics'/'prepare.json')
    assert {k: prep[f"files_{k}"] for k in ['empty', 'binary', 'unsupported', 'unreadable', 'undecodable', 'truncated']} == \
           dict(empty=1, binary=1, unsupported=1, unreadable=1, undecodable=1, truncated=1)
    _, after = refreshed
    assert {'fixtures/latin1.txt', 'fixtures/big.md', 'fixtures/evaluation.pdf'} <= set(after.source)
    assert not {'fixtures/empty.md', 'fixtures/image.txt', 'fixtures/notes.docx', 'fixtures/broken.pdf'} & set(after.source)


def test_chunk_size_beyond_the_embedder_fails_clearly(tmp_path):
    res = run([BIN/'papermill', 'nbs/stages/10_prepare.ipynb', str(tmp_path/'out.ipynb'), '-p', 'chunk_tokens', '300',
               '-p', 'out_dir', str(tmp_path)], ROOT, check=False)
    assert res.returncode != 0 and 'prepare.chunk_tokens=300 exceeds what' in res.stderr
    assert not (tmp_path/'chunks.parquet').exists()


def test_fresh_clone_pulls_the_exact_corpus_from_a_dvc_remote(small_project, tmp_path):
    remote = tmp_path/'remote'
    run([BIN/'dvc', 'remote', 'add', '-d', 'storage', str(remote)], small_project)
    run([BIN/'dvc', 'commit', '-f', 'data.dvc'], small_project)
    run([BIN/'dvc', 'push', 'data.dvc'], small_project)
    run(['git', 'add', '-A'], small_project)
    run(['git', '-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'remote'], small_project)
    clone = tmp_path/'clone'
    run(['git', 'clone', '-q', str(small_project), str(clone)], tmp_path)
    assert run([BIN/'llmops-tpl', 'corpus'], clone).stdout.startswith('corpus pulled')
    files = lambda d: {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob('*') if p.is_file()}
    assert files(clone/'data'/'raw') == files(small_project/'data'/'raw')
