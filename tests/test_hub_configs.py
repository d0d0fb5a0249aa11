"""The config.json files of models researchers use (as published on the
Hugging Face hub; no weights are needed) convert to the intended
TransformerConfig, and every rotary frequency and cos/sin factor equals the
one transformers computes from the same file."""

import math

import numpy as np
import pytest

import converters

HUB = {
    "Llama-3.2-1B": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": True,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256},
    "Qwen2.5-0.5B": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936},
    "Qwen3-0.6B": {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
        "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960,
        "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936},
    "OLMo-1B-hf": {
        "architectures": ["OlmoForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": None,
        "clip_qkv": None, "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 2048, "model_type": "olmo",
        "num_attention_heads": 16, "num_hidden_layers": 16, "num_key_value_heads": 16, "pad_token_id": 1,
        "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "float32",
        "transformers_version": "4.40.0.dev0", "use_cache": True, "vocab_size": 50304},
    "Mistral-7B-v0.1": {
        "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
        "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000},
    "gemma-2b": {
        "architectures": ["GemmaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 2,
        "eos_token_id": 1, "head_dim": 256, "hidden_act": "gelu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 16384, "max_position_embeddings": 8192, "model_type": "gemma",
        "num_attention_heads": 8, "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
        "transformers_version": "4.38.0.dev0", "use_cache": True, "vocab_size": 256000},
    "gemma-2-2b": {
        "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
        "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02,
        "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2",
        "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
        "torch_dtype": "float32", "transformers_version": "4.42.4", "use_cache": True, "vocab_size": 256000},
    # its attention scale is sqrt(144), not sqrt(head_dim); sliding_window_size is an older name no one reads
    "gemma-2-27b": {
        "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
        "final_logit_softcapping": 30.0, "head_dim": 128, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 4608, "initializer_range": 0.02,
        "intermediate_size": 36864, "max_position_embeddings": 8192, "model_type": "gemma2",
        "num_attention_heads": 32, "num_hidden_layers": 46, "num_key_value_heads": 16, "pad_token_id": 0,
        "query_pre_attn_scalar": 144, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
        "sliding_window_size": 4096, "torch_dtype": "float32", "transformers_version": "4.42.0.dev0",
        "use_cache": True, "vocab_size": 256000},
    "gemma-3-1b-pt": {
        "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
        "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 1152, "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
        "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
        "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144},
    # image-text: its text_config gives only what differs from transformers' Gemma3TextConfig defaults
    "gemma-3-4b-pt": {
        "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
        "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
        "model_type": "gemma3",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
        "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                          "patch_size": 14, "vision_use_head": False}},
    "pythia-70m": {
        "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "classifier_dropout": 0.1, "eos_token_id": 0,
        "hidden_act": "gelu", "hidden_size": 512, "initializer_range": 0.02, "intermediate_size": 2048,
        "layer_norm_eps": 1e-05, "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 8,
        "num_hidden_layers": 6, "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.24.0", "use_cache": True, "use_parallel_residual": True,
        "vocab_size": 50304},
    "phi-2": {
        "architectures": ["PhiForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 50256, "embd_pdrop": 0.0,
        "eos_token_id": 50256, "hidden_act": "gelu_new", "hidden_size": 2560, "initializer_range": 0.02,
        "intermediate_size": 10240, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048, "model_type": "phi",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "partial_rotary_factor": 0.4,
        "qk_layernorm": False, "resid_pdrop": 0.1, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.37.0", "use_cache": True,
        "vocab_size": 51200},
    "gpt-j-6b": {
        "activation_function": "gelu_new", "architectures": ["GPTJForCausalLM"], "attn_pdrop": 0.0,
        "bos_token_id": 50256, "embd_pdrop": 0.0, "eos_token_id": 50256, "gradient_checkpointing": False,
        "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gptj", "n_embd": 4096, "n_head": 16,
        "n_inner": None, "n_layer": 28, "n_positions": 2048, "resid_pdrop": 0.0, "rotary": True, "rotary_dim": 64,
        "scale_attn_weights": True, "summary_activation": None, "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
        "tie_word_embeddings": False, "tokenizer_class": "GPT2Tokenizer", "transformers_version": "4.18.0.dev0",
        "use_cache": True, "vocab_size": 50400},
    "Phi-3-mini-4k-instruct": {
        "_name_or_path": "Phi-3-mini-4k-instruct", "architectures": ["Phi3ForCausalLM"], "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config",
                     "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"},
        "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072,
        "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 4096, "model_type": "phi3",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.40.2", "use_cache": True, "attention_bias": False,
        "vocab_size": 32064},
}
# (n_layers, n_heads, d_head, d_mlp, n_ctx, rotary_dim, parallel, act) as each model card describes it
EXPECTED = {
    "Llama-3.2-1B": (16, 32, 64, 8192, 131072, 64, False, "silu"),
    "Qwen2.5-0.5B": (24, 14, 64, 4864, 32768, 64, False, "silu"),
    "Qwen3-0.6B": (28, 16, 128, 3072, 40960, 128, False, "silu"),
    "OLMo-1B-hf": (16, 16, 128, 8192, 2048, 128, False, "silu"),
    "Mistral-7B-v0.1": (32, 32, 128, 14336, 4096, 128, False, "silu"),  # the sliding window bounds prompts
    "gemma-2b": (18, 8, 256, 16384, 8192, 256, False, "gelu_new"),
    "gemma-2-2b": (26, 8, 256, 9216, 4096, 256, False, "gelu_new"),  # the sliding window bounds prompts
    "gemma-2-27b": (46, 32, 128, 36864, 4096, 128, False, "gelu_new"),
    "gemma-3-1b-pt": (26, 4, 256, 6912, 512, 256, False, "gelu_new"),
    "gemma-3-4b-pt": (34, 8, 256, 10240, 1024, 256, False, "gelu_new"),
    "pythia-70m": (6, 8, 64, 2048, 2048, 16, True, "gelu"),
    "phi-2": (32, 32, 80, 10240, 2048, 32, True, "gelu_new"),
    "gpt-j-6b": (28, 16, 256, 16384, 2048, 64, True, "gelu_new"),
    "Phi-3-mini-4k-instruct": (32, 32, 96, 8192, 2047, 96, False, "silu"),  # the sliding window bounds prompts
}


def _config(name):
    cfg = HUB[name]
    if cfg["model_type"] in converters.LLAMA_TYPES:
        return converters.llama_config(cfg)[0]
    if cfg["model_type"] == "gpt_neox":
        return converters.gpt_neox_config(cfg)[0]
    return converters.phi_gptj_config(cfg)[0]


@pytest.mark.parametrize("name", sorted(HUB))
def test_hub_configs_convert_as_their_model_cards_say(name):
    c = _config(name)
    got = (c.n_layers, c.n_heads, c.d_head, c.d_mlp, c.n_ctx, c.rotary_dim, c.parallel_attn_mlp, c.act_fn)
    assert got == EXPECTED[name]


# GPT-J's frequencies have no config field; Gemma 3 has two sets (below)
@pytest.mark.parametrize("name", sorted(set(HUB) - {"gpt-j-6b", "gemma-3-1b-pt", "gemma-3-4b-pt"}))
def test_rotary_frequencies_are_transformers_own(name):
    import transformers

    cfg = HUB[name]
    hf = transformers.AutoConfig.for_model(**cfg)
    module = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "olmo": "olmo", "mistral": "mistral", "gemma": "gemma", "gemma2": "gemma2",
              "gpt_neox": "gpt_neox", "phi": "phi", "phi3": "phi3"}[cfg["model_type"]]
    modeling = __import__(f"transformers.models.{module}.modeling_{module}", fromlist=["_"])
    rotary = next(getattr(modeling, n) for n in dir(modeling) if n.endswith("RotaryEmbedding"))(hf)
    c = _config(name)
    ours, theirs = np.asarray(c.rotary.inv_freq, np.float32), rotary.inv_freq.float().numpy()
    # PyTorch's float32 powers are nearly correctly rounded, ours rounded from float64: an ulp apart now and then
    np.testing.assert_array_max_ulp(ours, theirs, maxulp=1)
    assert (ours != theirs).sum() <= max(1, ours.size // 32)
    scale = math.sqrt(cfg.get("query_pre_attn_scalar", c.d_head))  # Gemma 2 names its own
    assert c.attn_scale == pytest.approx(scale / rotary.attention_scaling ** 2)


@pytest.mark.parametrize("name", ["gemma-2-2b", "gemma-2-27b"])
def test_gemma2_configs_read_their_caps_and_norms(name):
    """The caps and query_pre_attn_scalar as transformers' Gemma2Config holds them."""
    import transformers

    hf = transformers.AutoConfig.for_model(**HUB[name])
    c = _config(name)
    assert c.post_norm and (c.attn_softcap, c.logit_softcap) == (hf.attn_logit_softcapping, hf.final_logit_softcapping)
    assert c.attn_scale == pytest.approx(hf.query_pre_attn_scalar ** 0.5)


@pytest.mark.parametrize("name,n_local", [("gemma-3-1b-pt", 22), ("gemma-3-4b-pt", 29)])
def test_gemma3_reads_both_layer_types_rotations(name, n_local):
    """Every sixth layer global (rotary base 1e6; 4B: linearly scaled by 8),
    the rest local (1e4), as transformers' Gemma3RotaryEmbedding holds them;
    queries and keys normed. The 4B image-text config's text model fills its
    text_config with transformers' defaults."""
    import transformers
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    hf = transformers.AutoConfig.for_model(**HUB[name])
    hf = hf.text_config if name == "gemma-3-4b-pt" else hf
    rotary, c = Gemma3RotaryEmbedding(hf), _config(name)
    assert c.qk_norm and c.post_norm and (c.attn_softcap, c.logit_softcap) == (None, None)
    assert (c.n_heads, c.d_head, c.d_vocab, c.attn_scale) == (hf.num_attention_heads, hf.head_dim, hf.vocab_size,
                                                             hf.query_pre_attn_scalar ** 0.5)
    assert c.rotary_local_layers == tuple(i for i, t in enumerate(hf.layer_types) if t == "sliding_attention")
    assert len(c.rotary_local_layers) == n_local
    ours = np.asarray(c.rotary.inv_freq, np.float64)
    np.testing.assert_allclose(ours, rotary.full_attention_inv_freq.double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(c.rotary_local_inv_freq, rotary.sliding_attention_inv_freq.double().numpy(), rtol=1e-6)
