"""Step time of the fine-tuning trainer against a plain PyTorch + PEFT loop on the same batch, and training tokens/s.

Usage: .venv/bin/python bench/finetune_step.py [--steps 4] [--batch 8] [--tokens 128]

All runs train the same LoRA (params.yaml's finetune section is not read: r=16, alpha=32, all linear layers) on the same
`batch` examples of about `tokens` tokens each, in this process, one after the other, fp32 on the CPU; the first step of each is a
warm-up and is not counted. Rows: the plain loop (baseline); `CPUSFTTrainer` (the stage's trainer); trl's `SFTTrainer` with the same
config (fp32, no checkpointing) but its own fused loss. trl's bf16 default is not run: ~180 s a step here.
"""
import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTTrainer

from llmops_tpl.finetune import CPUSFTTrainer, lora_config, sft_config
from llmops_tpl.hub import fetch_base_model


class StepTimer(TrainerCallback):
    def __init__(self): self.times = []
    def on_step_begin(self, args, state, control, **kw): self.t = time.perf_counter()
    def on_step_end(self, args, state, control, **kw): self.times.append(time.perf_counter() - self.t)


def rows(batch, tokens):
    words = ' '.join(['the index stage embeds every chunk and builds an hnswlib graph'] * (tokens // 12))
    return [{'prompt': [{'role': 'user', 'content': f"question {i}: what does the index stage do?"}],
             'completion': [{'role': 'assistant', 'content': words}]} for i in range(batch)]


def plain_loop(base, tok, data, steps, max_length):
    from peft import get_peft_model
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), lora_config())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    texts = [tok.apply_chat_template(r['prompt'] + r['completion'], tokenize=False) for r in data]
    enc = tok(texts, return_tensors='pt', padding=True, truncation=True, max_length=max_length)
    labels = enc['input_ids'].masked_fill(enc['attention_mask'] == 0, -100)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = model(**enc, labels=labels).loss
        loss.backward(); opt.step(); opt.zero_grad()
        times.append(time.perf_counter() - t)
    return times, int(enc['attention_mask'].sum())


def trainer_steps(cls, base, tok, data, steps, max_length, out):
    timer = StepTimer()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = sft_config(out, batch_size=len(data), max_steps=steps, max_length=max_length, save_steps=10_000)
    from datasets import Dataset
    cls(model=model, args=cfg, train_dataset=Dataset.from_list(data), processing_class=tok, peft_config=lora_config(),
        callbacks=[timer]).train()
    return timer.times


def main(steps, batch, tokens):
    import tempfile
    torch.manual_seed(0)
    base, _ = fetch_base_model('HuggingFaceTB/SmolLM2-135M-Instruct', tempfile.gettempdir() + '/llmops-bench-hub')
    tok = AutoTokenizer.from_pretrained(base)
    data, max_length = rows(batch, tokens), tokens + 64
    plain, n_tokens = plain_loop(base, tok, data, steps, max_length)
    with tempfile.TemporaryDirectory() as d:
        ours = trainer_steps(CPUSFTTrainer, base, tok, data, steps, max_length, d)
    with tempfile.TemporaryDirectory() as d:
        stock = trainer_steps(SFTTrainer, base, tok, data, steps, max_length, d)
    med = lambda ts: statistics.median(ts[1:])
    print(f"batch of {batch} examples, {n_tokens} tokens in all; median of {steps - 1} steps after a warm-up; torch threads {torch.get_num_threads()}")
    for name, ts in [('plain PyTorch + PEFT loop', plain), ('CPUSFTTrainer (the stage)', ours), ("trl SFTTrainer, fp32, trl's loss", stock)]:
        print(f"{name:34} {med(ts):6.2f} s/step  {n_tokens / med(ts):7.1f} tokens/s  ratio to plain loop {med(ts) / med(plain):.2f}x")


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--steps', type=int, default=4)
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--tokens', type=int, default=128)
    a = ap.parse_args()
    main(a.steps, a.batch, a.tokens)
