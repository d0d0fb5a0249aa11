"""Bad arguments to the API and bad converter configs raise errors that name
the problem (the methods' arguments before any compiling; checkpoint files
are in test_bad_input.py, saved models, tasks and configs in test_bad_values.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import acdc_jax as aj
from acdc_jax import ConfigError, TaskError
from acdc_jax.algorithms import eap_ig, edge_pruning, exact_patching, subnetwork_probing, top_k_threshold
from acdc_jax.candidates import Candidates
from acdc_jax.schedule import Schedule
from acdc_jax.sharding import make_mesh

from .test_bad_values import CONFIG, _task


@pytest.fixture(scope="module")
def model():  # test_bad_values' model
    return aj.Transformer(CONFIG, key=jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def task():
    return _task()


@pytest.mark.parametrize("call,error,pattern", [
    (lambda m, t: aj.acdc(m, t, 0.1, mode="fast"), ValueError, "mode must be 'batched' or 'sequential', got 'fast'"),
    (lambda m, t: aj.acdc(m, t, 0.1, dtype="float16"), ValueError, "dtype must be 'float32' or 'bfloat16'"),
    (lambda m, t: aj.acdc(m, t, 0.1, metric=3), TypeError, "metric must be a name, a callable"),
    (lambda m, t: aj.acdc(m, t, 0.1, head_order="random"), ValueError, "head_order must be 'ascending' or"),
    (lambda m, t: edge_pruning(m, t, sparsity=1.0), ValueError, r"sparsity .* must be in \[0, 1\), got 1.0"),
    (lambda m, t: edge_pruning(m, t, sparsity=float("nan")), ValueError, "sparsity .* got nan"),
    (lambda m, t: subnetwork_probing(m, t, steps=0), ValueError, r"steps \(training steps, --steps\) must be a whole "
     "number >= 1, got 0"),
    (lambda m, t: eap_ig(m, t, steps=0), ValueError, r"steps \(interpolation steps, --steps\) must be a whole number "
     ">= 1, got 0"),
    # before: a TypeError from range() or the PRNG, a negative learning rate trained away from sparsity, a negative
    # stop_after stopped at once, and a NaN threshold or a fractional n_edges kept nothing or raised an IndexError
    (lambda m, t: eap_ig(m, t, steps=2.5), ValueError, "steps .* must be a whole number >= 1, got 2.5"),
    (lambda m, t: edge_pruning(m, t, steps=10.0), ValueError, "steps .* must be a whole number >= 1, got 10.0"),
    (lambda m, t: edge_pruning(m, t, lr=-0.05), ValueError, r"lr \(the gates' learning rate\) must be a finite "
     "number > 0, got -0.05"),
    (lambda m, t: edge_pruning(m, t, lambda_lr=float("inf")), ValueError, "lambda_lr .* must be a finite number >= 0"),
    (lambda m, t: subnetwork_probing(m, t, seed=1.5), ValueError, "seed must be a whole number >= 0, got 1.5"),
    (lambda m, t: edge_pruning(m, t, stop_after=-1), ValueError, r"stop_after \(seconds, --stop-after\) must be a "
     "finite number >= 0, got -1"),
    (lambda m, t: aj.acdc(m, t, 0.1, stop_after=float("nan")), ValueError, "stop_after .* got nan"),
    (lambda m, t: aj.algorithms.acdc_nodes(m, t, 0.1, stop_after=-5), ValueError, "stop_after .* got -5"),
    (lambda m, t: exact_patching(m, t, n_edges=2.5), ValueError, r"n_edges \(the number of edges to keep, "
     r"--n-edges\) must be a whole number between 0 and \d+, got 2.5"),
    (lambda m, t: aj.algorithms.eap(m, t, n_edges=True), ValueError, "n_edges .* got True"),
    (lambda m, t: aj.algorithms.hisp(m, t, threshold=float("nan")), ValueError, "threshold .* must be a number, "
     "got nan"),
    (lambda m, t: eap_ig(m, t, n_edges=5, threshold=0.1), ValueError, "Give n_edges .* or threshold .*, not both"),
    # a string flag read as True; a callback that failed only at the first decision; a log_path left unwritten
    (lambda m, t: aj.acdc(m, t, 0.1, abs_value="no"), ValueError, "abs_value must be True or False, got 'no'"),
    (lambda m, t: aj.algorithms.acdc_nodes(m, t, 0.1, rescore_ties="off"), ValueError,
     r"rescore_ties must be True or False \(or None: the default\), got 'off'"),
    (lambda m, t: aj.acdc(m, t, 0.1, callback="print"), TypeError, "callback must be a function of each Decision"),
    (lambda m, t: aj.acdc(m, t, 0.1, log_path="a.jsonl", resume="b.jsonl"), ValueError,
     "Give log_path .* or resume .*, not both: a.jsonl and b.jsonl differ"),
    (lambda m, t: aj.acdc(m, t, 0.1, max_width=0), ValueError, "max_width .* must be a whole number >= 1, got 0"),
    (lambda m, t: exact_patching(m, t, max_width=-2), ValueError, "max_width .* got -2"),
    (lambda m, t: aj.algorithms.acdc_nodes(m, t, 0.1, max_width=2.5), ValueError, "max_width .* got 2.5"),
], ids=["mode", "dtype", "metric", "head_order", "sparsity", "sparsity-nan", "probing-steps", "eap_ig-steps",
        "eap_ig-fractional-steps", "pruning-float-steps", "lr", "lambda_lr", "seed", "pruning-stop_after",
        "acdc-stop_after", "nodes-stop_after", "fractional-n_edges", "bool-n_edges", "nan-threshold",
        "n_edges-and-threshold", "abs_value", "rescore_ties", "callback", "log_path-and-resume", "acdc-max_width", "patching-max_width", "nodes-max_width"])
def test_bad_method_arguments_are_named(model, task, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(model, task)


def test_masks_of_the_wrong_size_are_refused(model, task):
    """A mask with more or fewer entries than the graph has edges used to be
    read through JAX's clamping gathers: faithfulness_curve scored a 5-entry
    mask as the full model."""
    graph = task.graph(model)
    with pytest.raises(ValueError, match=rf"A circuit's mask holds one value per edge of its graph \({graph.n_edges}\); "
                       r"got shape \(5,\)"):
        aj.Circuit(graph, np.ones(5, np.float32))
    with pytest.raises(ValueError, match="A circuit's scores holds one value per edge"):
        aj.Circuit(graph, np.ones(graph.n_edges, np.float32), scores=np.zeros(graph.n_edges + 1))
    for mask, shape in ((np.ones(5), r"\(5,\)"), (np.ones((2, graph.n_edges)), rf"\(2, {graph.n_edges}\)")):
        with pytest.raises(ValueError, match=rf"one value per edge of the graph \({graph.n_edges}\); expected one "
                           rf"mask, got an array of shape {shape}"):
            aj.evaluate.faithfulness_curve(model, task, [mask])
    with pytest.raises(ValueError, match="No thresholds"):
        aj.evaluate.sweep(model, task, [])
    # the second would overwrite the first's directory
    for taus, first, second in (([0.1, 0.2, 0.1], "0.1", "0.1"), ([0.0100001, 0.01000012], "0.0100001", "0.01000012")):
        with pytest.raises(ValueError, match=rf"The taus {first} and {second} are the same to 6 digits \(tau-{first}\)"):
            aj.evaluate.sweep(model, task, taus, method=lambda *a, **k: pytest.fail("ran before checking"))
    with pytest.raises(ValueError, match=r"compare needs a canonical circuit for each task; \['mine'\] have none"):
        aj.evaluate.compare({"fails": lambda *a, **k: pytest.fail("ran before checking")}, {"mine": (model, task)})
    with pytest.raises(ValueError, match="tau must be a finite number"):  # every tau before the first run
        aj.evaluate.sweep(model, task, [0.1, -1.0], method=lambda *a, **k: pytest.fail("ran before checking"))


def test_bad_tokens_are_named(model):
    graph = aj.CircuitGraph(CONFIG)
    with pytest.raises(TypeError, match="tokens must be an integer array, got dtype float32"):
        model(jnp.zeros((2, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"tokens must have shape \[pos\] or \[batch, pos\], got a scalar"):
        model(jnp.asarray(3))
    with pytest.raises(ValueError, match=r"tokens must have shape \[batch, pos\], got \(1, 2, 3\)"):
        aj.patched_forward(model, jnp.zeros((1, 2, 3), jnp.int32), graph.ones(), aj.Corruption.zeros(), graph)
    with pytest.raises(TaskError, match=r"mean corruption must have shape \[batch, pos\], got \(5,\)"):
        aj.Corruption.mean(model, jnp.zeros(5, jnp.int32))


def test_corrupted_prompts_of_another_length_are_refused(model):
    """Patching with a corruption made from prompts one token longer than
    the clean ones would mix positions; it is refused by name."""
    graph = aj.CircuitGraph(CONFIG)
    corruption = aj.Corruption.from_prompts(model, jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(TaskError, match=r"Clean tokens have shape \(2, 3\) but the corrupted prompts have shape "
                                        r"\(2, 4\); give one corrupted prompt of equal length"):
        aj.patched_forward(model, jnp.zeros((2, 3), jnp.int32), graph.ones(), corruption, graph)


def test_bad_candidates_graphs_and_meshes_are_named():
    graph = aj.CircuitGraph(CONFIG)
    base = np.ones(graph.n_edges, np.float32)
    with pytest.raises(ValueError, match=r"base circuit must be one mask \[n_edges\], got shape \(1, "):
        Candidates(base[None], [[0]])
    with pytest.raises(ValueError, match="No candidates: give at least one set of cut edges"):
        Candidates(base, [])
    with pytest.raises(ValueError, match=r"masks must have shape \[n, n_edges\], got \("):
        Candidates.from_masks(base)
    with pytest.raises(ValueError, match="3 candidates do not fit in a batch of 2"):
        Candidates(base, [[0], [1], [2]]).on_device(2, jnp.float32)
    with pytest.raises(ValueError, match="qkv_edges=True needs split_qkv=True"):
        aj.CircuitGraph(CONFIG, split_qkv=False, qkv_edges=True)
    with pytest.raises(IndexError, match=rf"Edge index {graph.n_edges} out of range \[0, {graph.n_edges}\)"):
        graph.edge_index(graph.n_edges)
    with pytest.raises(ValueError, match="head_order must be 'ascending' or 'descending'"):
        Schedule(graph, head_order="sideways")
    with pytest.raises(ValueError, match=r"prompts \(the prompt shards\) must be a whole number >= 1, got 0"):
        make_mesh(prompts=0)
    with pytest.raises(ValueError, match="1 devices cannot be split into 2 prompt shards"):
        make_mesh(prompts=2, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=r"n_edges .* must be a whole number between 0 and 3, got 4"):
        top_k_threshold(np.array([0.1, 0.2, 0.3]), 4)


GPT2 = dict(model_type="gpt2", n_embd=16, n_head=2, n_layer=1, vocab_size=11, n_positions=8)
NEOX = dict(model_type="gpt_neox", hidden_size=16, num_attention_heads=2, num_hidden_layers=1, vocab_size=11,
            intermediate_size=32, max_position_embeddings=8)
PHI = dict(model_type="phi", hidden_size=16, num_attention_heads=4, num_hidden_layers=1, vocab_size=11,
           intermediate_size=32, max_position_embeddings=8)
GPTJ = dict(model_type="gptj", n_embd=16, n_head=4, n_layer=1, vocab_size=11, rotary_dim=2, n_positions=8)
LLAMA = dict(model_type="llama", hidden_size=16, num_attention_heads=2, num_hidden_layers=1, vocab_size=11,
             intermediate_size=32, max_position_embeddings=8)


def _config_of(kind):
    from converters.gpt2 import gpt2_config
    from converters.gpt_neox import gpt_neox_config
    from converters.llama import llama_config
    from converters.phi_gptj import phi_gptj_config

    return {"gpt2": gpt2_config, "neox": gpt_neox_config, "phi": phi_gptj_config, "llama": llama_config}[kind]


@pytest.mark.parametrize("kind,hf,pattern", [
    ("gpt2", dict(GPT2, n_embd=10, n_head=4), "n_embd=10 is not divisible by n_head=4"),
    ("gpt2", {k: v for k, v in GPT2.items() if k != "n_positions"}, "missing the field 'n_positions'"),
    ("neox", dict(NEOX, model_type="gpt2"), "model_type 'gpt2' is not 'gpt_neox'"),
    ("neox", dict(NEOX, hidden_size=10, num_attention_heads=4), "hidden_size=10 is not divisible by num_attention"),
    ("phi", dict(PHI, model_type="llama"), "model_type 'llama' is neither 'phi' nor 'gptj'"),
    ("phi", dict(PHI, hidden_size=10), "the model width 10 is not divisible by the head count 4"),
    ("phi", dict(PHI, num_key_value_heads=3), "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ("phi", dict(GPTJ, scale_attn_weights=False), "scale_attn_weights=false is not supported"),
    ("llama", dict(LLAMA, model_type="gpt2"), "model_type 'gpt2' is not a Llama-family model"),
    ("llama", dict(LLAMA, rope_parameters=dict(rope_type="llama3", rope_theta=1e4, factor=8.0),
                   max_position_embeddings=None),
     "rope type 'llama3' needs original_max_position_embeddings"),
], ids=["gpt2-heads", "gpt2-positions", "neox-type", "neox-heads", "phi-type", "phi-heads", "phi-kv", "gptj-scale",
        "llama-type", "llama3-original"])
def test_bad_checkpoint_configs_are_named(kind, hf, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _config_of(kind)(hf)


def test_the_first_config_of_each_family_is_accepted():
    """The configs the refusals above edit are themselves valid."""
    for kind, hf in [("gpt2", GPT2), ("neox", NEOX), ("phi", PHI), ("phi", GPTJ), ("llama", LLAMA)]:
        config = _config_of(kind)(hf)[0]
        assert config.n_layers == 1 and config.d_vocab == 11


def test_bad_tracr_settings_are_named():
    from converters.tracr import from_tracr

    meta = dict(n_heads=1, d_head=2, d_mlp=4, causal=False, layer_norm=False, activation="relu",
                unembed=np.zeros((6, 3)))
    with pytest.raises(ConfigError, match="layer_norm=True are not supported"):
        from_tracr({}, dict(meta, layer_norm=True))
    with pytest.raises(ConfigError, match="tracr activation 'gelu' is not supported"):
        from_tracr({}, dict(meta, activation="gelu"))


def test_a_sharded_index_without_a_weight_map_is_refused(tmp_path):
    from converters import convert

    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(aj.CheckpointError, match="has no weight_map; it is not a sharded checkpoint index"):
        convert(tmp_path)


def test_flax_files_that_are_not_gpt2_parameter_trees_are_refused(tmp_path):
    from flax import serialization

    from converters.gpt2 import flax_gpt2_state_dict, read_flax_msgpack

    (tmp_path / "garbage.msgpack").write_bytes(b"\xc1 not msgpack")
    with pytest.raises(aj.CheckpointError, match="Cannot read .* as a Flax msgpack checkpoint"):
        read_flax_msgpack(tmp_path / "garbage.msgpack")
    (tmp_path / "list.msgpack").write_bytes(serialization.msgpack_serialize([np.zeros(2)]))
    with pytest.raises(aj.CheckpointError, match="does not hold a parameter tree"):
        read_flax_msgpack(tmp_path / "list.msgpack")
    with pytest.raises(aj.CheckpointError, match=r"Unexpected parameter 'params\.transformer\.wte\.weight'"):
        flax_gpt2_state_dict({"params": {"transformer": {"wte": {"weight": np.zeros((3, 2))}}}})


def test_prompts_that_tokenize_to_different_lengths_are_refused():
    """A word the tokenizer splits makes one prompt longer than the rest."""
    pytest.importorskip("tokenizers")
    from acdc_jax.tasks.text import tokenize_batch

    from .tokenizers_for_tests import build_tokenizer

    tok = build_tokenizer(["When Mary and John went"])
    assert tokenize_batch(tok, ["When Mary and John", "When John and Mary"], None, "t").shape == (2, 4)
    with pytest.raises(TaskError, match=r"t: prompts tokenize to different lengths \[4, \d+\] .*'When Maryanne and "
                                        r"John'.*use words that are single tokens"):
        tokenize_batch(tok, ["When Mary and John", "When Maryanne and John"], None, "t")


def test_an_unknown_tracr_program_is_named():
    pytest.importorskip("tracr")
    from acdc_jax.tasks.tracr_programs import compile_tracr

    with pytest.raises(TaskError, match="Unknown tracr program 'sort'; choose from"):
        compile_tracr("sort")
