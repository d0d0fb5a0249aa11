"""Your own task (`tasks.prompts`): prompts as texts or ids, answers, metrics,
task files and the CLI, and the errors for malformed ones."""

from __future__ import annotations

import json

import numpy as np
import pytest

import acdc_jax as aj
from acdc_jax.errors import TaskError
from acdc_jax.tasks import Task, get, kl_divergence, load_task, prompt_task
from acdc_jax.tasks.ioi import logit_diff as ioi_logit_diff

from .helpers import random_hf_gpt2
from .tokenizers_for_tests import build_tokenizer

CLEAN = ["When Mary and John went to the store , John gave a drink to",
         "When Anna and Paul went to the park , Paul gave a book to"]
CORRUPTED = ["When Lisa and Mark went to the store , Kate gave a drink to",
             "When Eric and Jane went to the park , Tom gave a book to"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_tokenizer(CLEAN + CORRUPTED + [" Mary John Anna Paul"], path=path)
    return path


def test_texts_are_tokenized_by_the_tokenizer(tokenizer):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    task = prompt_task(CLEAN, CORRUPTED, tokenizer=tokenizer, answers=[" Mary", " Anna"],
                       wrong_answers=[" John", " Paul"], bos="<|endoftext|>")
    bos = tok.token_to_id("<|endoftext|>")
    assert task.clean.tolist() == [[bos] + tok.encode(t).ids for t in CLEAN]
    assert task.corrupted.tolist() == [[bos] + tok.encode(t).ids for t in CORRUPTED]
    assert task.labels["answers"][:, 0].tolist() == [tok.token_to_id("ĠMary"), tok.token_to_id("ĠAnna")]
    assert task.labels["wrong_answers"][:, 0].tolist() == [tok.token_to_id("ĠJohn"), tok.token_to_id("ĠPaul")]
    assert task.positions.tolist() == [task.clean.shape[1] - 1]
    assert sorted(task.metrics) == ["kl", "logit_diff", "nll", "prob_diff"] and task.default_metric == "kl"


def test_a_hugging_face_tokenizer_object_tokenizes_as_its_file(tokenizer):
    """A transformers fast tokenizer (what AutoTokenizer gives) is used
    through its backend; before, ``.encode(...).ids`` raised an
    AttributeError on its list of ids. Its ids here are those of
    transformers' own encode."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer))
    kw = dict(answers=[" Mary", " Anna"], wrong_answers=[" John", " Paul"], bos="<|endoftext|>")
    from_object, from_file = prompt_task(CLEAN, CORRUPTED, tokenizer=hf, **kw), prompt_task(CLEAN, CORRUPTED,
                                                                                         tokenizer=tokenizer, **kw)
    bos = hf.convert_tokens_to_ids("<|endoftext|>")
    assert from_object.clean.tolist() == [[bos] + hf.encode(t, add_special_tokens=False) for t in CLEAN]
    assert from_object.clean.tolist() == from_file.clean.tolist()
    assert from_object.labels["answers"].tolist() == from_file.labels["answers"].tolist()
    with pytest.raises(TaskError, match="tokenizer must be a local tokenizer file .* got dict"):
        prompt_task(CLEAN, CORRUPTED, tokenizer={"vocab": 1})


def test_metrics_against_numpy():
    rng = np.random.default_rng(0)
    V = 11
    answers, wrong = [3, [1, 4, 5], [7, 2]], [[0, 6], 8, 9]
    task = prompt_task([[1, 2, 3]] * 3, [[3, 2, 1]] * 3, answers=answers, wrong_answers=wrong, position=1)
    logits = rng.normal(size=(3, 1, V)).astype(np.float32)

    def as_list(a):
        return [a] if isinstance(a, int) else a

    last = logits[:, 0].astype(np.float64)
    p = np.exp(last - last.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want_ld = -np.mean([last[i, as_list(a)].mean() - last[i, as_list(w)].mean()
                        for i, (a, w) in enumerate(zip(answers, wrong))])
    want_pd = -np.mean([p[i, as_list(a)].sum() - p[i, as_list(w)].sum() for i, (a, w) in enumerate(zip(answers, wrong))])
    want_nll = -np.mean([np.log(p[i, as_list(a)].sum()) for i, a in enumerate(answers)])
    np.testing.assert_allclose(float(task.metrics["logit_diff"](logits, task)), want_ld, rtol=1e-5)
    np.testing.assert_allclose(float(task.metrics["prob_diff"](logits, task)), want_pd, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(task.metrics["nll"](logits, task)), want_nll, rtol=1e-5)
    assert task.positions.tolist() == [1]
    # KL may read several positions: the mean over prompts and positions.
    import dataclasses

    several = prompt_task([[1, 2, 3]] * 3, [[3, 2, 1]] * 3, position=[-1, 0])
    assert several.positions.tolist() == [0, 2] and sorted(several.metrics) == ["kl"]
    ref = rng.normal(size=(3, 2, V)).astype(np.float32)
    got = rng.normal(size=(3, 2, V)).astype(np.float32)
    logq = ref - np.log(np.exp(ref.astype(np.float64)).sum(-1, keepdims=True))
    logp = got - np.log(np.exp(got.astype(np.float64)).sum(-1, keepdims=True))
    want_kl = (np.exp(logq) * (logq - logp)).sum(-1).mean()
    kl = several.metrics["kl"](got, dataclasses.replace(several, reference=ref))
    np.testing.assert_allclose(float(kl), want_kl, rtol=1e-5)


def test_answers_at_several_positions_against_numpy():
    """Per prompt, one answer entry per position (in the order `position`
    names them, which need not be sorted), each a token or alternatives: the
    metrics average the single-position ones over positions."""
    rng = np.random.default_rng(3)
    V = 11
    answers = [[3, [1, 4]], [[7, 2, 5], 6], [0, 9]]  # per prompt: (position 4, position 1)
    wrong = [[[8, 6], 2], [1, [3, 10]], [4, 5]]
    task = prompt_task([[1, 2, 3, 4, 5]] * 3, [[5, 4, 3, 2, 1]] * 3, answers=answers, wrong_answers=wrong,
                       position=[-1, 1])
    assert task.positions.tolist() == [1, 4]
    logits = rng.normal(size=(3, 2, V)).astype(np.float32)  # at positions 1 and 4
    for name in ("logit_diff", "prob_diff", "nll"):
        each = []
        for j, slot in ((0, 1), (1, 0)):  # logits column j holds the position of answer entry `slot`
            one = prompt_task([[1, 2, 3, 4, 5]] * 3, [[5, 4, 3, 2, 1]] * 3, answers=[a[slot] for a in answers],
                              wrong_answers=[w[slot] for w in wrong], position=1)
            each.append(float(one.metrics[name](logits[:, j:j + 1], one)))
        np.testing.assert_allclose(float(task.metrics[name](logits, task)), np.mean(each), rtol=1e-5, atol=1e-7)
    p = np.exp(logits.astype(np.float64))
    p /= p.sum(-1, keepdims=True)
    as_list = lambda a: [a] if isinstance(a, int) else a
    want_nll = -np.mean([np.log(p[i, j, as_list(answers[i][1 - j])].sum()) for i in range(3) for j in range(2)])
    np.testing.assert_allclose(float(task.metrics["nll"](logits, task)), want_nll, rtol=1e-5)


def test_acdc_on_answers_at_several_positions():
    model, _ = get("induction")
    clean, corrupted = _random_prompts(8, 10, model.config.d_vocab, 4)
    answers = [[int(c[2]), int(c[3])] for c in clean]  # earlier tokens the induction heads can copy
    wrong = [[int(c[5]), int(c[6])] for c in clean]
    task = prompt_task(clean, corrupted, answers=answers, wrong_answers=wrong, position=[8, 9], metric="logit_diff")
    seq = aj.acdc(model, task, 0.05, mode="sequential", progress=False)
    bat = aj.acdc(model, task, 0.05, progress=False)
    assert [(d.edge, d.kept) for d in bat.decisions] == [(d.edge, d.kept) for d in seq.decisions]
    assert 0 < bat.n_edges < bat.graph.n_edges


def _random_prompts(n, length, vocab, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(1, vocab, (n, length)), rng.integers(1, vocab, (n, length))


@pytest.mark.parametrize("metric", ["kl", pytest.param("logit_diff", marks=pytest.mark.slow)])
def test_acdc_on_a_prompt_task_decides_as_on_the_same_task_built_by_hand(metric):
    """The same prompts as a hand-built Task, with IOI's own logit difference as
    the independent metric: ACDC makes the same decisions."""
    model, _ = get("induction")
    clean, corrupted = _random_prompts(12, 10, model.config.d_vocab, 1)
    io, s = clean[:, 2], clean[:, 5]  # tokens that appeared before: the induction heads move them
    mine = prompt_task(clean, corrupted, answers=io.tolist(), wrong_answers=s.tolist(), metric=metric)
    by_hand = Task(name="by hand", clean=clean, corrupted=corrupted, positions=np.array([9]),
                   metrics={"kl": kl_divergence, "logit_diff": ioi_logit_diff}, default_metric=metric,
                   labels={"io": io.astype(np.int32), "s": s.astype(np.int32)})
    a = aj.acdc(model, mine, 0.02, progress=False)
    b = aj.acdc(model, by_hand, 0.02, progress=False)
    assert [(d.edge, d.kept) for d in a.decisions] == [(d.edge, d.kept) for d in b.decisions]
    assert 0 < a.n_edges < a.graph.n_edges
    np.testing.assert_allclose(a.metric, b.metric, rtol=1e-5, atol=1e-7)


def test_corrupted_prompts_that_change_nothing_are_warned_of(recwarn):
    """Corrupted prompts equal to the clean ones (a copy-paste slip) used to
    give an empty circuit without a word; now ACDC, over edges and over
    nodes, warns that cutting every edge barely moves the metric. A real
    corruption does not warn, and a sweep warns only at its lowest tau."""
    import warnings

    model, induction = get("induction", n_examples=6)
    clean = np.asarray(induction.clean).tolist()
    same = prompt_task(clean, clean)
    for method in (aj.acdc, aj.algorithms.acdc_nodes):
        with pytest.warns(aj.FlatMetricWarning, match=r"Cutting every edge at once changes the metric 'kl' by only .* less "
                                             r"than tau=0.001, so this run is likely to remove every edge") as flat:
            circuit = method(model, same, 0.001, progress=False)
        assert circuit.settings.get("nodes") == [] if method is not aj.acdc else circuit.n_edges == 0
        assert not [w for w in flat if "It also falls" in str(w.message)]  # KL's rounding is not a fall
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        aj.acdc(model, prompt_task(clean, np.asarray(induction.corrupted).tolist()), 0.001, progress=False)
    recwarn.clear()
    aj.evaluate.sweep(model, prompt_task(clean, np.asarray(induction.corrupted).tolist()), [0.001, 100.0],
                      progress=False)
    assert not [w for w in recwarn if "Cutting every edge" in str(w.message)]  # 100 removes all: the sweep's end
    aj.evaluate.sweep(model, same, [0.001, 100.0], progress=False)
    assert len([w for w in recwarn if "Cutting every edge" in str(w.message)]) == 1


def test_a_metric_that_falls_when_every_edge_is_cut_is_warned_of(recwarn):
    """A higher-is-better metric (minus the NLL here) falls as edges are cut,
    and ACDC, which minimises, removed every edge without a word; now ACDC
    over edges and over nodes warns, naming the fixes. With abs_value, which
    compares the size of each change, it does not, and a sweep warns once.
    Edge pruning and a signed ranking warn too; a ranking by size does not."""
    import warnings

    model, task = get("induction", n_examples=6)
    nll = task.metrics["nll"]

    def minus_nll(logits, t):
        return -nll(logits, t)

    for method in (aj.acdc, aj.algorithms.acdc_nodes):
        with pytest.warns(aj.MetricFallsWarning, match=r"lowers the metric 'minus_nll' by .* Negate the metric .*"
                                                       r"abs_value=True"):
            method(model, task, 0.01, metric=minus_nll, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            method(model, task, 0.01, metric=minus_nll, abs_value=True, progress=False)
    recwarn.clear()
    aj.evaluate.sweep(model, task, [0.01, 0.1], metric=minus_nll, progress=False)
    assert len([w for w in recwarn if w.category is aj.MetricFallsWarning]) == 1
    # the methods for which the metric's direction matters: training the gates, and ranking by the signed score
    with pytest.warns(aj.MetricFallsWarning, match="Edge pruning takes a lower metric as better"):
        aj.algorithms.edge_pruning(model, task, metric=minus_nll, steps=2, progress=False)
    with pytest.warns(aj.MetricFallsWarning, match="EAP takes a lower metric .* rank='signed' puts first"):
        aj.algorithms.eap(model, task, metric=minus_nll, n_edges=5, rank="signed")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        aj.algorithms.eap(model, task, metric=minus_nll, n_edges=5)  # ranked by size: the sign does not matter
    # flat at tau as well as falling: the flat warning says both
    with pytest.warns(aj.FlatMetricWarning, match=r"less than tau=1000.* It also falls, as a higher-is-better metric "
                                                  r"does.* negate it \(or pass abs_value=True\)"):
        aj.algorithms.acdc_nodes(model, task, 1000.0, metric=minus_nll, progress=False)


def test_zero_and_mean_corruption_need_no_corrupted_prompts():
    model, _ = get("induction")
    clean, _ = _random_prompts(6, 8, model.config.d_vocab, 2)
    for kind in ("zeros", "mean"):
        task = prompt_task(clean, corruption=kind)
        circuit = aj.acdc(model, task, 0.05, progress=False)
        assert circuit.settings["corruption"] == kind
        assert circuit.n_edges < circuit.graph.n_edges


def test_task_file_through_the_cli(tmp_path, tokenizer, capsys):
    from tokenizers import Tokenizer

    from acdc_jax.cli import main

    vocab = Tokenizer.from_file(str(tokenizer)).get_vocab_size()
    random_hf_gpt2(tmp_path, n_layer=2, n_head=2, n_embd=16, vocab=vocab, n_positions=32, scale=0.5)
    spec = {"clean": CLEAN, "corrupted": CORRUPTED, "answers": [" Mary", " Anna"], "wrong_answers": [" John", " Paul"],
            "bos": "<|endoftext|>", "metric": "logit_diff", "description": "two IOI prompts"}
    path = tmp_path / "two_ioi.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "run"
    assert main(["discover", "--task", str(path), "--checkpoint", str(tmp_path / "gpt2_tied_0"),
                 "--tokenizer", str(tokenizer), "--tau", "0.01", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "task two_ioi:" in printed and "logit_diff" in printed
    saved = json.loads((out / "circuit.json").read_text())
    assert saved["settings"]["task"] == "two_ioi" and saved["settings"]["metric"] == "logit_diff"
    assert (out / "decisions.jsonl").exists() and (out / "circuit.dot").exists()
    # The file gives the same task as the call.
    same = prompt_task(CLEAN, CORRUPTED, tokenizer=tokenizer, answers=[" Mary", " Anna"],
                       wrong_answers=[" John", " Paul"], bos="<|endoftext|>", metric="logit_diff")
    loaded = load_task(path, str(tokenizer))
    assert np.array_equal(loaded.clean, same.clean) and np.array_equal(loaded.corrupted, same.corrupted)
    assert all(np.array_equal(loaded.labels[k], same.labels[k]) for k in same.labels)


def test_malformed_tasks_are_clear_errors(tmp_path, tokenizer):
    ids = [[1, 2, 3], [4, 5, 6]]
    cases = [
        (lambda: prompt_task(CLEAN, [CORRUPTED[0], CORRUPTED[0] + " now"], tokenizer=tokenizer),
         "corrupted prompt 1"),
        (lambda: prompt_task(CLEAN, CORRUPTED), "pass tokenizer="),
        (lambda: prompt_task(CLEAN, CORRUPTED[:1], tokenizer=tokenizer), "2 clean prompts but 1 corrupted"),
        (lambda: prompt_task(CLEAN, CORRUPTED, tokenizer=tokenizer, answers=["Mary", "Anna"]), "leading space"),
        (lambda: prompt_task(ids, ids, answers=[1]), "one entry per prompt (2)"),
        (lambda: prompt_task(ids, ids, answers=[1, []]), "answers[1] is empty"),
        (lambda: prompt_task(ids, ids, position=3), "position 3 is outside"),
        (lambda: prompt_task(ids, ids, position=[0, True]), "is outside prompts of 3 tokens"),
        (lambda: prompt_task(ids, ids, position=[0, 1], answers=[1, 2]), "with 2 positions, give one entry per"),
        (lambda: prompt_task(ids, ids, position=[0, 1], answers=[[1, 2], [3]]), "answers[1]: with 2 positions"),
        (lambda: prompt_task(ids, ids, position=[0, -3], answers=[[1, 2], [3, 4]]), "names a position twice"),
        (lambda: prompt_task(ids, ids, position=[0, 1], answers=[[1, []], [3, 4]]), "answers[:][1][0] is empty"),
        (lambda: prompt_task(ids, ids, answers=[1, 2], metric="logit_diff"), "needs answers and wrong_answers"),
        (lambda: prompt_task(ids, ids, wrong_answers=[1, 2]), "need answers too"),
        (lambda: prompt_task(ids), "no corrupted prompts"),
        (lambda: prompt_task([[1, 2], "a b"], ids), "every prompt must be a text"),
        (lambda: prompt_task([1, 2, 3], ids), "every prompt a list of int token ids"),
        (lambda: prompt_task(np.zeros((2, 3)), ids), "int array"),
        (lambda: prompt_task("a b", ids), "give a list of prompts"),
        (lambda: prompt_task(CLEAN, CORRUPTED, tokenizer=tokenizer, bos="<|nope|>"), "no '<|nope|>' token"),
        (lambda: prompt_task(ids, ids, bos="<|endoftext|>"), "bos '<|endoftext|>' is a text; pass tokenizer="),
        (lambda: prompt_task(ids, ids, answers=[1.5, 2]), "neither a text nor a token id"),
        (lambda: prompt_task(ids, ids, answers=[" Mary", 2]), "is a text; pass tokenizer="),
        # a JSON file's fields of the wrong type (before: a float bos was "a text", a string canonical circuit
        # was split into letters, and a number was taken for the name)
        (lambda: prompt_task(ids, ids, bos=1.5), "bos 1.5 is neither a text nor a token id"),
        (lambda: prompt_task(ids, ids, canonical="a0.0->logits"), "canonical must be a list of edge names"),
        (lambda: prompt_task(ids, ids, canonical=[1, 2]), "canonical must be a list of edge names, got [1, 2]"),
        (lambda: prompt_task(ids, ids, name=3), "The task's name must be a text, got 3"),
        (lambda: prompt_task(ids, ids, description=["x"]), "The task's description must be a text"),
    ]
    for make, words in cases:
        with pytest.raises(TaskError) as info:
            make()
        assert words in str(info.value), (words, str(info.value))
    for content, words in [("{", "as JSON"), ('["a"]', "JSON object"), ('{"clean": [[1]], "answer": [1]}',
                                                                      "unknown field(s) ['answer']"),
                           ('{"clean": [[1, 2]], "corrupted": [[1]]}', "corrupted prompt 0")]:
        bad = tmp_path / "bad.json"
        bad.write_text(content)
        with pytest.raises(TaskError, match="bad.json") as info:
            load_task(bad)
        assert words in str(info.value)
    with pytest.raises(TaskError, match="No task file at"):
        load_task(tmp_path / "missing.json")
    assert prompt_task(ids, ids, bos=0).clean.tolist() == [[0, 1, 2, 3], [0, 4, 5, 6]]
    with pytest.raises(TaskError, match="checkpoint=DIR"):
        get(str(tmp_path / "bad.json"))
    model, _ = get("induction")
    with pytest.raises(TaskError, match="outside the model's vocabulary|vocabulary"):
        aj.acdc(model, prompt_task([[1, 2, model.config.d_vocab]], [[1, 2, 3]]), 0.1, progress=False)


def test_answer_ids_outside_the_vocabulary_are_refused():
    """A metric's gather would clamp an answer id past the vocabulary and score
    the last token instead, without a word."""
    from acdc_jax.algorithms import eap
    from acdc_jax.evaluate import faithfulness

    model, induction = get("induction")
    V = model.config.d_vocab_out
    ids = [[1, 2, 3], [4, 5, 6]]
    for answers, wrong in (([1, V], [2, 3]), ([1, 2], [[3, -1], 4])):
        task = prompt_task(ids, ids, answers=answers, wrong_answers=wrong, metric="logit_diff")
        for run in (lambda: aj.acdc(model, task, 0.1, progress=False), lambda: eap(model, task)):
            with pytest.raises(TaskError, match="outside the model's vocabulary"):
                run()
    import dataclasses

    bad = dataclasses.replace(induction, labels={"next": induction.labels["next"] + V})
    with pytest.raises(TaskError, match="label 'next'.*outside the model's vocabulary"):
        aj.acdc(model, bad, 0.1, progress=False)
    ok = prompt_task(ids, ids, answers=[1, V - 1], wrong_answers=[0, 2])
    circuit = aj.acdc(model, ok, 1.0, progress=False)
    with pytest.raises(TaskError, match="outside the model's vocabulary"):
        faithfulness(model, dataclasses.replace(ok, labels={**ok.labels, "answers": ok.labels["answers"] + 1}),
                     circuit)
    with pytest.raises(TaskError, match="vocab_labels"):
        Task(name="t", clean=ids, corrupted=ids, positions=[2], metrics={"kl": kl_divergence}, vocab_labels=("x",))


def test_a_hugging_face_cache_entry_with_its_own_tokenizer(tmp_path, tokenizer):
    """--checkpoint may be a hub cache entry (models--org--name): refs/main picks
    the snapshot, and the snapshot's tokenizer.json is the default tokenizer."""
    import shutil

    import jax.numpy as jnp

    import converters

    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer)).get_vocab_size()
    entry = tmp_path / "hub" / "models--org--tiny"
    for seed, snapshot in ((0, "abc123"), (1, "old456")):
        random_hf_gpt2(tmp_path, vocab=vocab, n_positions=32, seed=seed, scale=0.5)
        shutil.copytree(tmp_path / f"gpt2_tied_{seed}", entry / "snapshots" / snapshot)
    shutil.copy(tokenizer, entry / "snapshots" / "abc123" / "tokenizer.json")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("abc123")
    tokens = jnp.asarray([[1, 2, 3, 4]])
    ours = converters.convert(entry)(tokens)
    assert np.array_equal(ours, converters.convert(entry / "snapshots" / "abc123")(tokens))
    assert not np.array_equal(ours, converters.convert(entry / "snapshots" / "old456")(tokens))
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"clean": CLEAN, "corrupted": CORRUPTED, "bos": "<|endoftext|>"}))
    _, task = get(str(path), checkpoint=str(entry))  # no tokenizer given: the snapshot's
    assert np.array_equal(task.clean, load_task(path, str(tokenizer)).clean)
    (entry / "refs" / "main").unlink()
    with pytest.raises(aj.errors.CheckpointError, match=r"2 snapshots \['abc123', 'old456'\] and no refs/main"):
        converters.convert(entry)
