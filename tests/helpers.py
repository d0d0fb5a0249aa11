"""Shared by the tests: small random Hugging Face GPT-2s with every tensor
perturbed (so biases and LayerNorm weights are exercised), saved and
converted through the public converter; the accelerator path forced on the CPU."""

from __future__ import annotations

import numpy as np


def random_hf_gpt2(tmp_path, *, tied=True, n_layer=2, n_embd=16, n_head=2, vocab=61, n_positions=24, seed=0, scale=0.1, **extra):
    """(torch model in eval mode, acdc_jax model converted from its saved files)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import converters

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab, n_positions=n_positions,
        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, **extra,
    )
    pt = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in pt.parameters():
            p.add_(scale * torch.randn_like(p))
    out = tmp_path / f"gpt2_{'tied' if tied else 'untied'}_{seed}"
    pt.save_pretrained(out)
    return pt, converters.convert(out)


def random_hf_llama(tmp_path, *, model_type="llama", n_layers=2, d_model=32, n_heads=4, n_kv=2, d_mlp=48, vocab=61,
                    seed=0, scale=0.1, name=None, **extra):
    """(torch model in eval mode, acdc_jax model converted from its saved
    files) for a small random Llama, Mistral or Qwen2 with grouped-query
    attention and every tensor perturbed (so the RMSNorm weights are exercised)."""
    import torch
    import transformers

    import converters

    cls = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[model_type]
    torch.manual_seed(seed)
    config = getattr(transformers, f"{cls}Config")(
        hidden_size=d_model, num_attention_heads=n_heads, num_key_value_heads=n_kv, intermediate_size=d_mlp,
        num_hidden_layers=n_layers, vocab_size=vocab, max_position_embeddings=64, **extra,
    )
    pt = getattr(transformers, f"{cls}ForCausalLM")(config).eval()
    with torch.no_grad():
        for p in pt.parameters():
            p.add_(scale * torch.randn_like(p))
    out = tmp_path / (name or f"{model_type}_{seed}")
    pt.save_pretrained(out)
    return pt, converters.convert(out)


def random_hf_gpt_neox(tmp_path, *, n_layers=2, d_model=32, n_heads=4, d_mlp=48, vocab=61, seed=0, scale=0.1,
                       name=None, **extra):
    """(torch model in eval mode, acdc_jax model converted from its saved
    files) for a small random GPT-NeoX (Pythia's layout: parallel attention
    and MLP, rotary over a quarter of each head), every tensor perturbed."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    import converters

    torch.manual_seed(seed)
    config = GPTNeoXConfig(hidden_size=d_model, num_attention_heads=n_heads, intermediate_size=d_mlp,
                           num_hidden_layers=n_layers, vocab_size=vocab, max_position_embeddings=64, **extra)
    pt = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():
        for p in pt.parameters():
            p.add_(scale * torch.randn_like(p))
    out = tmp_path / (name or f"gpt_neox_{seed}")
    pt.save_pretrained(out)
    return pt, converters.convert(out)


def torch_logits(pt, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return pt(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def force_accelerator_path(monkeypatch) -> None:
    """Scorers made from now on take one accelerator's path on the CPU:
    vmapped candidates (no CPU loop), dense masks made on the device from the
    cut edges, and a covering program first from each layer."""
    from acdc_jax.scoring import Scorer

    init = Scorer.__init__

    def as_on_accelerator(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.loop, self.cuts_to_device, self.cover_first = False, True, True

    monkeypatch.setattr(Scorer, "__init__", as_on_accelerator)
