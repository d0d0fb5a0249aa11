"""Run auto-circuit's ACDC on a TransformerLens checkpoint directory; used by
bench_acdc.py in a separate virtual environment that has auto-circuit
(``pip install torch==2.13.0 auto-circuit "transformer-lens>=2,<3"
"datasets<3" "pyarrow<18" attrs``: auto-circuit 1.0.1 does not import with
TransformerLens 3+). Prints one JSON object: the kept
edges in acdc-jax names, the order in which auto-circuit tried the edges
(its edges are a Python set, so the order within a layer changes from
process to process) and the wall time.

    python auto_circuit_acdc.py CHECKPOINT_DIR PROMPTS.npz TAU
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file


def our_name(node, n_layers: int) -> str:
    name = node.name
    if name == "Resid Start":
        return "blocks.0.hook_resid_pre"
    if name == "Resid End":
        return f"blocks.{n_layers - 1}.hook_resid_post"
    layer, head = name[1:].split(".")[:2]
    if name.count(".") == 2:  # A{l}.{h}.{Q|K|V}: a head's q/k/v input
        return f"blocks.{layer}.hook_{name[-1].lower()}_input[{head}]"
    return f"blocks.{layer}.attn.hook_result[{head}]"


def main(directory: str, prompts: str, tau: float) -> None:
    from auto_circuit.data import PromptDataLoader, PromptDataset
    from auto_circuit.prune_algos.ACDC import acdc_prune_scores
    from auto_circuit.utils.graph_utils import patchable_model
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.set_grad_enabled(False)
    cfg = json.loads((Path(directory) / "config.json").read_text())
    model = HookedTransformer(HookedTransformerConfig(**cfg))
    state = {k: torch.from_numpy(v) for k, v in load_file(str(Path(directory) / "model.safetensors")).items()}
    model.load_state_dict(state, strict=False)
    model.eval()
    model.set_use_attn_result(True)  # auto-circuit patches per-head outputs and split q/k/v inputs
    model.set_use_split_qkv_input(True)
    if not cfg.get("attn_only"):
        model.set_use_hook_mlp_in(True)
    data = np.load(prompts, allow_pickle=False)
    clean, corrupt = torch.from_numpy(data["clean"]).long(), torch.from_numpy(data["corrupted"]).long()
    answers = [torch.tensor([0])] * len(clean)
    loader = PromptDataLoader(PromptDataset(clean, corrupt, answers, answers), seq_len=None, diverge_idx=0,
                              batch_size=len(clean))
    pmodel = patchable_model(model, factorized=True, slice_output="last_seq", separate_qkv=True)
    # the order acdc_prune_scores tries edges in (its own expression, same process)
    from ordered_set import OrderedSet

    order = [f"{our_name(e.src, cfg['n_layers'])}->{our_name(e.dest, cfg['n_layers'])}"
             for e in OrderedSet(sorted(pmodel.edges, key=lambda x: x.dest.layer, reverse=True))]
    start = time.perf_counter()
    scores = acdc_prune_scores(pmodel, loader, None, tao_exps=[0], tao_bases=[tau])
    seconds = time.perf_counter() - start
    kept = sorted(f"{our_name(e.src, cfg['n_layers'])}->{our_name(e.dest, cfg['n_layers'])}"
                  for e in pmodel.edges if torch.isinf(e.prune_score(scores)))
    print(json.dumps({"seconds": seconds, "n_edges": len(pmodel.edges), "kept": kept, "order": order,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
