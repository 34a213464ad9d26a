"""End-to-end latency of the serving endpoint, its decode speed against plain `model.generate`, and the share spent in retrieval.

Usage: .venv/bin/python bench/serving.py [--requests 8] [--port 8091]
(after `llmops-tpl repro` and `llmops-tpl approve`: it serves the project's @champion)

Starts `llmops-tpl serve` as a process and sends the first `requests` held-out questions over HTTP (OpenAI chat completions), one at
a time, then four at a time: latency p50/p95 for each. Decode speed through the endpoint is completion tokens over the whole request
time (retrieval, prompt, decoding and HTTP included), at concurrency 1; time to first token is that of a streamed request (the first
content chunk). The baseline is plain transformers fp32 `model.generate` on the same weights (base + adapter merged, `LocalGenerator`)
answering the same prompts (the same passages) in this process, timed the same way (its first token: `max_new_tokens=1`), and the
share of the endpoint's greedy answers identical to the baseline's is reported. The two alternate,
question by question (the server idles while the baseline runs), so drifts of this noisy machine hit both alike.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pandas as pd

from llmops_tpl.config import load_params, project_path
from llmops_tpl.dataset import rag_messages
from llmops_tpl.finetune import merge_adapter
from llmops_tpl.rag import LocalGenerator


def ask(url, question):
    start = time.perf_counter()
    r = httpx.post(f"{url}/v1/chat/completions", json={'messages': [{'role': 'user', 'content': question}]}, timeout=300).json()
    return {'question': question, 'seconds': time.perf_counter() - start, 'tokens': r['usage']['completion_tokens'],
            'retrieval_seconds': r['retrieval_seconds'], 'generation_seconds': r['generation_seconds'], 'passages': r['passages'],
            'text': r['choices'][0]['message']['content']}


def first_token(url, question):
    "Seconds until the first content chunk of a streamed answer."
    start = time.perf_counter()
    with httpx.stream('POST', f"{url}/v1/chat/completions", timeout=300,
                      json={'messages': [{'role': 'user', 'content': question}], 'stream': True}) as r:
        for line in r.iter_lines():
            if line.startswith('data: {') and json.loads(line[6:])['choices'][0]['delta'].get('content'):
                return time.perf_counter() - start


def percentiles(xs): return f"p50 {statistics.median(xs):6.2f} s  p95 {sorted(xs)[max(0, round(0.95 * len(xs)) - 1)]:6.2f} s"


def main(n, port):
    p = load_params()
    questions = pd.read_json(project_path(p['paths']['dataset'])/'eval.jsonl', lines=True).question.head(n).tolist()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(Path(sys.executable).parent/'llmops-tpl'), 'serve', '--port', str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, 'PATH': f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200: break
            except httpx.TransportError: time.sleep(1)
        else: sys.exit('the server did not become ready: is a version approved (llmops-tpl approve)?')
        base = json.loads(project_path(p['paths']['base_model']).read_text())
        merged = merge_adapter(project_path(base['path']), project_path(p['paths']['adapter']), Path(tempfile.mkdtemp())/'merged')
        gen = LocalGenerator(merged)
        warm = ask(url, questions[0])
        gen.complete(rag_messages(warm['question'], warm['passages']), p['rag']['max_new_tokens'])
        one, plain, ttft, plain_ttft = [], [], [], []
        for q in questions:  # endpoint, then the plain model on the same prompt
            one.append(ask(url, q))
            ttft.append(first_token(url, q))
            messages = rag_messages(q, one[-1]['passages'])
            start = time.perf_counter()
            out = gen.complete(messages, p['rag']['max_new_tokens'])
            plain.append({'seconds': time.perf_counter() - start, 'tokens': out['completion_tokens'], 'text': out['text']})
            start = time.perf_counter()
            gen.complete(messages, 1)
            plain_ttft.append(time.perf_counter() - start)
        with ThreadPoolExecutor(4) as pool: four = list(pool.map(lambda q: ask(url, q), questions))
    finally:
        server.terminate(); server.wait()
    tps = lambda rows: sum(r['tokens'] for r in rows) / sum(r['seconds'] for r in rows)
    print(f"{n} held-out questions, max_new_tokens {p['rag']['max_new_tokens']}, serve.threads {p['serve']['threads']}")
    print(f"concurrency 1: {percentiles([r['seconds'] for r in one])}")
    print(f"concurrency 4: {percentiles([r['seconds'] for r in four])}  ({n / max(r['seconds'] for r in four):.2f} requests/s at best)")
    print(f"retrieval share of latency at concurrency 1: {sum(r['retrieval_seconds'] for r in one) / sum(r['seconds'] for r in one):.1%}")
    print(f"decode through the endpoint {tps(one):.1f} tokens/s; plain model.generate {tps(plain):.1f} tokens/s; ratio {tps(one) / tps(plain):.2f}x")
    print(f"time to first token: endpoint (streamed) {statistics.median(ttft):.2f} s, plain {statistics.median(plain_ttft):.2f} s; "
          f"ratio {statistics.median(ttft) / statistics.median(plain_ttft):.2f}x (medians)")
    same = sum(a['text'].strip() == b['text'].strip() for a, b in zip(one, plain))
    print(f"greedy answers identical to plain transformers fp32: {same} of {n}")
    print(f"p50 latency at concurrency 4 over concurrency 1: {statistics.median([r['seconds'] for r in four]) / statistics.median([r['seconds'] for r in one]):.2f}x")
    inside = sum(r['tokens'] for r in one) / sum(r['generation_seconds'] for r in one)
    print(f"(generation inside the server: {inside:.1f} tokens/s, {inside / tps(plain):.2f}x plain; the rest is retrieval, HTTP and tracing)")


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--requests', type=int, default=8)
    ap.add_argument('--port', type=int, default=8091)
    a = ap.parse_args()
    main(a.requests, a.port)
