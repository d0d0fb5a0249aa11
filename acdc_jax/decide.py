"""One step of batched or sequential ACDC: score the planned trials in a
pass, then decide them as the loop would (`decide`), with the band of float
rounding around tau inside which a trial is rescored in full passes
(`TieBand`, `rescore`, `calibrate`), and the width of the pass
(`pass_width`)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable, Optional

import jax
import numpy as np

from .circuit import Decision
from .errors import MetricError
from .scoring import Scorer
from .speculate import candidates, node_effects, trial_result


def adaptive_width() -> bool:
    return jax.default_backend() == "cpu"


PROBE_BELOW = 0.05  # measured: benchmarks/README.md, "Guessing trial outcomes"


def probe_below() -> float:
    """Below what probability a plan stops branching and probes ahead
    (`speculate.plan`). On accelerators, where a pass is as wide as memory
    allows, the spare width scores edges ahead; a CPU chooses each pass's
    width by its likely decisions (`pass_width`), so there no probes."""
    return 0.0 if adaptive_width() else PROBE_BELOW


def pass_width(nodes: list, cap: int, candidate_cost: Callable[[int], float] = lambda layer: 1.0,
               overhead: float = 1.0) -> int:
    """How many of the plan's nodes to score in one pass. On accelerators a
    wider pass costs little more, so all of them. On a CPU each candidate costs
    about as much as a pass of its own, and every candidate of a pass starts at
    the earliest layer any of them needs (`candidate_cost(layer)`); the width
    in 1, 4, 16, ... (few compiled shapes) is the one that decides the most
    edges per unit of work: the sum of the nodes' probabilities over the
    pass's cost, counted in candidates from the first node's layer plus
    `overhead` of them per pass. The overhead is a constant, not measured:
    a choice that follows the timings drifts from run to run, and a second
    run then compiles other widths (fitting it from the passes timed made the
    benchmark's second runs 15-50% slower)."""
    if not adaptive_width() or not nodes:
        return cap
    widths = sorted({min(4 ** k, cap) for k in range(8)})
    reach = np.cumsum([n.prob for n in nodes])
    start = np.minimum.accumulate([n.first_layer for n in nodes])
    unit = candidate_cost(int(start[0]))

    def gain(w):
        i = min(w, len(nodes)) - 1
        return reach[i] / (overhead + w * candidate_cost(int(start[i])) / unit)

    return max(widths, key=gain)


@dataclasses.dataclass
class TieBand:
    """How far a batched result may lie from the sequential loop's for the
    same trial: float32 rounding in another program (measured: up to 2e-7
    for KL, whatever its value, on the test models), widened where a
    program's scores were measured further off (`widen`). A result within
    the band of tau is rescored in the loop's own full passes."""

    scale: float = 1.0  # 0: no rescoring (bf16, whose rounding is 2^16 times coarser)

    def __call__(self, before: float, new: float) -> float:
        return self.scale * (1e-6 + 1e-5 * (abs(before) + abs(new)))

    def widen(self, discrepancy: float, before: float, new: float) -> None:
        """Make the band at least 4x a measured gap between a batched result and the loop's."""
        band = self(before, new)
        if band and 4 * discrepancy > band:
            self.scale *= 4 * discrepancy / band


def tie_band(rescore_ties: Optional[bool], precision: Optional[str]) -> TieBand:
    """The near-tie band of a run: measured (trials in it rescored in full
    passes) when `rescore_ties` says so, by default only at full float32
    precision (`precision` None: bf16 operands); else none."""
    if rescore_ties is None:
        rescore_ties = precision == "float32"
    return TieBand(1.0 if rescore_ties else 0.0)


@dataclasses.dataclass
class State:
    mask: np.ndarray
    cursor: tuple
    metric: float
    decisions: list
    tie_band: TieBand = dataclasses.field(default_factory=TieBand)
    full_values: dict = dataclasses.field(default_factory=dict)  # circuit bytes -> its metric from a full pass
    calibrated: set = dataclasses.field(default_factory=set)  # the program families checked against full passes
    rescored: int = 0  # trials decided from full passes

    def full(self, scorer: Scorer, circuit: np.ndarray) -> float:
        """The metric of `circuit` as the sequential loop computes it (a full pass, remembered)."""
        key = circuit.tobytes()
        if key not in self.full_values:
            if len(self.full_values) >= 16:
                self.full_values.pop(next(iter(self.full_values)))
            self.full_values[key] = scorer.full(circuit)
        return self.full_values[key]

    def apply(self, decision: Decision, cursor) -> None:
        if not decision.kept:
            self.mask[decision.index] = 0.0
        if decision.tried and not decision.kept:
            self.metric = decision.metric_after
        self.cursor = cursor
        self.decisions.append(decision)


def rescore(node, state: State, scorer: Scorer, result: float, abs_value: bool) -> tuple[float, float]:
    """A trial whose result lies within float32 rounding of tau, scored as the
    sequential loop scores it: both circuits in full passes (the same program
    and arithmetic), so that batched and sequential runs decide it alike.
    Widens the band where the batched score was further off than expected."""
    before, new = state.full(scorer, node.mask), state.full(scorer, node.candidate())
    state.tie_band.widen(abs(trial_result(before, new, abs_value) - result), before, new)
    state.rescored += 1
    return before, new


def calibrate(node, metric: float, state: State, scorer: Scorer, family) -> None:
    """The first time a program family (`Shape.family`) runs in this
    process, score its first candidate in a full pass too and widen the band
    to the gap: a trial's result (two metrics) can be off by twice as much.
    So the band follows the rounding that the programs really show (larger
    models, other precisions), not only the trials that happen to fall
    inside it. Later runs with the same programs (a threshold sweep) widen
    their band by the gap already measured (`Programs.gaps`) instead of
    measuring it again."""
    if family not in scorer.programs.gaps:
        full = state.full(scorer, node.candidate())
        scorer.programs.gaps[family] = (2 * abs(metric - full), full)
    gap, full = scorer.programs.gaps[family]
    state.tie_band.widen(gap, state.metric, full)


def apply_prunes(prunes, state: State, graph) -> list[Decision]:
    made = []
    for ev in prunes:
        d = Decision(graph.edge_names[ev.edge], ev.edge, tried=False, kept=False)
        state.apply(d, ev.cursor)
        made.append(d)
    return made


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` is a failed device allocation (XLA's RESOURCE_EXHAUSTED, compiling or running)."""
    return isinstance(err, MemoryError) or (
        isinstance(err, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(err))


class PassOutOfMemory(Exception):
    """A batched pass from `start_layer` ran out of device memory in the program `shape`."""

    def __init__(self, start_layer: int, shape):
        self.start_layer, self.shape = start_layer, shape
        self.program_layer = min(start_layer, shape.start_layer)  # a cover computes from an earlier layer
        where = "" if self.program_layer == start_layer else f" (in a program from layer {self.program_layer})"
        super().__init__(f"A pass of {shape.width} candidates from layer {start_layer}{where} ran out of device "
                         "memory.")


def score_pass(scorer: Scorer, cands, start_layer: int, width: int, shape=None) -> np.ndarray:
    """`scorer.batch`, raising `PassOutOfMemory` where the pass did not fit in device memory."""
    shape = shape or scorer.choose(cands, start_layer, width)
    try:
        return scorer.batch(cands, start_layer, shape.width, shape=shape)
    except Exception as err:  # nothing is decided yet: the caller narrows the passes and plans again
        if not out_of_memory(err):
            raise
        if jax.process_count() > 1:  # all processes run the same programs: one cannot narrow alone
            raise MemoryError(f"A pass of {shape.width} candidates from layer {start_layer} ran out of device "
                              f"memory in a run over {jax.process_count()} processes, where one process cannot "
                              f"narrow its passes alone. Run again with max_width={max(shape.width // 2, 1)} (or "
                              "less), prompt_chunk= or dtype='bfloat16'.") from err
        raise PassOutOfMemory(start_layer, shape) from err


def narrow(caps: list, scorer: Scorer, oom: PassOutOfMemory) -> dict:
    """After `oom`: passes from the layer its program started at, and from
    every earlier one (which hold more per candidate), at most half as wide,
    in `caps` and the scorer's width plan; and that program is not rented
    again. The memory plan is an estimate (1.8-2.7x what XLA allocated where
    measured: benchmarks/README.md); this keeps a long run going where XLA
    needs more on some backend. Each call halves a width or drops a program, so
    a run's retries end. Returns what a run's settings record (`narrowed`)."""
    if oom.shape.width <= 1:
        raise MemoryError(f"A pass of one candidate from layer {oom.start_layer} does not fit in device memory. "
                          "Run its prompts in chunks (prompt_chunk=), with bf16 activations (dtype='bfloat16'), "
                          "with fewer prompts, or on a device with more memory.") from oom
    for layer in range(oom.program_layer + 1):
        caps[layer] = min(caps[layer], oom.shape.width // 2)
    if scorer.widths is not None:  # the plan that covers are chosen by (`Scorer.cover_start`)
        scorer.widths = list(caps)
    scorer.programs.compiled.discard(oom.shape)
    warnings.warn(f"{oom} Passes from layers 0-{oom.program_layer} now hold at most {oom.shape.width // 2}.",
                  stacklevel=3)
    return {"start_layer": oom.start_layer, "program_layer": oom.program_layer, "width": oom.shape.width}


def decide(nodes, state: State, scorer: Scorer, tau, abs_value, graph, mode, caps):
    """Score the plan's nodes, then walk the tree along the real outcomes from
    node 0, deciding each trial, until the next node was not scored. Returns
    the decisions, the nodes scored and their effects (`node_effects`).
    Raises `PassOutOfMemory` where the pass did not fit in device memory."""
    if mode == "sequential":
        nodes = nodes[:1]
        metrics = [scorer.full(nodes[0].candidate())]
    else:
        first = nodes[0].first_layer
        width = pass_width(nodes, caps[first], scorer.candidate_flops)
        chosen = nodes[:width]
        start_layer = min(n.first_layer for n in chosen)
        while len(chosen) > caps[start_layer]:  # a pass from an earlier layer holds fewer candidates
            width = caps[start_layer]
            chosen = nodes[:width]
            start_layer = min(n.first_layer for n in chosen)
        cands = candidates(chosen, state.mask)
        shape = scorer.choose(cands, start_layer, width, max_width=caps[start_layer])
        if shape.width > len(chosen) and len(nodes) > len(chosen):  # a larger compiled program: fill it
            more = nodes[:shape.width]
            if min(n.first_layer for n in more) == start_layer:
                more_cands = candidates(more, state.mask)
                if scorer.fits(more_cands, start_layer, shape):
                    chosen, cands = more, more_cands
        nodes = chosen
        metrics = score_pass(scorer, cands, start_layer, shape.width, shape)
        family = shape.family()
        if state.tie_band.scale and family not in state.calibrated:
            state.calibrated.add(family)
            calibrate(nodes[0], float(metrics[0]), state, scorer, family)
    effects = node_effects(nodes, metrics, state.metric, abs_value)
    made: list[Decision] = []
    i = 0
    while i is not None and i < len(nodes):
        node = nodes[i]
        made += apply_prunes(node.prunes, state, graph)
        before, new = state.metric, float(metrics[i])
        name = graph.edge_names[node.trial.edge]
        if not math.isfinite(new):
            raise MetricError(f"The metric is {new} after removing {name}; it must stay finite.")
        result = trial_result(before, new, abs_value)
        if mode == "batched" and abs(result - tau) < state.tie_band(before, new):
            before, new = rescore(node, state, scorer, result, abs_value)
            result = trial_result(before, new, abs_value)
        keep = not result < tau
        d = Decision(name, node.trial.edge, tried=True, kept=keep, metric_before=before, metric_after=new)
        state.apply(d, node.trial.cursor)
        made.append(d)
        i = node.children.get(not keep)
    return made, nodes, effects
