"""The ``acdc-jax`` commands that find nothing: evaluate, draw, compare and
export saved circuits, patch single edges of a checkpoint, list the tasks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np


def _task(args):
    from . import tasks

    return tasks.get(args.task, checkpoint=args.checkpoint, tokenizer=args.tokenizer,
                     n_examples=args.examples, seed=args.seed, bos=_bos(args.bos))


def _bos(arg):
    from .tasks import TASK_BOS

    return TASK_BOS if arg is None else None if arg.lower() == "none" else arg


def cmd_evaluate(args) -> int:
    """Score a saved circuit (acdc-jax's circuit.json or an EAP-IG graph JSON) on a task: faithfulness, and recall
    against the task's canonical circuit."""
    from .circuit import Circuit, read_json
    from .errors import ConfigError
    from .evaluate import faithfulness
    from .export import from_eap_ig

    model, task = _task(args)
    path, data = read_json(args.circuit)
    if isinstance(data, dict) and "format" in data:
        circuit = Circuit.from_json(data, source=path)
    else:
        circuit = from_eap_ig(data, task.graph(model))
    try:
        faith = faithfulness(model, task, circuit, metric=args.metric, corruption=args.corruption)
    except ConfigError as e:  # the circuit was found on another model
        raise ConfigError(f"{path}: {e}") from None
    print(f"circuit {path}: {circuit.n_edges} of {circuit.graph.n_edges} edges "
          f"({circuit.settings.get('method', 'acdc')})")
    print("\n".join(quality_lines(circuit, task, faith) + _provenance(circuit, model, task)))
    return 0


def _provenance(circuit, model, task) -> list[str]:
    """Whether the model and prompts scored are those the circuit was found
    on (ACDC records both fingerprints), so that a score on other prompts is
    not read as the run's own."""
    from .runlog import model_fingerprint, task_fingerprint

    s = circuit.settings
    if "model" not in s or "prompts" not in s:
        return []
    same_model, same_prompts = s["model"] == model_fingerprint(model), s["prompts"] == task_fingerprint(task)
    if same_model and same_prompts:
        return ["scored on the model and prompts it was found on"]
    return ["scored on " + " and ".join(
        what for what, same in (("another model (other weights)", same_model),
                                ("other prompts than it was found on (another --examples, --seed or --bos?)",
                                 same_prompts)) if not same)]


def quality_lines(circuit, task, faith: dict) -> list[str]:
    """How good a circuit is: its metric against the full model's and the empty
    circuit's, its recall of the task's canonical circuit, and the heads and
    MLPs on its residual edges (an EAP-IG graph keeps every head's q/k/v step)."""
    from .evaluate import rates

    g, kept = circuit.graph, set(circuit.edges)
    lines = [f"metric: circuit {faith['circuit']:.4g}, full model {faith['full']:.4g}, empty circuit "
             f"{faith['empty']:.4g}; faithfulness {faith['normalized']:.3f}"]
    if task.canonical is not None:
        universe, canonical, which = set(g.edge_names), set(task.canonical), "canonical circuit"
        if circuit.settings.get("method") == "eap-ig-graph":  # it keeps every q/k/v step: score the rest
            universe = {n for n, e in zip(g.edge_names, g.edges) if e.kind == "residual"}
            kept, canonical, which = kept & universe, canonical & universe, "canonical circuit's residual edges"
        fpr, tpr = rates(kept, canonical, universe)
        lines.append(f"{which} ({len(canonical)} edges): recovered {len(kept & canonical)} "
                     f"(TPR {tpr:.3f}), extra {len(kept - canonical)} (FPR {fpr:.4f})")
    nodes = circuit.nodes
    lines.append(f"heads and MLPs on its residual edges: {' '.join(nodes) if nodes else '(none)'}")
    return lines


def _described(circuit) -> str:
    s = circuit.settings
    how = s.get("method", "acdc") + (f", tau={s['tau']}" if s.get("tau") is not None else "")
    return f"{circuit.n_edges} of {circuit.graph.n_edges} edges ({how})"


def _beside(circuit: str, name: str) -> Path:
    """`name` in the directory of a circuit argument (a circuit.json or a run's directory)."""
    source = Path(circuit)
    return (source if source.is_dir() else source.parent) / name


def cmd_draw(args) -> int:
    """Draw a saved circuit: DOT, SVG (Graphviz) or PNG, and the edge matrices as HTML."""
    from .circuit import Circuit
    from .draw import render
    from .explore import write_html

    circuit = Circuit.load(args.circuit)
    against = Circuit.load(args.against) if args.against else None
    if against is not None:
        circuit.graph.check_same_edges(against.graph, f"--against {args.against}")
    base = Path(args.out) if args.out else _beside(args.circuit, "drawn")  # not the run's own circuit.*
    task = circuit.settings.get("task")
    title = args.title if args.title is not None else (f"{task}: " if task else "") + _described(circuit)
    written = render(circuit, base, canonical=None if against is None else against.edges, title=title)
    written.append(write_html(circuit, base.with_suffix(".html")))
    print(f"{args.circuit}: {_described(circuit)}")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_compare(args) -> int:
    """Compare two saved circuits: edges and heads/MLPs in both or in one only, Jaccard indices."""
    from .circuit import Circuit, dumps
    from .draw import render
    from .evaluate import overlap

    first, second = Circuit.load(args.first), Circuit.load(args.second)
    result = overlap(first, second)
    print(f"first:  {args.first}: {_described(first)}")
    print(f"second: {args.second}: {_described(second)}")
    for kind, label in (("edges", "edges"), ("nodes", "heads and MLPs")):
        r = result[kind]
        print(f"{label}: {len(r['both'])} in both, {len(r['only_first'])} in the first only, "
              f"{len(r['only_second'])} in the second only; Jaccard {r['jaccard']:.3f}")
    for which in ("first", "second"):
        nodes = result["nodes"][f"only_{which}"]
        if nodes:
            print(f"  heads and MLPs in the {which} only: {' '.join(nodes)}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"first": str(args.first), "second": str(args.second), **result}
        (out / "compare.json").write_text(dumps(payload, indent=1) + "\n")
        written = [out / "compare.json", *render(first, out / "compare", canonical=second.edges,
                                                   title=f"first ({first.n_edges} edges) against second "
                                                         f"({second.n_edges}): red = first only, dashed = second only")]
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_export(args) -> int:
    """Write a saved circuit in another tool's format (EAP-IG's graph JSON, which MIB reads)."""
    from .circuit import Circuit
    from .export import write_eap_ig

    circuit = Circuit.load(args.circuit)
    path = Path(args.out) if args.out else _beside(args.circuit, "eap_ig_graph.json")
    write_eap_ig(circuit, path)
    print(f"{args.circuit}: {_described(circuit)}; wrote {path} (EAP-IG Graph.from_json)")
    return 0


def cmd_patch(args) -> int:
    """Effect of cutting single edges, on random prompts, for a checkpoint."""
    import jax
    import jax.numpy as jnp

    import converters

    from .graph import CircuitGraph
    from .corruption import Corruption
    from .errors import check_whole
    from .patching import patched_forward

    if not args.edges:
        check_whole(args.n, "--n (how many of the last edges to cut, one at a time)", 1)
    model = converters.convert(args.checkpoint)
    graph = CircuitGraph(model.config)
    names = args.edges or list(graph.edge_names[-args.n:])
    try:
        cuts = [graph.edge_index(name) for name in names]  # every name checked before the passes
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    rng = np.random.default_rng(args.seed)
    if not 0 < args.pos <= model.config.n_ctx or args.prompts < 1:
        raise ValueError(f"--pos must be a prompt length from 1 to the model's n_ctx={model.config.n_ctx} and "
                         f"--prompts at least 1; got --pos {args.pos}, --prompts {args.prompts}.")
    shape = (args.prompts, args.pos)
    clean = jnp.asarray(rng.integers(0, model.config.d_vocab, shape))
    corruption = Corruption.from_prompts(model, jnp.asarray(rng.integers(0, model.config.d_vocab, shape)))
    base = jax.nn.log_softmax(model(clean)[:, -1])
    print(f"{graph!r}")
    for name, cut in zip(names, cuts):
        masks = graph.ones().at[cut].set(0.0)
        logp = jax.nn.log_softmax(patched_forward(model, clean, masks, corruption, graph)[:, -1])
        kl = float((jnp.exp(base) * (base - logp)).sum(-1).mean())
        print(f"  KL(full || edge cut) = {kl:.3e}   {name}")
    return 0


def cmd_tasks(args) -> int:
    """List the tasks."""
    from .tasks import NEEDS_WEIGHTS, TASKS

    tracr = importlib.util.find_spec("tracr") is not None
    for name in TASKS:
        need = (f"needs --checkpoint ({NEEDS_WEIGHTS[name]}) and its tokenizer (--tokenizer, unless the checkpoint "
                "directory has one)" if name in NEEDS_WEIGHTS else "ready to run")
        if name.startswith("tracr") and not tracr:
            need = "needs tracr: pip install '.[tracr]' in the acdc-jax checkout"
        print(f"{name:18s} {need}")
    print(f"{'PATH.json':18s} your prompts (clean, corrupted, answers, ...); needs --checkpoint, and a tokenizer "
          "for texts")
    print(f"{'':18s} (ioi, greater-than, docstring on another model: --bos with its BOS token, e.g. '<bos>' for Gemma)")
    return 0
