"Fine-tuning: resuming an interrupted run, and a fine-tuned model that answers with its adapter."
import json

import pytest
import torch
from transformers import TrainerCallback

from llmops_tpl.rag import LocalGenerator
from llmops_tpl.finetune import finetune, lora_config, sft_config
from llmops_tpl.rag import load_generator
from llmops_tpl.hub import fetch_base_model

ROWS = [{'prompt': [{'role': 'user', 'content': f"Question {i}: which library builds the vector index?"}],
         'completion': [{'role': 'assistant', 'content': 'hnswlib builds it [source: guide/index.md].'}]} for i in range(8)]


class Interrupt(TrainerCallback):
    "Stops the process-like run at a given step, as a crash or Ctrl-C would."
    def __init__(self, at): self.at = at
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at: raise KeyboardInterrupt(f"interrupted at step {self.at}")


class CountSteps(TrainerCallback):
    def __init__(self): self.steps = []
    def on_step_end(self, args, state, control, **kw): self.steps.append(state.global_step)


@pytest.fixture(scope='module')
def base(tmp_path_factory):
    return fetch_base_model('HuggingFaceTB/SmolLM2-135M-Instruct', tmp_path_factory.mktemp('hub'))[0]


def test_interrupted_run_resumes_from_its_last_checkpoint(base, tmp_path):
    cfg = sft_config(tmp_path, lr=2e-3, batch_size=4, max_steps=4, save_steps=2, max_length=64)
    lora = lora_config(r=4, alpha=8, target_modules=['q_proj', 'v_proj'])
    with pytest.raises(KeyboardInterrupt):
        finetune(base, ROWS, tmp_path, cfg, lora, callbacks=[Interrupt(3)])
    assert (tmp_path/'checkpoint-2').is_dir() and not (tmp_path/'adapter').exists()
    counter = CountSteps()
    adapter, history = finetune(base, ROWS, tmp_path, cfg, lora, callbacks=[counter])
    assert counter.steps == [3, 4], 'the second run trains only the steps after the checkpoint'
    assert [h['step'] for h in history if 'loss' in h] == [1, 2, 3, 4]
    assert json.loads((adapter/'adapter_config.json').read_text())['r'] == 4


def test_fine_tuned_model_loads_with_its_adapter_and_differs_from_base(base, tmp_path):
    cfg = sft_config(tmp_path, lr=5e-3, batch_size=4, max_steps=3, save_steps=100, max_length=64)
    adapter, history = finetune(base, ROWS, tmp_path, cfg, lora_config(r=8, alpha=16, target_modules=['q_proj', 'v_proj']))
    losses = [h['loss'] for h in history if 'loss' in h]
    assert losses[-1] < losses[0]
    tuned, tok = load_generator(base, adapter)
    plain, _ = load_generator(base)
    ids = tok.apply_chat_template(ROWS[0]['prompt'], add_generation_prompt=True, return_tensors='pt', return_dict=True)
    with torch.no_grad():
        assert not torch.allclose(tuned(**ids).logits, plain(**ids).logits), 'the adapter changes the model'
    assert LocalGenerator(base, adapter).complete(ROWS[0]['prompt'], max_new_tokens=8)['text']


def test_corrupt_adapter_folder_is_named_in_the_error(base, tmp_path):
    (tmp_path/'adapter_config.json').write_text(json.dumps({'r': 8}))
    with pytest.raises(ValueError, match=f"{tmp_path} is not a LoRA adapter folder: no adapter_model weights"):
        load_generator(base, tmp_path)
