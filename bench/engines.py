"""The inference engine against transformers: decode speed, time to first token, identical greedy answers, batching.

Usage: .venv/bin/python bench/engines.py [--questions 12] [--quantizations int8,fp16] [--tokens 64]
(after `llmops-tpl repro`: it reads the project's base model, adapter, index and eval split)

The fine-tuned model (base + adapter merged) answers the first `questions` held-out questions, each with the passages the index
retrieves for it, greedily, with `tokens` new tokens at most: transformers fp32 `generate` (`LocalGenerator`, the reference) and
OpenVINO GenAI (`EngineGenerator`) on the model converted at each weight format, alternating question by question so that this noisy
machine's drifts hit all alike. Time to first token is the first streamed piece; decode speed is the tokens after it over the time
after it. Then four prompts at once against one after another, on the first weight format.
"""
import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from llmops_tpl.config import load_params, project_path
from llmops_tpl.dataset import rag_messages
from llmops_tpl.engine import EngineGenerator, convert_model
from llmops_tpl.finetune import merge_adapter
from llmops_tpl.hub import recorded_base_model
from llmops_tpl.index import Retriever
from llmops_tpl.rag import LocalGenerator


def timed(gen, messages, tokens):
    "Seconds to the first piece, seconds in all, the reply and its token count."
    start, first, pieces = time.perf_counter(), None, []
    for piece in gen.stream(messages, tokens):
        first = first or time.perf_counter() - start
        pieces.append(piece)
    text = ''.join(pieces).strip()
    return {'first': first, 'seconds': time.perf_counter() - start, 'text': text, 'tokens': len(gen.tokenizer(text)['input_ids'])}


def main(n, quantizations, tokens):
    p = load_params()
    base_dir, _ = recorded_base_model(project_path(p['paths']['base_model']))
    adapter = project_path(p['paths']['adapter'])
    retriever = Retriever(project_path(p['paths']['index']))
    questions = pd.read_json(project_path(p['paths']['dataset'])/'eval.jsonl', lines=True).question.head(n)
    prompts = [rag_messages(q, retriever.search(q, p['dataset']['k'])) for q in questions]
    engines = {q: EngineGenerator(convert_model(base_dir, adapter, project_path(p['paths']['engine']),
                                                project_path(p['paths']['convert_env']), q)) for q in quantizations}
    gens = {'transformers fp32': LocalGenerator(merge_adapter(base_dir, adapter, Path(tempfile.mkdtemp())/'merged')),
            **{f"openvino {q}": g for q, g in engines.items()}}
    rows = {name: [] for name in gens}
    for i, messages in enumerate([prompts[0]] + prompts):  # the first, once more, warms every engine up
        for name, gen in gens.items():
            r = timed(gen, messages, tokens)
            if i: rows[name].append(r)
    ref = rows['transformers fp32']
    decode = lambda rs: sum(r['tokens'] - 1 for r in rs) / sum(r['seconds'] - r['first'] for r in rs)
    print(f"{n} held-out questions, {tokens} new tokens at most, greedy")
    for name, rs in rows.items():
        same = sum(a['text'] == b['text'] for a, b in zip(rs, ref))
        print(f"{name:18s} decode {decode(rs):6.1f} tokens/s ({decode(rs) / decode(ref):4.2f}x)  first token "
              f"{statistics.median(r['first'] for r in rs):5.2f} s ({statistics.median(r['first'] for r in rs) / statistics.median(r['first'] for r in ref):4.2f}x)"
              f"  identical to transformers: {same} of {n}")
    gen = engines[quantizations[0]]
    start = time.perf_counter(); [gen.complete(m, tokens) for m in prompts[:4]]; alone = time.perf_counter() - start
    with ThreadPoolExecutor(4) as pool:
        start = time.perf_counter(); list(pool.map(lambda m: gen.complete(m, tokens), prompts[:4])); together = time.perf_counter() - start
    print(f"openvino {quantizations[0]}: 4 prompts one after another {alone:.1f} s, at once {together:.1f} s ({alone / together:.2f}x)")


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--questions', type=int, default=12)
    ap.add_argument('--quantizations', default='int8,fp16')
    ap.add_argument('--tokens', type=int, default=64)
    a = ap.parse_args()
    main(a.questions, a.quantizations.split(','), a.tokens)
