"Hardening, against the real `llmops-tpl serve` process: no request stalls serving, limits are in tokens, bad input gets a 4xx on a connection that stays usable, SIGTERM ends the server."
import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx
import yaml

from conftest import BIN, copy_database, start
from llmops_tpl.examples import free_port

QUESTION = {'messages': [{'role': 'user', 'content': 'How do I serve static files?'}]}
# a reply the model makes as long as it may: 1024 tokens take the engine about 17 s here
LONG = {'messages': [{'role': 'user', 'content': 'Count from 1 to 1000, separated by spaces.'}], 'max_tokens': 1024}
HI = {'role': 'user', 'content': 'hi'}


def answer_seconds(url):
    "Seconds the RAG route takes to answer the usual question."
    start = time.monotonic()
    r = httpx.post(f"{url}/v1/chat/completions", json=QUESTION, timeout=120)
    assert r.status_code == 200, r.text
    return time.monotonic() - start


def ready(url): return httpx.get(f"{url}/ready", timeout=10).json()


def test_an_abandoned_stream_stops_its_generation_and_the_next_request_is_answered_as_usual(server):
    usual = answer_seconds(server)
    r = httpx.post(f"{server}/llm/v1/chat/completions", json={**LONG, 'max_tokens': 200}, timeout=120)
    assert r.json()['usage']['completion_tokens'] == 200, 'the long request really is long'
    with httpx.stream('POST', f"{server}/llm/v1/chat/completions", json={**LONG, 'stream': True}, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3): next(lines)  # then the client goes away
    deadline = time.monotonic() + 5
    while ready(server)['generating'] and time.monotonic() < deadline: time.sleep(0.2)
    assert ready(server)['generating'] == 0, 'the abandoned generation went on'
    assert ready(server)['ready'] and answer_seconds(server) < 3 * usual + 5


def test_a_prompt_too_long_in_tokens_is_refused_at_once_while_another_request_is_answered(server):
    many = {'messages': [{'role': 'user', 'content': 'a'}] * 10000, 'max_tokens': 8}  # 20,000 characters, 60,025 tokens
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(answer_seconds, server)
        start = time.monotonic()
        r = httpx.post(f"{server}/llm/v1/chat/completions", json=many, timeout=120)
        assert r.status_code == 413 and 'at most 8192 tokens' in r.json()['error']['message'], r.text
        assert time.monotonic() - start < 10
        assert other.result() < 60
    streamed = httpx.post(f"{server}/llm/v1/chat/completions", json={**many, 'stream': True}, timeout=60)
    assert streamed.status_code == 413, 'a stream is refused before it starts'
    wide = {'messages': [{'role': 'user', 'content': '😀' * 3900}]}  # within the 4,000 characters; 11,700 tokens
    for path, stream in [('/v1/chat/completions', False), ('/v1/chat/completions', True)]:
        r = httpx.post(server + path, json={**wide, 'stream': stream}, timeout=60)
        assert r.status_code == 413 and 'tokens' in r.json()['error']['message'], r.text
    r = httpx.post(f"{server}/invocations", json={'input': wide['messages']}, timeout=60)
    assert r.status_code == 413, r.text


def post(conn, path, content):
    "POST `content` as JSON on the open connection `conn`; the status and the parsed reply."
    conn.request('POST', path, body=content, headers={'Content-Type': 'application/json'})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def test_wrong_types_get_a_4xx_naming_the_field_and_the_connection_stays_usable(server):
    u = urlparse(server)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)  # one keep-alive connection; no reconnecting
    bad = [('/llm/v1/chat/completions', {'messages': [HI], 'response_format': 'json_object'}, 'response_format'),
           ('/v1/chat/completions', {'messages': ['junk', HI]}, 'messages[0]'),
           ('/v1/chat/completions', {'messages': [{'role': 'wizard', 'content': 'x'}, HI]}, 'wizard'),
           ('/llm/v1/chat/completions', {'messages': [{'role': 'wizard', 'content': 'x'}, HI]}, 'wizard'),
           ('/invocations', {'input': [HI], 'custom_inputs': 'x'}, 'custom_inputs'),
           ('/v1/chat/completions', {'messages': [{'role': 'user', 'content': '\ud800'}]}, 'not valid Unicode'),
           ('/v1/chat/completions', {'messages': [HI], 'stream': 'yes'}, 'stream')]
    for path, body, said in bad:
        status, reply = post(conn, path, json.dumps(body))
        assert 400 <= status < 500 and said in reply['error']['message'], (path, body, status, reply)
        assert 'Error' not in reply['error']['message'] and 'pydantic' not in reply['error']['message']
    status, reply = post(conn, '/v1/chat/completions', '[' * 100_000)
    assert (status, reply['error']['message']) == (400, 'the JSON is nested too deeply')
    status, reply = post(conn, '/v1/chat/completions', json.dumps(QUESTION))
    assert status == 200 and reply['choices'][0]['message']['content']
    conn.close()


def test_a_body_over_the_cap_is_refused(server):
    r = httpx.post(f"{server}/v1/chat/completions", content=b'{"messages": "' + b'x' * 5_000_000 + b'"}',
                   headers={'content-type': 'application/json'}, timeout=60)
    assert r.status_code == 413 and '1000000 bytes' in r.json()['error']['message']


def test_sigterm_ends_the_server_soon_while_a_stream_is_open(small_project, approved, tmp_path):
    "A server whose requests in flight get 1 s at a SIGTERM: it ends in a few seconds, not when the 17 s stream is done."
    project = tmp_path/'project'  # the shared project's files, but for its params and its own copy of the database
    project.mkdir()
    for p in small_project.iterdir():
        if p.name not in ('params.yaml', 'mlflow.db', 'mlflow.db-journal'): (project/p.name).symlink_to(p)
    copy_database(small_project/'mlflow.db', project/'mlflow.db')
    params = yaml.safe_load((small_project/'params.yaml').read_text())
    params['serve']['shutdown_seconds'] = 1
    (project/'params.yaml').write_text(yaml.safe_dump(params, sort_keys=False))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([BIN/'llmops-tpl', 'serve', '--port', str(port)], project, f"{url}/ready", log=tmp_path/'serve.log')
    try:
        with httpx.stream('POST', f"{url}/llm/v1/chat/completions", json={**LONG, 'stream': True}, timeout=60) as r:
            next(r.iter_lines())  # the stream runs, and its client is still there
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()  # the engine's process
            stopped = time.monotonic()
            proc.terminate()
            proc.wait(60)
        assert time.monotonic() - stopped < 10, (tmp_path/'serve.log').read_text()[-3000:]
        for _ in range(20):
            if not any(Path(f"/proc/{pid}").exists() for pid in children): break
            time.sleep(0.5)
        assert children and not any(Path(f"/proc/{pid}").exists() for pid in children), 'a child outlived the server'
    finally:
        if proc.poll() is None: proc.kill()
