"The registered RAG model, human approval and rollback, and the serving endpoint as a real process over HTTP."
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import mlflow
import pytest
import yaml
from openai import OpenAI

from conftest import BIN, copy_project, read_json, run, start, stop
from llmops_tpl.examples import free_port

MODEL, INDEX = 'llmops-tpl-rag', 'llmops-tpl-index'


def registry(project):
    return mlflow.MlflowClient(f"sqlite:///{project/'mlflow.db'}")


def test_register_logs_a_self_contained_model(small_project):
    reg = read_json(small_project/'metrics'/'register.json')
    assert (reg['challenger'], reg['gate']) == (False, 'failed'), 'a failed gate: no challenger'
    version = registry(small_project).get_model_version(MODEL, str(reg['version']))
    assert version.tags['gate_passed'] == 'false'
    mlflow.set_tracking_uri(f"sqlite:///{small_project/'mlflow.db'}")
    local = mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{reg['version']}")
    mlflow.set_tracking_uri(None)
    arts = yaml.safe_load((Path(local)/'MLmodel').read_text())['flavors']['python_function']['artifacts']
    assert set(arts) == {'index', 'embedder', 'adapter', 'base_gguf', 'engine_model'}, arts
    engine = yaml.safe_load((Path(local)/'MLmodel').read_text())['flavors']['python_function']['config']['engine']
    assert (engine['engine'], engine['quantization'], engine['adapter_sha256'] is not None) == ('openvino', 'int8', True), engine
    assert (Path(local)/arts['engine_model']['path']/'openvino_model.xml').exists()
    assert all((Path(local)/a['path']).exists() for a in arts.values()) and (Path(local)/'code'/'llmops_tpl'/'rag.py').exists()
    reqs = (Path(local)/'requirements.txt').read_text().split()
    assert 'mlflow==3.17.2' in reqs and all('==' in r for r in reqs)
    # its system prompt: the project's file, packed, and registered in the prompt registry as the version it records
    system = (small_project/'prompts'/'system.txt').read_text().strip()
    config = yaml.safe_load((Path(local)/'MLmodel').read_text())['flavors']['python_function']['config']
    assert config['system_prompt'] == {'text': system, 'version': 'llmops-tpl-system/1'}, config['system_prompt']
    assert version.tags['prompt_version'] == 'llmops-tpl-system/1'
    mlflow.set_tracking_uri(f"sqlite:///{small_project/'mlflow.db'}")
    assert mlflow.genai.load_prompt('prompts:/llmops-tpl-system/1').template == system
    evaluation = mlflow.get_run(read_json(small_project/'metrics'/'gate.json')['eval_run_id'])
    mlflow.set_tracking_uri(None)
    assert evaluation.data.tags['prompt.system'] == 'llmops-tpl-system/1', 'the evaluation names the prompt it judged'
    assert read_json(small_project/'metrics'/'gate.json')['prompts'] == {'system': 'llmops-tpl-system/1'}


def test_a_registered_version_replays_with_nothing_but_its_artifacts(small_project, tmp_path):
    "As on another machine: no project, an empty home (no model hub, no exporter), the model's folder alone."
    mlflow.set_tracking_uri(f"sqlite:///{small_project/'mlflow.db'}")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1", dst_path=str(tmp_path/'model')))
    mlflow.set_tracking_uri(None)
    mlmodel = yaml.safe_load((local/'MLmodel').read_text())
    mlmodel['flavors']['python_function']['config']['hub_dir'] = str(tmp_path/'no-such-hub')
    (local/'MLmodel').write_text(yaml.safe_dump(mlmodel))
    code = ("import mlflow; m = mlflow.pyfunc.load_model('model'); "
            "r = m.predict({'input': [{'role': 'user', 'content': 'How do I parse JSON text?'}]}); print(r['custom_outputs']['passages'][0]['source'])")
    replay = lambda: run([BIN/'python', '-c', code], tmp_path, env={'HOME': str(tmp_path), 'MLFLOW_TRACKING_URI': f"sqlite:///{tmp_path/'m.db'}"},
                         timeout=600).stdout.strip()
    hub = tmp_path/'.cache'/'llmops-tpl'/'hub'
    assert replay().endswith('.md') and not hub.exists(), 'the engine runs its packed converted model: no base model needed'
    mlmodel['flavors']['python_function']['config']['engine'] = {'engine': 'transformers'}  # as a version registered without the engine
    (local/'MLmodel').write_text(yaml.safe_dump(mlmodel))
    assert replay().endswith('.md')
    assert list(hub.glob('*/model.safetensors')), 'the base model was rebuilt from the GGUF packed with the model'


def test_approval_needs_a_passed_gate_or_a_recorded_override(small_project, approved):
    version, refused = approved
    assert refused.returncode != 0 and 'did not pass its evaluation gate' in refused.stderr
    mv = registry(small_project).get_model_version(MODEL, str(version))
    assert (mv.tags['approved_by'], mv.tags['approval_note'], mv.tags['approval_override']) == ('ana', 'first release', 'demo of an override')
    assert registry(small_project).get_registered_model(MODEL).aliases['champion'] == version
    mlflow.set_tracking_uri(f"sqlite:///{small_project/'mlflow.db'}")
    prompt = mlflow.genai.load_prompt('prompts:/llmops-tpl-system@champion', cache_ttl_seconds=0)
    mlflow.set_tracking_uri(None)
    assert f"{prompt.name}/{prompt.version}" == mv.tags['prompt_version'], "the prompt registry's @champion follows"


def test_openai_client_gets_a_grounded_answer_with_sources(small_project, server):
    client = OpenAI(base_url=f"{server}/v1", api_key='unused')
    r = client.chat.completions.create(model=MODEL, messages=[{'role': 'user', 'content': 'How do I serve the files of a folder?'}])
    extra = r.model_extra
    assert r.choices[0].message.content.strip() and r.usage.completion_tokens > 0
    assert extra['sources'] and set(extra['sources']) <= {p['source'] for p in extra['passages']}
    assert 'staticfiles.md' in [p['source'] for p in extra['passages']], extra['passages']
    assert all(0 < p['score'] <= 1 for p in extra['passages'])
    inv = httpx.post(f"{server}/invocations", json={'input': [{'role': 'user', 'content': 'How do I serve the files of a folder?'}]},
                     timeout=120).json()
    assert inv['output'][0]['content'][0]['text'] == r.choices[0].message.content, 'both protocols, one model'


def test_each_request_is_traced_with_retrieval_and_generation_spans(small_project, server):
    question = 'What does json.dumps do?'
    OpenAI(base_url=f"{server}/v1", api_key='unused').chat.completions.create(model=MODEL, messages=[{'role': 'user', 'content': question}])
    client = registry(small_project)
    exp = client.get_experiment_by_name('llmops-tpl').experiment_id
    for _ in range(20):
        traces = [t for t in client.search_traces(locations=[exp], max_results=20) if question in json.dumps(t.data.request or '')]
        if traces and len(traces[0].data.spans) >= 3: break
        time.sleep(1)
    spans = {s.name: s for s in traces[0].data.spans}
    assert spans['retrieve'].outputs[0]['id'] and 'score' in spans['retrieve'].outputs[0]['metadata']
    assert spans['generate'].attributes['completion_tokens'] > 0 and spans['generate'].attributes['seconds'] > 0
    assert traces[0].info.tags['prompt_version'] == 'llmops-tpl-system/1', 'the trace names the prompt version'


def test_the_chains_http_backend_answers_through_an_openai_compatible_endpoint(small_project, server):
    from llmops_tpl.index import Retriever
    from llmops_tpl.rag import OpenAIGenerator, RAGChain
    chain = RAGChain(Retriever(small_project/'data'/'index'), OpenAIGenerator(f"{server}/v1", MODEL, timeout=120), k=2, max_new_tokens=24)
    res = chain.answer('How do I serialize an object to a JSON string?')
    assert res['answer'] and res['generator'] == MODEL and res['usage']['completion_tokens'] > 0
    assert [p['source'] for p in res['passages']] and all(p['score'] > 0 for p in res['passages'])
    assert ''.join(chain.generator.stream([{'role': 'user', 'content': 'What does json.loads do?'}], 16)).strip()


def test_streamed_chat_completion_matches_the_whole_answer(server):
    client = OpenAI(base_url=f"{server}/v1", api_key='unused')
    messages = [{'role': 'user', 'content': 'How do I write rows to a CSV file?'}]
    whole = client.chat.completions.create(model=MODEL, messages=messages).choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True))
    assert len(chunks) > 3
    assert ''.join(c.choices[0].delta.content or '' for c in chunks).strip() == whole
    assert chunks[-1].choices[0].finish_reason == 'stop' and chunks[-1].model_extra['sources']


def test_concurrent_requests_decode_together_and_health_answers_meanwhile(server):
    "Four streamed requests at once through the real server: all are decoding at one moment (none waits for another to end)."
    client = OpenAI(base_url=f"{server}/v1", api_key='unused')
    def stream(question):
        times = [time.perf_counter() for c in client.chat.completions.create(
            model=MODEL, messages=[{'role': 'user', 'content': question}], stream=True) if c.choices[0].delta.content]
        return times[0], times[-1]
    stream('How do I serve static files?')  # warm
    questions = ['How do I serve static files?', 'How do I test my app?', 'What is a route?', 'How do I add middleware?']
    with ThreadPoolExecutor(4) as pool:
        spans = [pool.submit(stream, q) for q in questions]
        time.sleep(0.5)
        start = time.perf_counter(); health = httpx.get(f"{server}/health", timeout=10); health_s = time.perf_counter() - start
        spans = [f.result() for f in spans]
    assert max(first for first, _ in spans) < min(last for _, last in spans), f"decoded one after another: {spans}"
    assert health.json() == {'status': 'ok'} and health_s < 1, health_s


def within(seconds, fn):
    "`fn()`'s result, or its exception raised, run in a daemon thread, so that a hang fails the test instead of blocking it."
    out = {}
    def target():
        try: out['result'] = fn()
        except Exception as e: out['error'] = e
    t = threading.Thread(target=target, daemon=True)
    t.start(); t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s"
    if 'error' in out: raise out['error']
    return out['result']


def test_a_failed_local_generation_is_raised_to_the_stream_reader_and_frees_the_generator(small_project):
    from llmops_tpl.rag import LocalGenerator
    gen = LocalGenerator(small_project/read_json(small_project/'models'/'base_model.json')['path'])
    messages = [{'role': 'user', 'content': 'What does json.loads do?'}]
    with pytest.raises(ValueError, match='max_new_tokens'):  # raised by `generate`, in the thread that feeds the streamer
        within(30, lambda: list(gen.stream(messages, max_new_tokens=-1)))
    assert ''.join(within(120, lambda: list(gen.stream(messages, max_new_tokens=8)))).strip(), 'the lock was released'


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server):
    chat = f"{server}/v1/chat/completions"
    r = httpx.post(chat, content=b'{"messages": [', headers={'content-type': 'application/json'})
    assert r.status_code == 400 and 'malformed JSON' in r.json()['error']['message']
    r = httpx.post(chat, json={'messages': []})
    assert r.status_code == 422 and 'non-empty list of messages' in r.json()['error']['message']
    r = httpx.post(chat, json={'messages': [{'role': 'user', 'content': 'x' * 5000}]})
    assert r.status_code == 413 and 'at most 4000' in r.json()['error']['message']
    r = httpx.post(f"{server}/invocations", json={'input': [{'role': 'system', 'content': 'no question'}]})
    assert r.status_code == 422
    assert httpx.get(f"{server}/health").json() == {'status': 'ok'}
    assert httpx.post(chat, json={'messages': [{'role': 'user', 'content': 'What does json.loads do?'}]}, timeout=120).status_code == 200


def test_unknown_alias_fails_clearly(small_project):
    res = run([BIN/'llmops-tpl', 'serve', '--alias', 'nope', '--port', str(free_port())], small_project, check=False, timeout=120)
    assert res.returncode != 0 and f"{MODEL}@nope does not exist" in res.stderr


def test_a_new_approval_reaches_the_server_and_rollback_returns(small_project, approved, server, tmp_path):
    first, _ = approved
    (tmp_path/'gate.json').write_text(json.dumps({'passed': True, 'checks': [], 'prompts': {'system': 'llmops-tpl-system/1'}}))
    run([BIN/'papermill', 'nbs/stages/60_register.ipynb', str(tmp_path/'register.ipynb'), '-p', 'index_dir', 'data/index',
         '-p', 'adapter_dir', 'models/adapter', '-p', 'base_provenance', 'models/base_model.json', '-p', 'gate_path', str(tmp_path/'gate.json'),
         '-p', 'metrics_path', str(tmp_path/'register.json'), '-p', 'tracking_uri', 'sqlite:///mlflow.db', '-p', 'max_new_tokens', '20',
         '-p', 'engine_dir', 'models/engine'],
        small_project)  # another model (shorter answers), whose gate passed
    reg = read_json(tmp_path/'register.json')
    assert reg['challenger'] and reg['new_version'] and reg['version'] > first
    assert registry(small_project).get_registered_model(MODEL).aliases['challenger'] == reg['version']
    run([BIN/'llmops-tpl', 'approve', '--version', str(reg['version']), '--reviewer', 'ben', '--note', 'gate passed'], small_project)

    def served_version(expected):
        for _ in range(30):
            if httpx.get(f"{server}/ready").json()['version'] == expected: return True
            time.sleep(1)
    assert served_version(reg['version']), 'the server follows @champion'
    out = run([BIN/'llmops-tpl', 'rollback', '--reviewer', 'ana', '--note', 'answers got worse'], small_project).stdout
    assert f"version {first}" in out and served_version(first)
    hist = run([BIN/'llmops-tpl', 'history'], small_project).stdout
    assert 'ben' in hist and 'answers got worse' in hist


def test_register_approve_serve_against_a_real_mlflow_server(small_project, tmp_path):
    port, serve_port = free_port(), free_port()
    uri = f"http://127.0.0.1:{port}"
    mlflow_server = start([BIN/'mlflow', 'server', '--backend-store-uri', f"sqlite:///{tmp_path/'server.db'}", '--artifacts-destination',
                           str(tmp_path/'artifacts'), '--host', '127.0.0.1', '--port', str(port), '--workers', '1'],
                          tmp_path, f"{uri}/health", env={'MLFLOW_SERVER_ENABLE_JOB_EXECUTION': 'false'})  # no job runner: it outlives the server
    try:
        run([BIN/'papermill', 'nbs/stages/60_register.ipynb', str(tmp_path/'register.ipynb'), '-p', 'index_dir', 'data/index',
             '-p', 'adapter_dir', 'models/adapter', '-p', 'base_provenance', 'models/base_model.json', '-p', 'out_dir', str(tmp_path),
             '-p', 'tracking_uri', uri, '-p', 'registered_name', MODEL, '-p', 'engine_dir', 'models/engine'], small_project)
        version = read_json(tmp_path/'register.json')['version']
        env = {'MLFLOW_TRACKING_URI': uri}
        run([BIN/'llmops-tpl', 'approve', '--version', str(version), '--reviewer', 'ana', '--note', 'on the team server',
             '--override', 'no gate on this server'], small_project, env=env)
        proc = start([BIN/'llmops-tpl', 'serve', '--port', str(serve_port)], small_project, f"http://127.0.0.1:{serve_port}/ready", env=env)
        try:
            r = OpenAI(base_url=f"http://127.0.0.1:{serve_port}/v1", api_key='unused').chat.completions.create(
                model=MODEL, messages=[{'role': 'user', 'content': 'How do I parse command-line arguments?'}])
            assert r.choices[0].message.content and r.model_extra['passages']
            mlflow.set_tracking_uri(uri)  # trace data is read through the server's artifact proxy, which needs the global URI
            client = mlflow.MlflowClient()
            exp = client.get_experiment_by_name('llmops-tpl').experiment_id
            for _ in range(60):  # traces are exported in the background, a trace's spans sometimes after the trace itself
                traces = client.search_traces(locations=[exp], max_results=5)
                if traces and {'retrieve', 'generate'} <= {s.name for s in traces[0].data.spans}: break
                time.sleep(1)
            assert traces and {'retrieve', 'generate'} <= {s.name for s in traces[0].data.spans}, 'the request was traced on the server'
        finally: stop(proc)
        assert int(client.get_registered_model(MODEL).aliases['champion']) == version
        assert client.get_model_version(MODEL, str(version)).tags['approved_by'] == 'ana'
    finally:
        mlflow.set_tracking_uri(None)
        stop(mlflow_server)


ZEBRA = ('# Caring for the office zebra\n\n## Feeding Quentin\n\nQuentin, the office zebra, eats three kilograms of timothy hay '
         'every morning and an apple on Fridays. Never feed him chocolate.\n')


def test_a_refresh_reaches_the_running_server_through_the_retrieval_gate(small_project, approved, tmp_path):
    "A document added after registration is answered, without a restart, once `repro release_index` publishes it; a noise index is refused."
    import pandas as pd
    from llmops_tpl.index import build_index
    from llmops_tpl.models import DEFAULT_EMBEDDER
    project = tmp_path/'project'
    copy_project(small_project, project)  # the shared project stays as the other tests expect it
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([BIN/'llmops-tpl', 'serve', '--port', str(port)], project, f"{url}/ready", log=tmp_path/'serve.log')
    try:
        before = read_json(project/'metrics'/'release_index.json')
        assert httpx.get(f"{url}/ready").json()['index_release'] == f"{INDEX}/{before['live']}"
        (project/'data'/'raw'/'office-zebra.md').write_text(ZEBRA)
        run([BIN/'llmops-tpl', 'repro', 'release_index'], project)
        release = read_json(project/'metrics'/'release_index.json')
        assert release['passed'] and release['live'] == release['version'] > before['live'], release
        new = f"{INDEX}/{release['version']}"
        for _ in range(30):
            if httpx.get(f"{url}/ready").json()['index_release'] == new: break
            time.sleep(1)
        assert httpx.get(f"{url}/ready").json()['index_release'] == new, 'the server follows @live'
        question = 'What does Quentin the office zebra eat?'
        res = OpenAI(base_url=f"{url}/v1", api_key='unused').chat.completions.create(model=MODEL, messages=[{'role': 'user', 'content': question}])
        assert 'office-zebra.md' in res.model_extra['sources'] and res.model_extra['index_release'] == new
        client, exp = registry(project), registry(project).get_experiment_by_name('llmops-tpl').experiment_id
        for _ in range(30):
            traced = client.search_traces(locations=[exp], filter_string=f"tags.index_release = '{new}'", max_results=5)
            if traced: break
            time.sleep(1)
        assert traced and question in json.dumps(traced[0].data.request), 'its trace names the new index release'

        chunks = pd.read_parquet(project/'data'/'chunks.parquet')  # the same chunks, their text corrupted into noise
        noise = chunks.assign(text=[f"zq{i} vx wk" for i in range(len(chunks))], section='noise', title='noise')
        build_index(noise, tmp_path/'noise'/'index', tmp_path/'noise'/'cache', DEFAULT_EMBEDDER)
        failed = run([BIN/'papermill', 'nbs/stages/45_release_index.ipynb', str(tmp_path/'release.ipynb'), '-p', 'index_dir', str(tmp_path/'noise'/'index'),
                      '-p', 'eval_path', 'data/dataset/eval.jsonl', '-p', 'metrics_path', str(tmp_path/'release.json'),
                      '-p', 'tracking_uri', 'sqlite:///mlflow.db'], project, check=False)
        assert failed.returncode and f"stays at version {release['version']}" in failed.stdout + failed.stderr
        verdict = read_json(tmp_path/'release.json')
        assert not verdict['passed'] and verdict['version'] is None and verdict['live'] == release['version']
        assert {c['metric'] for c in verdict['checks'] if not c['passed']} >= {'hit_at_k', 'hit_at_k_margin_over_live'}
        assert int(registry(project).get_model_version_by_alias(INDEX, 'live').version) == release['version'], '@live did not move'
        ready = httpx.get(f"{url}/ready").json()
        assert ready['index_release'] == new and ready['index_refused'] is None, ready
    finally:
        stop(proc)
