"""The red-team probes of the hardening issue against a running `llmops-tpl serve`: one line per probe, with its status and time.

Usage: .venv/bin/python bench/hardening_probes.py [http://127.0.0.1:8080]
(after `llmops-tpl approve`, with `llmops-tpl serve` running; the tests in tests/test_hardening.py assert the same behaviour)

1. a streamed 1024-token reply whose client leaves after three chunks: `/ready` a second later, and a normal request after it;
2. 10,000 one-character messages to the LLM route (60,025 tokens for an 8,192-token model), with a normal request beside it;
3. wrong-typed bodies, each followed by a request on the same keep-alive connection;
4. a 50 MB body, and a question of 4,000 characters of "x " (an empty answer says so).
"""
import http.client
import json
import sys
import threading
import time
from urllib.parse import urlparse

import httpx

URL = sys.argv[1] if len(sys.argv) > 1 else 'http://127.0.0.1:8080'
QUESTION = {'role': 'user', 'content': 'How do I serve static files?'}


def normal(timeout=240):
    "Status and seconds of the usual question on the RAG route."
    start = time.monotonic()
    try: status = httpx.post(f"{URL}/v1/chat/completions", json={'messages': [QUESTION]}, timeout=timeout).status_code
    except httpx.HTTPError as e: status = type(e).__name__
    return status, round(time.monotonic() - start, 1)


def abandoned_stream():
    body = {'messages': [{'role': 'user', 'content': 'Count from 1 to 1000, separated by spaces.'}], 'max_tokens': 1024,
            'stream': True}
    with httpx.stream('POST', f"{URL}/llm/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3): next(lines)
    time.sleep(1)
    ready = httpx.get(f"{URL}/ready", timeout=10)
    print('1 abandoned stream: /ready a second later', ready.status_code, 'generating', ready.json().get('generating'),
          '| then a normal request', normal())


def too_many_tokens():
    other = {}
    beside = threading.Thread(target=lambda: other.update(normal=normal()))
    beside.start()
    start = time.monotonic()
    try:
        r = httpx.post(f"{URL}/llm/v1/chat/completions", json={'messages': [{'role': 'user', 'content': 'a'}] * 10000,
                                                               'max_tokens': 8}, timeout=300)
        got = (r.status_code, r.text[:110])
    except httpx.HTTPError as e: got = type(e).__name__
    beside.join()
    print('2 10,000 one-character messages:', got, round(time.monotonic() - start, 1), 's | the request beside it',
          other['normal'])


WRONG = [('/llm/v1/chat/completions', {'messages': [QUESTION], 'response_format': 'json_object'}),
         ('/v1/chat/completions', {'messages': ['junk', QUESTION]}),
         ('/v1/chat/completions', {'messages': [{'role': 'wizard', 'content': 'hi'}, QUESTION]}),
         ('/llm/v1/chat/completions', {'messages': [{'role': 'wizard', 'content': 'hi'}, QUESTION]}),
         ('/invocations', {'input': [QUESTION], 'custom_inputs': 'x'}),
         ('/v1/chat/completions', {'messages': [{'role': 'user', 'content': '\ud800'}]}),
         ('/v1/chat/completions', None)]  # JSON nested 100,000 levels deep


def send(conn, method, path, content=None):
    "Status and start of the body of one request on the open connection `conn`."
    conn.request(method, path, body=content, headers={'Content-Type': 'application/json'})
    r = conn.getresponse()
    return r.status, r.read().decode()[:100]


def wrong_types():
    u = urlparse(URL)
    connect = lambda: http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    conn = connect()  # one keep-alive connection, opened again only after it broke
    for path, body in WRONG:
        content = b'[' * 100_000 if body is None else json.dumps(body).encode()
        try: got = send(conn, 'POST', path, content)
        except (OSError, http.client.HTTPException) as e: got, conn = type(e).__name__, connect()
        try: after = send(conn, 'GET', '/health')[0]
        except (OSError, http.client.HTTPException) as e: after, conn = type(e).__name__, connect()
        shown = 'nested 100,000 deep' if body is None else json.dumps(body)[:60]
        print('3', path, shown, '->', got, '| next request on the connection:', after)


def big_and_empty():
    try:
        r = httpx.post(f"{URL}/v1/chat/completions", content=b'{"messages": "' + b'x' * 50_000_000 + b'"}',
                       headers={'content-type': 'application/json'}, timeout=60)
        got = (r.status_code, r.text[:100])
    except httpx.HTTPError as e: got = type(e).__name__
    print('4 a 50 MB body:', got)
    r = httpx.post(f"{URL}/v1/chat/completions", json={'messages': [{'role': 'user', 'content': 'x ' * 2000}]}, timeout=120)
    print('4 4,000 characters of "x ":', r.status_code,
          repr(r.json()['choices'][0]['message']['content'][:80]) if r.status_code == 200 else r.text[:100])


if __name__ == '__main__':
    print('a normal request', normal())
    abandoned_stream()
    too_many_tokens()
    wrong_types()
    big_and_empty()
