"""The fine-tuning stage's code on a CUDA GPU, unchanged: precision, loss path, a falling loss, step time against a plain loop.

Usage: python bench/finetune_cuda.py MODEL_DIR [--steps 12] [--batch 8] [--tokens 256]

MODEL_DIR is a Hugging Face model folder. When it holds no weights (config and tokenizer only, small enough to copy to a GPU machine),
the model is initialised at random from its config: the code path is the same, only the loss values differ. Checks, as assertions:
`sft_config` turns bf16 on, `finetune` trains on the GPU (trl's own loss, not the CPU one) and lowers the loss, and the adapter loads
back. Prints the stage trainer's step time and tokens/s against a plain PyTorch + PEFT bf16 loop on the same batch, in this run.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from finetune_step import rows
from llmops_tpl.finetune import finetune, lora_config, sft_config
from llmops_tpl.rag import load_generator


class StepTimer(TrainerCallback):
    def __init__(self): self.times = []
    def on_step_begin(self, args, state, control, **kw): torch.cuda.synchronize(); self.t = time.perf_counter()
    def on_step_end(self, args, state, control, **kw): torch.cuda.synchronize(); self.times.append(time.perf_counter() - self.t)


def model_folder(src, dest):
    "`src` itself when it has weights, else a random initialisation of its config saved with its tokenizer in `dest`."
    if any(Path(src).glob('*.safetensors')): return Path(src)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).save_pretrained(dest)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    return Path(dest)


def plain_loop(base, tok, data, steps, max_length):
    from peft import get_peft_model
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).cuda(), lora_config())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    texts = [tok.apply_chat_template(r['prompt'] + r['completion'], tokenize=False) for r in data]
    enc = tok(texts, return_tensors='pt', padding=True, truncation=True, max_length=max_length).to('cuda')
    labels = enc['input_ids'].masked_fill(enc['attention_mask'] == 0, -100)
    times = []
    for _ in range(steps):
        torch.cuda.synchronize(); t = time.perf_counter()
        model(**enc, labels=labels).loss.backward(); opt.step(); opt.zero_grad()
        torch.cuda.synchronize(); times.append(time.perf_counter() - t)
    return times, int(enc['attention_mask'].sum())


def main(model_dir, steps, batch, tokens):
    assert torch.cuda.is_available(), 'no CUDA device'
    print(torch.cuda.get_device_name(), 'torch', torch.__version__)
    with tempfile.TemporaryDirectory() as d:
        base = model_folder(model_dir, Path(d)/'base')
        tok = AutoTokenizer.from_pretrained(base)
        data, max_length = rows(batch, tokens), tokens + 64
        cfg = sft_config(Path(d)/'run', lr=2e-3, batch_size=batch, max_steps=steps, max_length=max_length, save_steps=10_000, sampling='random')
        assert cfg.bf16, 'sft_config should choose bf16 on a bf16-capable GPU'
        timer = StepTimer()
        adapter, history = finetune(base, data, Path(d)/'run', cfg, lora_config(), callbacks=[timer])
        losses = [h['loss'] for h in history if 'loss' in h]
        assert losses[-1] < losses[0], losses
        model, _ = load_generator(base, adapter)
        assert any('lora' in k for k in model.state_dict())
        plain, n_tokens = plain_loop(base, tok, data, steps, max_length)
    med = lambda ts: statistics.median(ts[1:])
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} updates; adapter loads back")
    print(f"batch of {batch} examples, {n_tokens} tokens; median of {steps - 1} steps after a warm-up")
    for name, ts in [('plain PyTorch + PEFT loop, bf16', plain), ('finetune() / CPUSFTTrainer, bf16', timer.times)]:
        print(f"{name:34} {med(ts) * 1000:8.1f} ms/step  {n_tokens / med(ts):9.0f} tokens/s  ratio to plain loop {med(ts) / med(plain):.2f}x")


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('model_dir')
    ap.add_argument('--steps', type=int, default=12)
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--tokens', type=int, default=256)
    a = ap.parse_args()
    main(a.model_dir, a.steps, a.batch, a.tokens)
