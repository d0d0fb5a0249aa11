"""Writes tests/data/gpt2_flax_tiny: a tiny random GPT-2 saved by Hugging Face
itself in both PyTorch (model.safetensors) and Flax (flax_model.msgpack) form.

transformers 5 dropped Flax, so this needs an environment with
``transformers<5``, ``flax`` and ``torch``; the files are committed so the tests
do not. Run: python tests/data/make_gpt2_flax_fixture.py
"""

from pathlib import Path

import torch
from transformers import FlaxGPT2LMHeadModel, GPT2Config, GPT2LMHeadModel

out = Path(__file__).parent / "gpt2_flax_tiny"
torch.manual_seed(0)
config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
pt = GPT2LMHeadModel(config).eval()
with torch.no_grad():  # non-zero biases and non-unit LayerNorm weights, so every tensor is tested
    for param in pt.parameters():
        param.add_(0.1 * torch.randn_like(param))
pt.save_pretrained(out)
flax = FlaxGPT2LMHeadModel.from_pretrained(out, from_pt=True)
flax.save_pretrained(out)
for name in sorted(p.name for p in out.iterdir()):
    print(name)
