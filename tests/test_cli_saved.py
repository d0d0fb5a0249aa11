"""`acdc-jax draw` and `acdc-jax compare`: commands on saved circuits, checked
against set arithmetic on the circuit files' own edge lists."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from acdc_jax.circuit import Circuit
from acdc_jax.cli import main
from acdc_jax.config import TransformerConfig
from acdc_jax.graph import CircuitGraph

CONFIG = TransformerConfig(n_layers=2, d_model=16, n_heads=3, d_head=4, d_vocab=11, n_ctx=8, d_mlp=32)


def _saved(path, seed, graph=None, keep=0.5):
    graph = graph or CircuitGraph(CONFIG)
    mask = (np.random.default_rng(seed).random(graph.n_edges) < keep).astype(np.float32)
    return Circuit(graph, mask, settings={"method": "acdc", "tau": 0.01, "task": "made-up"}).save(path)


def _part(hook: str) -> str:
    """The head or MLP a hook name belongs to, read from the name alone."""
    m = re.fullmatch(r"blocks\.(\d+)\.(?:attn\.hook_result|hook_[qkv]_input|attn\.hook_[qkv])\[(\d+)\]", hook)
    if m:
        return f"a{m[1]}.{m[2]}"
    m = re.fullmatch(r"blocks\.(\d+)\.hook_mlp_(?:in|out)", hook)
    return f"m{m[1]}" if m else ""


def test_compare_counts_what_set_arithmetic_on_the_files_gives(tmp_path, capsys):
    a, b = _saved(tmp_path / "a.json", 0), _saved(tmp_path / "b" / "circuit.json", 1, keep=0.3)
    assert main(["compare", str(a), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    edges_a, edges_b = (set(json.loads(p.read_text())["edges"]) for p in (a, b))
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert set(result["edges"]["both"]) == edges_a & edges_b
    assert set(result["edges"]["only_first"]) == edges_a - edges_b
    assert set(result["edges"]["only_second"]) == edges_b - edges_a
    assert result["edges"]["jaccard"] == pytest.approx(len(edges_a & edges_b) / len(edges_a | edges_b))
    step = re.compile(r"blocks\.\d+\.hook_[qkv]_input\[\d+\]->blocks\.\d+\.attn\.hook_[qkv]\[\d+\]")
    nodes_a, nodes_b = ({_part(h) for e in edges if not step.fullmatch(e) for h in e.split("->")} - {""}
                        for edges in (edges_a, edges_b))  # heads and MLPs on residual edges, as discover lists them
    assert set(result["nodes"]["only_first"]) == nodes_a - nodes_b
    assert set(result["nodes"]["both"]) == nodes_a & nodes_b
    assert result["nodes"]["jaccard"] == pytest.approx(len(nodes_a & nodes_b) / len(nodes_a | nodes_b))
    out = capsys.readouterr().out
    assert (f"edges: {len(edges_a & edges_b)} in both, {len(edges_a - edges_b)} in the first only, "
            f"{len(edges_b - edges_a)} in the second only") in out
    assert (tmp_path / "cmp" / "compare.dot").is_file()


def test_a_heads_own_step_does_not_put_it_in_the_circuit():
    """Circuit.nodes (the discover and evaluate line, compare's node lists)
    counts the heads and MLPs on residual edges: a head whose only kept edge
    is its own q step computes nothing the circuit reads."""
    graph = CircuitGraph(CONFIG)
    step = next(e for e in graph.edges if e.kind == "qkv")
    head = _part(step.name.split("->")[0])
    only_step = Circuit(graph, np.asarray(graph.mask([step.name])))
    assert only_step.nodes == [] and only_step.n_edges == 1
    into = next(e for e in graph.edges if e.kind == "residual" and e.name.endswith(step.name.split("->")[0]))
    assert Circuit(graph, np.asarray(graph.mask([step.name, into.name]))).nodes == sorted(
        {head, _part(into.name.split("->")[0])} - {""})


def test_compare_of_a_circuit_with_itself_and_with_an_empty_one(tmp_path):
    a = _saved(tmp_path / "a.json", 0)
    empty = _saved(tmp_path / "empty.json", 0, keep=0.0)
    edges = json.loads(a.read_text())["edges"]
    assert main(["compare", str(a), str(a), "--out", str(tmp_path / "same")]) == 0
    same = json.loads((tmp_path / "same" / "compare.json").read_text())
    assert same["edges"]["jaccard"] == 1.0 and len(same["edges"]["both"]) == len(edges)
    assert main(["compare", str(a), str(empty), "--out", str(tmp_path / "none")]) == 0
    none = json.loads((tmp_path / "none" / "compare.json").read_text())
    assert none["edges"]["jaccard"] == 0.0 and len(none["edges"]["only_first"]) == len(edges)
    assert main(["compare", str(empty), str(empty), "--out", str(tmp_path / "empty")]) == 0
    assert json.loads((tmp_path / "empty" / "compare.json").read_text())["edges"]["jaccard"] == 1.0


def test_draw_marks_the_edges_outside_the_reference(tmp_path, capsys):
    """Every residual edge of the circuit outside the reference is drawn red,
    between its parts; the reference's edges the circuit lacks are dashed."""
    a, b = _saved(tmp_path / "run" / "circuit.json", 0, keep=0.2), _saved(tmp_path / "ref.json", 1, keep=0.2)
    assert main(["draw", str(tmp_path / "run"), "--against", str(b)]) == 0
    dot = (tmp_path / "run" / "drawn.dot").read_text()
    assert (tmp_path / "run" / "drawn.html").is_file()
    assert sum((tmp_path / "run" / f"drawn.{ext}").is_file() for ext in ("svg", "png")) == 1
    edges_a, edges_b = (set(json.loads(p.read_text())["edges"]) for p in (a, b))

    def drawn(edges):
        out = set()
        for e in edges:
            sender, receiver = e.split("->")
            letter = re.search(r"hook_([qkv])_input", receiver)
            if "hook_q_input" in sender or ".attn.hook_" in receiver and "result" not in receiver:
                continue  # q/k/v steps inside a head are not drawn
            s = _part(sender) or "embed"
            r = _part(receiver) or "logits"
            out.add((s, r, letter[1] if letter else ""))
        return out

    red = {(s, r, l) for s, r, l in re.findall(r'"([^"]+)" -> "([^"]+)" \[color="#e41a1c".*?label="(\w?)"\]', dot)}
    dashed = {(s, r, l) for s, r, l in re.findall(r'"([^"]+)" -> "([^"]+)" \[color="#aaaaaa", style=dashed, '
                                                    r'label="(\w?)"\]', dot)}
    assert red == drawn(edges_a) - drawn(edges_b) and red
    assert dashed == drawn(edges_b) - drawn(edges_a) and dashed
    assert "made-up" in dot and "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["compare", "draw"])
def test_saved_circuit_commands_refuse_by_name(tmp_path, capsys, command):
    a = _saved(tmp_path / "a.json", 0)
    other = _saved(tmp_path / "other.json", 0, graph=CircuitGraph(CONFIG, split_qkv=False))
    pair = [str(a), str(other)] if command == "compare" else [str(a), "--against", str(other)]
    assert main([command, *pair]) == 2
    assert "over another graph" in capsys.readouterr().err
    assert main([command, str(tmp_path / "missing.json"), *([str(a)] if command == "compare" else [])]) == 2
    assert "No circuit file at" in capsys.readouterr().err


def test_evaluate_names_a_circuit_of_another_model_and_out_paths_that_are_files(tmp_path, capsys):
    """Before: evaluate blamed the metric ("the metric 'kl', which task ...
    does not name") for a circuit found on another model, and an --out that
    is a file ended in a FileExistsError traceback."""
    saved = _saved(tmp_path / "a.json", 0)  # this file's small config, not the induction model's
    saved_json = json.loads(saved.read_text())
    saved.write_text(json.dumps({**saved_json, "settings": {**saved_json["settings"], "metric": "my_metric"}}))
    assert main(["evaluate", str(saved), "--task", "induction"]) == 2
    err = capsys.readouterr().err
    assert f"error: {saved}: The graph (or circuit) was built for another model" in err and "my_metric" not in err
    (tmp_path / "file").write_text("")
    assert main(["discover", "--task", "induction", "--tau", "0.1", "--out", str(tmp_path / "file"), "--no-progress"]) == 2
    assert f"File exists: '{tmp_path / 'file'}'" in capsys.readouterr().err


def _strict(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_every_json_written_is_strict_json(tmp_path):
    """JSON has no NaN or Infinity, and strict readers (JavaScript, jq) refuse
    them: a threshold of inf (keep 0 edges), NaN scores of untried edges and
    NaN settings are written as null, in circuit files, logs, saved states,
    exports, comparisons and ROC files."""
    from acdc_jax.circuit import dumps, finite_json
    from acdc_jax.runlog import differing

    out = tmp_path / "eap0"
    assert main(["discover", "--task", "induction", "--method", "eap", "--metric", "nll", "--n-edges", "0",
                 "--examples", "8", "--out", str(out), "--no-progress"]) == 0
    saved = _strict((out / "circuit.json").read_text())
    assert saved["n_kept"] == 0 and saved["settings"]["threshold"] is None  # inf before
    acdc_out = tmp_path / "acdc"
    assert main(["discover", "--task", "induction", "--tau", "0.01", "--examples", "8", "--out", str(acdc_out),
                 "--no-progress", "--stop-after", "0"]) == 0  # a stopped run: untried edges score NaN
    assert any(v is None for v in _strict((acdc_out / "circuit.json").read_text())["scores"].values())
    assert main(["export", str(out)]) == 0 and main(["compare", str(out), str(acdc_out), "--out", str(tmp_path / "c")]) == 0
    assert main(["roc", "--task", "tracr-reverse", "--method", "eap", "--metric", "logit", "--out",
                 str(tmp_path / "roc"), "--no-progress"]) == 0
    written = [p for p in tmp_path.rglob("*") if p.suffix in (".json", ".jsonl")]
    assert len(written) >= 6
    for path in written:
        for line in ([path.read_text()] if path.suffix == ".json" else path.read_text().splitlines()):
            _strict(line)
    settings = {"x": float("nan"), "y": (1, float("inf")), "z": np.float32(2.5), "w": np.array([[1.0, np.nan]]),
                "v": np.array(2.0)}
    expected = {"x": None, "y": [1, None], "z": 2.5, "w": [[1.0, None]], "v": 2.0}
    assert _strict(dumps(settings)) == expected == finite_json(settings)
    assert differing(_strict(dumps(settings)), settings) == {}  # read back, the same settings
