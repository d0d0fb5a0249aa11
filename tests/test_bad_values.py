"""Bad values in saved models, tasks, configs and tokens raise errors that
name the problem (the malformed-checkpoint cases of the converters are in
test_bad_input.py)."""

import dataclasses
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import acdc_jax as aj
from acdc_jax import CheckpointError, ConfigError, TaskError, TransformerConfig
from acdc_jax.checkpoint import read_weights
from acdc_jax.tasks.base import Task, kl_divergence

CONFIG = TransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=11, n_ctx=6, d_mlp=None)


@pytest.fixture(scope="module")
def model():
    import jax.random as jr

    return aj.Transformer(CONFIG, key=jr.PRNGKey(0))


@pytest.fixture
def saved(model, tmp_path):
    return aj.save(model, tmp_path / "model")


def _tamper(directory, edit):
    arrays = load_file(str(directory / "model.safetensors"))
    edit(arrays)
    save_file(arrays, str(directory / "model.safetensors"))
    return directory


@pytest.mark.parametrize("edit,pattern", [
    (lambda a: a.pop("blocks.attn.W_Q"), r"Missing tensor 'blocks\.attn\.W_Q'.*expected shape \(1, 2, 8, 4\)"),
    (lambda a: a.update({"blocks.attn.W_K": a["blocks.attn.W_K"][..., :3].copy()}),
     r"'blocks\.attn\.W_K'.*has shape \(1, 2, 8, 3\), expected \(1, 2, 8, 4\)"),
    (lambda a: a.update({"unembed.W_U": a["unembed.W_U"].astype(np.int32)}), r"'unembed\.W_U'.*dtype int32"),
    (lambda a: a["embed.W_E"].__setitem__((3, 2), np.nan), r"'embed\.W_E'.*NaN or infinite"),
    (lambda a: a.update({"blocks.mlp.W_in": np.ones((1, 8, 16), np.float32)}),
     r"Unused tensor\(s\).*\['blocks\.mlp\.W_in'\]"),
])
def test_a_tampered_saved_model_is_refused(saved, edit, pattern):
    with pytest.raises(CheckpointError, match=pattern):
        aj.load(_tamper(saved, edit))


def test_a_saved_model_loads_back_equal(model, saved):
    tokens = jnp.asarray(np.arange(6)[None] % CONFIG.d_vocab)
    np.testing.assert_array_equal(np.asarray(aj.load(saved)(tokens)), np.asarray(model(tokens)))


@pytest.mark.parametrize("write,error,pattern", [
    (lambda p: p.write_text("{not json"), CheckpointError, "is not valid JSON"),
    (lambda p: p.write_text("[1, 2]"), CheckpointError, "must hold a JSON object, got list"),
    (lambda p: p.write_text(json.dumps({"format": "other"})), ConfigError, "not an acdc-jax model config"),
    (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "format_version": 99})), ConfigError,
     "Unsupported acdc-jax format_version 99"),
    (lambda p: p.unlink(), CheckpointError, "No config file at"),
    (lambda p: (p.parent / "model.safetensors").unlink(), CheckpointError, "No weights file at"),
])
def test_a_broken_saved_model_directory_is_refused(saved, write, error, pattern):
    write(saved / "config.json")
    with pytest.raises(error, match=pattern):
        aj.load(saved)


def test_torch_files_that_are_not_state_dicts_are_refused(tmp_path):
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="holds a Tensor, not a state dict"):
        read_weights(tmp_path / "tensor.pt")
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="Entry 'step' .* is a int, not a tensor"):
        read_weights(tmp_path / "mixed.pt")
    (tmp_path / "garbage.bin").write_bytes(b"\x00not a torch file")
    with pytest.raises(CheckpointError, match="Cannot read .* as a torch state dict"):
        read_weights(tmp_path / "garbage.bin")
    np.savez(tmp_path / "weights.npz", w=np.ones(2))
    with pytest.raises(CheckpointError, match="Unknown weights file type '.npz'"):
        read_weights(tmp_path / "weights.npz")


@pytest.mark.parametrize("fields,pattern", [
    (dict(n_layers=0), "n_layers must be a positive int, got 0"),
    (dict(d_model=8.0), "d_model must be a positive int, got 8.0"),
    (dict(d_mlp=-4), "d_mlp must be a positive int"),
    (dict(act_fn="swish"), "act_fn='swish' is not supported"),
    (dict(causal="yes"), "causal must be a bool"),
    (dict(ln_eps=-1e-5), "ln_eps must be a positive float"),
    (dict(attn_scale=0), "attn_scale must be a positive float"),
    (dict(rotary_dim=4), "rotary_dim is set but positional='learned'"),
    (dict(rotary_inv_freq=(1.0,)), "rotary_inv_freq is set but positional='learned'"),
    (dict(positional="rotary", rotary_dim=4, rotary_inv_freq=(1.0,)), "rotary_inv_freq must be rotary_dim / 2 = 2"),
    (dict(positional="rotary", rotary_dim=4, rotary_inv_freq=(1.0, float("nan"))), "positive finite floats"),
    (dict(positional="rotary", rotary_dim=3), "rotary_dim=3 must be even and at most d_head"),
    (dict(positional="rotary", rotary_dim=64), "rotary_dim=64 must be even and at most d_head"),
    (dict(positional="rotary", rotary_base=1.0), "rotary_base must be a float above 1"),
    (dict(gated_mlp=1), "gated_mlp must be a bool"),
    (dict(gated_mlp=True, d_mlp=None), "gated_mlp=True needs an MLP"),
    (dict(parallel_attn_mlp="yes"), "parallel_attn_mlp must be a bool"),
    (dict(parallel_attn_mlp=True), "parallel_attn_mlp=True needs an MLP"),
    (dict(pre_norm=1), "pre_norm must be a bool, got 1"),
    (dict(normalization="RMS", qk_norm="yes"), "qk_norm must be a bool"),
    (dict(positional="rotary", rotary_dim=4, rotary_attention_factor=0.0), "rotary_attention_factor must be a "
     "positive finite float, got 0.0"),
    (dict(rotary_attention_factor=1.5), r"rotary_attention_factor=1.5 needs positional='rotary'"),
    (dict(rotary_local_layers=(0,)), "rotary_local_layers is set but positional='learned'"),
])
def test_bad_config_fields_are_named(fields, pattern):
    with pytest.raises(ConfigError, match=pattern):
        dataclasses.replace(CONFIG, **fields)


def test_config_dicts_with_unknown_or_missing_fields_are_refused():
    d = CONFIG.to_dict()
    assert TransformerConfig.from_dict(d) == CONFIG
    read = TransformerConfig.from_dict(json.loads(json.dumps(d)))  # as a circuit or model file gives it back
    assert read == CONFIG and hash(read) == hash(CONFIG) and CONFIG.positional != "rotary"
    with pytest.raises(ConfigError, match=r"Unknown TransformerConfig field\(s\) \['post_embedding_ln'\]"):
        TransformerConfig.from_dict({**d, "post_embedding_ln": True})
    with pytest.raises(ConfigError, match=r"missing required field\(s\) \['d_head'\]"):
        TransformerConfig.from_dict({k: v for k, v in d.items() if k != "d_head"})


def _task(**changes):
    rng = np.random.default_rng(0)
    fields = dict(name="t", clean=rng.integers(0, 11, (4, 5)), corrupted=rng.integers(0, 11, (4, 5)),
                  positions=np.array([4]), metrics={"kl": kl_divergence})
    return Task(**{**fields, **changes})


@pytest.mark.parametrize("changes,pattern", [
    (dict(clean=np.zeros((4, 5), np.float32)), "clean tokens must be an int array"),
    (dict(positions=np.array([5])), r"positions \[5\] are outside 0\.\.4"),
    (dict(positions=np.array([], np.int32)), r"positions \[\] are outside"),
    (dict(weights=np.ones((4, 2))), r"weights must have shape \(4, 1\)"),
    (dict(default_metric="logit_diff"), "default metric 'logit_diff' is not in \\['kl'\\]"),
    (dict(corruption="noise"), "unknown corruption 'noise'"),
    (dict(corrupted=None), "corruption 'prompts' needs corrupted prompts"),
])
def test_inconsistent_tasks_are_refused(changes, pattern):
    with pytest.raises(TaskError, match=pattern):
        _task(**changes)


def test_a_task_asks_for_what_it_has(model):
    task = _task()
    with pytest.raises(TaskError, match=r"no metric 'nll'; choose from \['kl'\]"):
        task.metric("nll")
    with pytest.raises(TaskError, match="Unknown corruption 'noise'"):
        task.make_corruption(model, "noise")
    with pytest.raises(TaskError, match="has no corrupted prompts"):
        _task(corrupted=None, corruption="zeros").make_corruption(model, "prompts")
    with pytest.raises(TaskError, match="prompts of 8 tokens exceed n_ctx=6"):
        _task(clean=np.zeros((4, 8), np.int32), corrupted=None, corruption="zeros", positions=[7]).bind(model)


def test_token_ids_outside_the_vocabulary_are_refused_not_clamped(model):
    clean = _task().clean
    high, low = clean.copy(), clean.copy()
    high[1, 2], low[3, 0] = 11, -1
    # without the check JAX clamps the id and returns logits without a word
    with pytest.raises(ValueError, match=r"token id 11 at index \(1, 2\) is outside the model's vocabulary 0\.\.10"):
        model(jnp.asarray(high))
    graph = aj.CircuitGraph(CONFIG)
    with pytest.raises(ValueError, match=r"token id -1 at index \(3, 0\)"):
        aj.patched_forward(model, low, graph.ones(), aj.Corruption.zeros(), graph)
    with pytest.raises(TaskError, match="corrupted tokens: token id 11"):
        aj.Corruption.from_prompts(model, high)
    with pytest.raises(TaskError, match="mean corruption: token id -1"):
        aj.Corruption.mean(model, low)
    with pytest.raises(TaskError, match="Task t, clean prompts: token id 11"):
        _task(clean=high, corrupted=None, corruption="zeros").bind(model)
    with pytest.raises(TaskError, match="corrupted (prompts|tokens).*token id -1"):
        aj.acdc(model, _task(corrupted=low), 0.1, progress=False)


def test_a_graph_or_circuit_of_another_model_is_refused(model):
    """A 2-layer model's circuit read on this 1-layer model scored its empty
    circuit without a word before the check."""
    two_layers = aj.CircuitGraph(dataclasses.replace(CONFIG, n_layers=2))
    circuit = aj.Circuit(two_layers, np.ones(two_layers.n_edges, np.float32))
    task = _task()
    with pytest.raises(ConfigError, match=r"built for another model.*'n_layers': \(2, 1\)"):
        aj.evaluate.faithfulness(model, task, circuit)
    with pytest.raises(ConfigError, match=r"'n_layers': \(2, 1\).*task\.graph\(model\)"):
        aj.acdc(model, task, 0.1, progress=False, graph=two_layers)
    with pytest.raises(ConfigError, match=r"'n_layers': \(2, 1\)"):
        aj.patched_forward(model, task.clean, two_layers.ones(), aj.Corruption.zeros(), two_layers)
    same = aj.CircuitGraph(CONFIG)  # the model's own graph, made again: accepted
    result = aj.evaluate.faithfulness(model, task, aj.Circuit(same, np.ones(same.n_edges, np.float32)))
    assert abs(result["circuit"] - result["full"]) < 1e-6


def test_named_tasks_say_what_they_need(tmp_path):
    from acdc_jax.tasks import get
    from acdc_jax.tasks.text import load_tokenizer

    with pytest.raises(TaskError, match="Unknown task 'nope'"):
        get("nope")
    with pytest.raises(TaskError, match="compiles its own model; do not pass a checkpoint"):
        get("tracr-reverse", checkpoint=str(tmp_path))
    with pytest.raises(TaskError, match="needs .* weights .* Weights are never downloaded"):
        get("ioi")
    # before: --examples 1 made induction look forever for a derangement of one prompt, 0 gave a NaN metric,
    # tracr-proportion beyond its 256 strings an IndexError, and tracr-reverse ignored the number
    for name, n, pattern in [("induction", 1, "must be a whole number >= 2, got 1"),
                             ("induction", 0, "must be a whole number >= 2, got 0"),
                             ("tracr-proportion", 257, "must be a whole number between 1 and 256, got 257"),
                             ("tracr-reverse", 4, "all 6 orderings of its input, always"),
                             ("ioi", -1, "must be a whole number >= 1, got -1")]:
        with pytest.raises(TaskError, match=pattern):
            get(name, n_examples=n)
    assert get("induction", n_examples=np.int64(3))[1].clean.shape[0] == 3  # a numpy integer is a whole number
    # the builders themselves check too, called without tasks.get (induction with one prompt searched forever)
    from acdc_jax.tasks.docstring import docstring_task
    from acdc_jax.tasks.greaterthan import greaterthan_task
    from acdc_jax.tasks.induction import induction_task
    from acdc_jax.tasks.ioi import ioi_task

    for build, name, n in ((induction_task, "induction", 1), (lambda n_examples: ioi_task(None, n_examples), "ioi", 0),
                           (lambda n_examples: greaterthan_task(None, n_examples), "greater-than", -3),
                           (lambda n_examples: docstring_task(None, n_examples), "docstring", 2.5)):
        with pytest.raises(TaskError, match=f"Task {name}: n_examples .* got {n}"):
            build(n_examples=n)
    with pytest.raises(TaskError, match=r"has no prompts \(clean tokens of shape \(0, 3\)\)"):
        Task("empty", np.zeros((0, 3), np.int32), None, [1], {"kl": kl_divergence})
    with pytest.raises(TaskError, match="No tokenizer at"):
        load_tokenizer(str(tmp_path))
    # before: the tokenizers library's plain Exception, a traceback on the command line
    (tmp_path / "tokenizer.json").write_text('{"clean": ["a"]}')
    (tmp_path / "bpe").mkdir()
    (tmp_path / "bpe" / "vocab.json").write_text("{cut")
    (tmp_path / "bpe" / "merges.txt").write_text("")
    for path, named in ((tmp_path, tmp_path / "tokenizer.json"), (tmp_path / "bpe", tmp_path / "bpe" / "vocab.json")):
        with pytest.raises(TaskError, match=f"Cannot read the tokenizer {re.escape(str(named))}"):
            load_tokenizer(str(path))
    (tmp_path / "c.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="Not an acdc-jax circuit file"):
        aj.Circuit.load(tmp_path / "c.json")


def test_a_broken_circuit_file_is_refused(tmp_path):
    graph = aj.CircuitGraph(CONFIG)
    path = aj.Circuit(graph, np.asarray(graph.ones())).save(tmp_path / "circuit.json")
    assert aj.Circuit.load(path).edges == list(graph.edge_names)
    text = path.read_text()
    with pytest.raises(FileNotFoundError, match="No circuit file at"):
        aj.Circuit.load(tmp_path / "missing.json")
    path.write_text(text[: len(text) // 2])  # cut short, as by a full disk
    with pytest.raises(ValueError, match="is not valid JSON .* cut short"):
        aj.Circuit.load(path)
    for drop in ("graph", "edges", "model_config"):
        path.write_text(json.dumps({k: v for k, v in json.loads(text).items() if k != drop}))
        with pytest.raises(ValueError, match=f"lacks \\['{drop}'\\]"):
            aj.Circuit.load(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="Not an acdc-jax circuit file"):
        aj.Circuit.load(path)
    path.write_text(json.dumps({**json.loads(text), "edges": ["no such edge"]}))
    with pytest.raises(ValueError, match=r"names 1 edge\(s\) that its own graph .* lacks, e.g. \['no such edge'\]"):
        aj.Circuit.load(path)
    path.write_text(json.dumps({**json.loads(text), "scores": {"no such edge": 1.0}}))  # not silently all NaN
    with pytest.raises(ValueError, match="names 1 edge"):
        aj.Circuit.load(path)
    # fields of the wrong type: before, a KeyError or TypeError, or a circuit that failed later (a string score,
    # a list of settings) or never (split_qkv "no" read as true, a metric that is a string)
    saved = json.loads(text)
    first = graph.edge_names[0]
    for change, field in [(dict(graph={}), "graph"), (dict(graph={**saved["graph"], "split_qkv": "no"}), "graph"),
                          (dict(edges=None), "edges"), (dict(edges=first), "edges"), (dict(edges=[3]), "edges"),
                          (dict(scores=[1.0]), "scores"), (dict(scores={first: "high"}), "scores"),
                          (dict(decisions="none"), "decisions"), (dict(settings=[1]), "settings"),
                          (dict(metric="0.1"), "metric")]:
        path.write_text(json.dumps({**saved, **change}))
        with pytest.raises(ValueError, match=rf"circuit.json: Malformed field\(s\) in the circuit file: {field} \("):
            aj.Circuit.load(path)
    path.write_text(json.dumps({**saved, "decisions": [{"edge": first}]}))
    with pytest.raises(ValueError, match=r"decisions are malformed \(KeyError: 'index'\)"):
        aj.Circuit.load(path)
    path.write_text(json.dumps({**saved, "graph": {**saved["graph"], "n_edges": graph.n_edges + 1}}))
    with pytest.raises(ValueError, match=rf"graph has {graph.n_edges + 1} edges, but its model config and options "
                                         rf"make CircuitGraph\({graph.n_edges} edges"):
        aj.Circuit.load(path)


def test_faithfulness_asks_for_a_callable_metric_it_cannot_name(model):
    def my_kl(logits, task):
        return kl_divergence(logits, task)

    task = _task()
    circuit = aj.acdc(model, task, 0.05, metric=my_kl, progress=False)
    assert circuit.settings["metric"] == "my_kl"
    with pytest.raises(TaskError, match="found with the metric 'my_kl', which task t does not name"):
        aj.evaluate.faithfulness(model, task, circuit)
    result = aj.evaluate.faithfulness(model, task, circuit, metric=my_kl)
    assert result["circuit"] == pytest.approx(circuit.metric, rel=1e-5, abs=1e-7)
