"""Run in a fresh process with 4 host devices (see test_sharding.py): ACDC
(over edges and over nodes), mask gradients, exact patching and the two
pruning methods on one device and on several meshes, printed as JSON."""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from acdc_jax import tasks  # noqa: E402
from acdc_jax.acdc import acdc, resolve_corruption  # noqa: E402
from acdc_jax.algorithms import acdc_nodes, eap_ig, edge_pruning, exact_patching, subnetwork_probing  # noqa: E402
from acdc_jax.scoring import Scorer  # noqa: E402
from acdc_jax.sharding import make_mesh, parse_mesh  # noqa: E402


def methods(model, task, mesh):
    """Each method's edge scores and the mesh it ran on."""
    runs = {"exact_patching": exact_patching(model, task, mesh=mesh, max_width=8, progress=False),
            "edge_pruning": edge_pruning(model, task, steps=20, sparsity=0.8, mesh=mesh, progress=False),
            "subnetwork_probing": subnetwork_probing(model, task, steps=20, mesh=mesh, progress=False)}
    return {name: {"scores": c.scores.tolist(), "mesh": c.settings["mesh"]} for name, c in runs.items()}


def main(name: str, n_examples: int):
    model, task = tasks.get(name, n_examples=n_examples)
    out = {"devices": len(jax.devices()), "runs": {}}
    meshes = {"one": None, "4x1": make_mesh(4, 1), "2x2": make_mesh(2, 2), "1x4": make_mesh(1, 4)}
    for label, mesh in meshes.items():
        runs = {}
        for tau in (0.001, 0.05):
            c = acdc(model, task, tau, mode="batched", progress=False, mesh=mesh)
            runs[str(tau)] = {"decisions": [[d.edge, d.tried, d.kept] for d in c.decisions],
                              "metrics": [d.metric_after for d in c.decisions if d.tried], "final": c.metric}
            nodes = acdc_nodes(model, task, tau, progress=False, mesh=mesh)
            runs[f"nodes {tau}"] = {"decisions": [[d.edge, d.tried, d.kept] for d in nodes.decisions],
                                    "metrics": [d.metric_after for d in nodes.decisions], "final": nodes.metric}
        bound = task.bind(model)
        _, corruption = resolve_corruption(model, bound, None)
        scorer = Scorer(model, task.graph(model), bound, corruption, task.metric(task.default_metric), mesh=mesh)
        masks = np.random.default_rng(0).uniform(size=(2, scorer.graph.n_edges)).astype(np.float32)
        values, grads = scorer.value_and_grads(masks)
        runs["grads"] = {"values": values.tolist(), "grads": grads.tolist(),
                         "eap_ig": eap_ig(model, task, steps=2, mesh=mesh, progress=False).scores.tolist()}
        runs["methods"] = methods(model, task, mesh)
        out["runs"][label] = runs
    out["auto"] = methods(model, task, "auto")  # candidates for exact patching, prompts for the gradient methods
    out["auto_shapes"] = {n: dict(parse_mesh("auto", n).shape) for n in (48, 6, 7)}  # one-mask methods' "auto"
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
