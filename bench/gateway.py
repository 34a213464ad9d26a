"""What the AI gateway adds to a request: latency through `llmops-tpl gateway`'s server against the same upstream called directly.

Usage: .venv/bin/python bench/gateway.py [--requests 12] [--tokens 16]
(after `llmops-tpl repro` and `llmops-tpl approve`: it serves the project's @champion)

Starts `llmops-tpl serve` (the upstream: its LLM route, `/llm/v1`) and a gateway server on a throwaway database with one endpoint in
front of that route (a rate limit set, so the project's middleware is on the path), then asks the same short chat of both, alternating
direct and gateway request by request so that this noisy machine's drifts hit both alike. Prints the latency of each (p50, p95), the
median of the paired differences (the gateway's overhead per request: routing, rate-limit check, budget check, usage trace) and the
ratio of the medians.
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI

from llmops_tpl.config import find_root
from llmops_tpl.gateway import apply_gateway, gateway_env, openai_base_url, plan_gateway, start_gateway, stop_gateway, wait_until_up


def timed(client, model, messages, tokens):
    start = time.perf_counter()
    client.chat.completions.create(model=model, messages=messages, max_tokens=tokens, temperature=0)
    return time.perf_counter() - start


def p50_p95(xs): return f"p50 {statistics.median(xs) * 1000:7.1f} ms  p95 {sorted(xs)[max(0, round(0.95 * len(xs)) - 1)] * 1000:7.1f} ms"


def main(n, tokens, serve_port, gateway_port):
    root, tmp = find_root(), Path(tempfile.mkdtemp())
    upstream = f"http://127.0.0.1:{serve_port}"
    serve = subprocess.Popen([str(Path(sys.executable).parent/'llmops-tpl'), 'serve', '--port', str(serve_port)], cwd=root,
                             stdout=open(tmp/'serve.log', 'w'), stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"{upstream}/ready", serve, timeout=300)
        plans = plan_gateway({'llm': {'provider': 'selfhosted', 'path': '/llm/v1', 'model': 'llmops-tpl-rag-llm', 'rate_limit': '1000/minute'}}, upstream)
        gateway = start_gateway(f"sqlite:///{tmp/'gateway.db'}", tmp/'artifacts', port=gateway_port, env=gateway_env(plans), log=open(tmp/'gateway.log', 'w'))
        url = f"http://127.0.0.1:{gateway_port}"
        apply_gateway(url, plans)
        direct = OpenAI(base_url=f"{upstream}/llm/v1", api_key='unused', max_retries=0, timeout=300)
        through = OpenAI(base_url=openai_base_url(url), api_key='unused', max_retries=0, timeout=300)
        messages = [{'role': 'user', 'content': 'Name one thing MLflow tracks.'}]
        for client, model in ((direct, 'x'), (through, 'llm')): timed(client, model, messages, tokens)  # warm-up
        pairs = [(timed(direct, 'x', messages, tokens), timed(through, 'llm', messages, tokens)) for _ in range(n)]
        stop_gateway(gateway)
    finally:
        serve.terminate(); serve.wait()
    d, g = [p[0] for p in pairs], [p[1] for p in pairs]
    print(f"{n} requests each, {tokens} new tokens, alternating")
    print(f"direct to the upstream:  {p50_p95(d)}")
    print(f"through the gateway:     {p50_p95(g)}")
    print(f"gateway overhead per request (median of paired differences): {statistics.median(b - a for a, b in pairs) * 1000:.1f} ms")
    print(f"ratio of medians (gateway / direct): {statistics.median(g) / statistics.median(d):.3f}")


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--requests', type=int, default=12)
    ap.add_argument('--tokens', type=int, default=16)
    ap.add_argument('--serve-port', type=int, default=8093)
    ap.add_argument('--gateway-port', type=int, default=5093)
    a = ap.parse_args()
    main(a.requests, a.tokens, a.serve_port, a.gateway_port)
