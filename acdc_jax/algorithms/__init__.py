"""Circuit-finding methods on the same edge masks as ACDC; each returns a
`Circuit` whose ``scores`` estimate how much the metric rises when an edge is
cut (or, for the trained masks, how strongly it is kept)."""

from .attribution import (RANKS, TIES, check_keep, circuit_from_scores, eap, eap_ig, edge_ranking, exact_patching, hisp, top_k_mask,
                          top_k_threshold)
from .nodes import acdc_nodes, node_order
from .pruning import edge_pruning, subnetwork_probing

METHODS = {
    "eap": eap,
    "eap_ig": eap_ig,
    "exact_patching": exact_patching,
    "edge_pruning": edge_pruning,
    "subnetwork_probing": subnetwork_probing,
    "hisp": hisp,
}

__all__ = ["METHODS", "RANKS", "acdc_nodes", "node_order", "check_keep", "circuit_from_scores", "eap", "eap_ig", "edge_pruning", "edge_ranking", "exact_patching", "hisp",
           "subnetwork_probing", "TIES", "top_k_mask", "top_k_threshold"]
