"""Does preference learning from reviews help? The SFT model's failures, corrected by a reviewer, drive one more round with DPO.

Usage: cd PROJECT && /path/to/.venv/bin/python /path/to/bench/dpo.py [--questions 24]
(PROJECT: a clone of the template after `llmops-tpl repro`; its feedback store and params.yaml are changed, so use a copy.)

The round a team would run: the registered SFT model answers `questions` training questions; each answer that is not the
reference gets a thumbs-down with the reference as its correction, accepted by a reviewer. Each such row is a training example for
SFT, a regression question, and a preference pair (the correction over the answer). `dpo.min_pairs` is set to the number of pairs
and `llmops-tpl repro` runs the next round: the dataset, SFT again (with the corrections), DPO from it, and `evaluate` with `base`,
`finetuned` (SFT) and `dpo` on the same held-out questions and regression set. Printed: each variant's held-out and regression
metrics, DPO's margin over SFT, the dpo stage's report and the round's time.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import yaml

from llmops_tpl.config import load_params, project_path
from llmops_tpl.feedback import add_feedback, open_store, review
from llmops_tpl.index import Retriever
from llmops_tpl.rag import LocalGenerator, RAGChain

SHOWN = ['similarity', 'token_f1', 'cites_source', 'cites_answer_source', 'regression_similarity',
         'regression_token_f1', 'regression_cites_source']


def training_questions(dataset_dir: Path, n: int) -> list[tuple[str, str]]:
    "The first `n` training questions and their references, read back from the SFT examples."
    rows = [json.loads(line) for line in (dataset_dir/'train.jsonl').read_text().splitlines()]
    return [(r['prompt'][1]['content'].rsplit('Question: ', 1)[1], r['completion'][0]['content']) for r in rows[:n]]


def correct_failures(p: dict, n: int) -> int:
    "Answer `n` training questions with the SFT model; rate each wrong answer down, corrected and accepted. Returns how many."
    paths = p['paths']
    base = project_path(json.loads(project_path(paths['base_model']).read_text())['path'])
    chain = RAGChain(Retriever(project_path(paths['index'])), LocalGenerator(base, project_path(paths['adapter'])),
                     p['dataset']['k'], p['rag']['max_new_tokens'])
    store = open_store(f"sqlite:///{project_path('feedback.db')}")
    corrected = 0
    for question, reference in training_questions(project_path(paths['dataset']), n):
        answer = chain.answer(question)['answer']
        if answer.strip() == reference.strip(): continue
        fid = add_feedback(store, question, answer, 'down', 'not what the page says', reference, model_version='sft')
        review(store, fid, 'accepted', 'bench')
        corrected += 1
    return corrected


def main(n):
    mlflow.tracing.disable()  # the bench's own answers are not traffic
    p = load_params()
    start = time.perf_counter()
    pairs = correct_failures(p, n)
    print(f"{pairs} of {n} SFT answers corrected ({time.perf_counter() - start:.0f} s)")
    params = yaml.safe_load(Path('params.yaml').read_text())
    params['dpo']['min_pairs'] = pairs
    Path('params.yaml').write_text(yaml.safe_dump(params, sort_keys=False))
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent/'llmops-tpl'), 'repro'], check=True)
    minutes = (time.perf_counter() - start) / 60
    evl, dpo = (json.loads(Path(f"metrics/{m}.json").read_text()) for m in ('eval', 'dpo'))
    table = pd.DataFrame({v: {m: evl[v].get(m) for m in SHOWN} for v in ('base', 'finetuned', 'dpo') if v in evl})
    if 'dpo' in table: table['dpo - sft'] = table['dpo'] - table['finetuned']
    print(f"the round took {minutes:.1f} min; held-out questions: {evl['finetuned']['questions']}, "
          f"regression questions: {evl['finetuned'].get('regression_questions')}")
    print(table.astype(float).round(3).to_string())
    print(json.dumps(dpo, indent=1))


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--questions', type=int, default=24)
    main(ap.parse_args().questions)
