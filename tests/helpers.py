"""Shared by the tests: small random Hugging Face GPT-2, Llama-family,
GPT-NeoX, Phi and GPT-J models with every tensor perturbed (so biases and norm weights are
exercised), saved and converted through the public converter; each sender's
output recorded by PyTorch hooks; the accelerator path forced on the CPU."""

from __future__ import annotations

import numpy as np


def random_hf_gpt2(tmp_path, *, tied=True, n_layer=2, n_embd=16, n_head=2, vocab=61, n_positions=24, seed=0, scale=0.1, **extra):
    """(torch model in eval mode, acdc_jax model converted from its saved files)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab, n_positions=n_positions,
        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, **extra,
    )
    return _perturbed(GPT2LMHeadModel(config), scale, tmp_path / f"gpt2_{'tied' if tied else 'untied'}_{seed}")


def random_hf_llama(tmp_path, *, model_type="llama", n_layers=2, d_model=32, n_heads=4, n_kv=2, d_mlp=48, vocab=61,
                    seed=0, scale=0.1, name=None, **extra):
    """(torch model in eval mode, acdc_jax model converted from its saved
    files) for a small random Llama, Mistral, Qwen2, Qwen3, Gemma 1-3, OLMo or Phi-3 with grouped-query
    attention and every tensor perturbed (so the RMSNorm weights are exercised)."""
    import torch
    import transformers

    config_cls, model_cls = {
        "llama": ("Llama", "Llama"), "mistral": ("Mistral", "Mistral"), "qwen2": ("Qwen2", "Qwen2"),
        "qwen3": ("Qwen3", "Qwen3"), "olmo": ("Olmo", "Olmo"), "olmo2": ("Olmo2", "Olmo2"), "olmo3": ("Olmo3", "Olmo3"),
        "smollm3": ("SmolLM3", "SmolLM3"), "granite": ("Granite", "Granite"),
        "gemma": ("Gemma", "Gemma"), "gemma2": ("Gemma2", "Gemma2"), "gemma3_text": ("Gemma3Text", "Gemma3"),
        "phi3": ("Phi3", "Phi3")}[model_type]
    if model_type == "phi3":
        extra.setdefault("pad_token_id", 0)  # Phi3Config's default, 32000, is outside a small vocabulary
    if model_type in ("olmo", "olmo2", "olmo3", "smollm3"):
        extra.setdefault("eos_token_id", 0)  # OlmoConfig's default, 50279, likewise
    if model_type == "smollm3":  # SmolLM3Config's special tokens lie outside a small vocabulary
        extra.setdefault("pad_token_id", 0)
        extra.setdefault("bos_token_id", 0)
    torch.manual_seed(seed)
    config = getattr(transformers, f"{config_cls}Config")(
        hidden_size=d_model, num_attention_heads=n_heads, num_key_value_heads=n_kv, intermediate_size=d_mlp,
        num_hidden_layers=n_layers, vocab_size=vocab, max_position_embeddings=64, **extra,
    )
    pt = getattr(transformers, f"{model_cls}ForCausalLM")(config)
    return _perturbed(pt, scale, tmp_path / (name or f"{model_type}_{seed}"))


def random_hf_gpt_neox(tmp_path, *, n_layers=2, d_model=32, n_heads=4, d_mlp=48, vocab=61, seed=0, scale=0.1,
                       name=None, **extra):
    """(torch model in eval mode, acdc_jax model converted from its saved
    files) for a small random GPT-NeoX (Pythia's layout: parallel attention
    and MLP, rotary over a quarter of each head), every tensor perturbed."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(hidden_size=d_model, num_attention_heads=n_heads, intermediate_size=d_mlp,
                           num_hidden_layers=n_layers, vocab_size=vocab, max_position_embeddings=64, **extra)
    return _perturbed(GPTNeoXForCausalLM(config), scale, tmp_path / (name or f"gpt_neox_{seed}"))


def random_hf_parallel(tmp_path, *, model_type="phi", n_layers=2, d_model=32, n_heads=4, d_mlp=48, vocab=61, seed=0,
                       scale=0.1, name=None, **extra):
    """(torch model in eval mode, acdc_jax model converted from its saved
    files) for a small random Phi or GPT-J (attention and MLP in parallel on
    one LayerNorm, partial rotary), every tensor perturbed."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if model_type == "phi":
        config = transformers.PhiConfig(hidden_size=d_model, num_attention_heads=n_heads, intermediate_size=d_mlp,
                                        num_hidden_layers=n_layers, vocab_size=vocab, max_position_embeddings=64,
                                        **extra)
        pt = transformers.PhiForCausalLM(config)
    else:
        extra.setdefault("rotary_dim", 4)
        config = transformers.GPTJConfig(n_embd=d_model, n_head=n_heads, n_inner=d_mlp, n_layer=n_layers,
                                         vocab_size=vocab, n_positions=64, **extra)
        pt = transformers.GPTJForCausalLM(config)
    return _perturbed(pt, scale, tmp_path / (name or f"{model_type}_{seed}"))


def _perturbed(pt, scale, out):
    """(pt in eval mode with scale * N(0, 1) added to every tensor, its
    conversion from the files saved to `out`)."""
    import torch

    import converters

    pt = pt.eval()
    with torch.no_grad():
        for p in pt.parameters():
            p.add_(scale * torch.randn_like(p))
    pt.save_pretrained(out)
    return pt, converters.convert(out)


def record_senders(pt, tokens, layers, n_heads: int, d_head: int, out_proj, head_weight, embed,
                   post_norms=None) -> dict:
    """Each sender's output and each layer's input residual in the HF model
    `pt` on `tokens`, by hooks: ("head", l, h), the head's z times its rows of
    the attention output projection ``out_proj(layer)`` (``head_weight(W,
    rows)`` is that [d_head, d_model] block; no bias), ("mlp", l) from
    ``layer.mlp``, ("resid", l), and ("embed",) = ``embed(tokens)``. With
    ``post_norms(layer)`` = (norm after attention, norm after the MLP), as
    in Gemma 2 and OLMo 2, a head's output is scaled as its share of the first
    norm (weight / rms of the projection's output) and the MLP's is the second's."""
    import torch

    acts, hooks = {}, []
    for l, blk in enumerate(layers):
        def z_hook(mod, args, l=l):
            for h in range(n_heads):
                rows = slice(h * d_head, (h + 1) * d_head)
                acts[("head", l, h)] = args[0][..., rows] @ head_weight(mod.weight, rows)
        def mlp_hook(mod, args, out, l=l):
            acts[("mlp", l)] = out
        def resid_hook(mod, args, kwargs, l=l):
            acts[("resid", l)] = args[0] if args else kwargs["hidden_states"]
        def share_hook(mod, args, l=l):  # the factor of the RMSNorm (Gemma's weight 1 + w) on the heads' sum
            x = args[0]
            weight = (1.0 + mod.weight) if "Gemma" in type(mod).__name__ else mod.weight
            eps = mod.eps if hasattr(mod, "eps") else mod.variance_epsilon  # Gemma's name, Llama's
            factor = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
            for h in range(n_heads):
                acts[("head", l, h)] = acts[("head", l, h)] * factor
        mlp_out = blk.mlp if post_norms is None else post_norms(blk)[1]
        hooks += [out_proj(blk).register_forward_pre_hook(z_hook), mlp_out.register_forward_hook(mlp_hook),
                  blk.register_forward_pre_hook(resid_hook, with_kwargs=True)]
        if post_norms is not None:
            hooks.append(post_norms(blk)[0].register_forward_pre_hook(share_hook))
    with torch.no_grad():
        pt(tokens)
    for hk in hooks:
        hk.remove()
    acts[("embed",)] = embed(tokens)
    return acts


def assert_missing_tensor_named(directory, name: str) -> None:
    """With tensor `name` deleted from the saved model.safetensors in
    `directory`, the conversion fails naming it."""
    import pytest
    from safetensors.numpy import load_file, save_file

    import converters
    from acdc_jax.errors import CheckpointError

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    del tensors[name]
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=f"Missing tensor '{name}'"):
        converters.convert(directory)


def edit_config(directory, change: dict) -> None:
    """Overwrite fields of the config.json in `directory` (a saved HF model)."""
    import json

    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))


def torch_logits(pt, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return pt(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def logits_gap(model, pt, n_pos: int, vocab: int) -> float:
    """The largest difference between our model's logits and those of the
    transformers model `pt` on 3 random prompts (seed 0) of `n_pos` tokens."""
    import jax.numpy as jnp

    tokens = np.random.default_rng(0).integers(0, vocab, (3, n_pos))
    return np.abs(np.asarray(model(jnp.asarray(tokens))) - torch_logits(pt, tokens)).max()


def random_prompt_task(seed: int, vocab: int, name: str):
    """6 random clean and corrupted prompts of 8 tokens, metric at positions 5 and 7."""
    from acdc_jax.tasks import prompt_task

    rng = np.random.default_rng(seed)
    return prompt_task(rng.integers(0, vocab, (6, 8)).tolist(), rng.integers(0, vocab, (6, 8)).tolist(),
                       position=[5, 7], name=name)


def peaked_random_model_and_task(config, seed: int, prompt_seed: int, n_prompts: int, n_pos: int = 6):
    """A random `Transformer` with its unembedding scaled 10x (a peaked output,
    so that cutting edges moves KL) and random clean and corrupted prompts,
    KL at the last position."""
    import equinox as eqx
    import jax

    from acdc_jax.model import Transformer
    from acdc_jax.tasks.base import Task, kl_divergence

    model = Transformer(config, key=jax.random.PRNGKey(seed))
    model = eqx.tree_at(lambda m: m.unembed.W_U, model, model.unembed.W_U * 10.0)
    rng = np.random.default_rng(prompt_seed)
    shape = (n_prompts, n_pos)
    task = Task("random-kl", rng.integers(0, config.d_vocab, shape), rng.integers(0, config.d_vocab, shape),
                positions=np.array([n_pos - 1]), metrics={"kl": kl_divergence})
    return model, task


def force_accelerator_path(monkeypatch, covers_ahead: bool = False) -> None:
    """Scorers made from now on take one accelerator's path on the CPU:
    vmapped candidates (no CPU loop), dense masks made on the device from the
    cut edges, and a covering program first from each layer (with
    `covers_ahead`, the full pass and the covers compiled in background
    threads; off by default, as on a CPU those threads slow the passes, whose
    timing picks programs)."""
    from acdc_jax.scoring import Scorer

    monkeypatch.setenv("ACDC_JAX_COVERS_AHEAD", "1" if covers_ahead else "0")
    monkeypatch.setattr(Scorer, "_on_accelerator", staticmethod(lambda: True))


def assert_all_ones_and_zeros(model, graph, clean, corrupt) -> None:
    """All masks on give the plain forward, all off the corrupted run (1e-5)."""
    import jax.numpy as jnp

    from acdc_jax import Corruption, patched_forward

    corruption = Corruption.from_prompts(model, corrupt)
    ones = patched_forward(model, clean, graph.ones(), corruption, graph)
    zeros = patched_forward(model, clean, jnp.zeros(graph.n_edges), corruption, graph)
    assert np.abs(np.asarray(ones - model(clean))).max() <= 1e-5
    assert np.abs(np.asarray(zeros - model(corrupt))).max() <= 1e-5


def assert_cut_matches(pt, model, graph, names, clean, corrupt, reference: np.ndarray) -> None:
    """The edges `names` cut in the patched forward give `reference`, the same
    cut made by PyTorch hooks on `pt` (1e-4), and the cut changes the output."""
    import jax.numpy as jnp

    from acdc_jax import Corruption, patched_forward

    masks = graph.ones().at[jnp.asarray([graph.edge_index(n) for n in names])].set(0.0)
    ours = patched_forward(model, clean, masks, Corruption.from_prompts(model, corrupt), graph)
    assert np.abs(reference - torch_logits(pt, clean)).max() > 1e-3  # the cut matters
    assert np.abs(np.asarray(ours) - reference).max() <= 1e-4


def assert_acdc_matches_the_reference_loop(model, task, tau, monkeypatch=None):
    """The plain reference loop over patched forwards against both modes
    and, given `monkeypatch`, the vmapped accelerator path."""
    from acdc_jax import acdc

    from .test_acdc import _decisions, _reference

    ref = _reference(model, task, tau, task.make_corruption(model))
    assert 0 < sum(kept for *_, kept in ref) < len(ref)
    for mode in ("sequential", "batched"):
        assert _decisions(acdc(model, task, tau, mode=mode, progress=False, max_width=8)) == ref
    if monkeypatch is not None:
        force_accelerator_path(monkeypatch)
        assert _decisions(acdc(model, task, tau, progress=False, max_width=8)) == ref
