"""Which compiled program runs a batched pass: compile a new shape, or reuse a larger one.

A batched pass's shape (its start layer, how many candidates, how many heads
it recomputes there, how many cached senders it re-mixes) picks the XLA
program. Every new shape costs a compilation, a second or more on a CPU,
which for a small model is more than a hundred passes. A pass can also run in
any compiled program that is at least as large in every dimension (padding
repeats a candidate, a head or an unchanged sender), paying for the extra
FLOPs instead. `Programs` decides as in ski rental: it keeps renting (using
the cheapest larger compiled program) until the seconds paid in extra work
for lack of the exact shape add up to what compiling it costs, then buys
(compiles it). That never spends more than twice the best choice made with
hindsight, per shape. The costs are measured as the run goes: compile
seconds from `jax.monitoring`, seconds per FLOP from the passes themselves.
Where compiling is free (programs already compiled earlier in the process),
the measured cost is near zero and every pass gets its exact shape. With
the programs on disk, a program read back counts as loaded, not compiled,
and a later process estimates from the compile seconds and shapes that the
earlier ones recorded beside the cache (`program_record.py`).
On accelerators, where a pass takes milliseconds and a compilation seconds
(about 14-27 s each on an H200), the first program a layer needs is a cover
(every head, no shared upstream sum) from the earliest layer whose passes are
as wide, which the later passes from all those layers can rent
(`Scorer._choose`; see benchmarks/bench_programs.py).

The choice changes which program computes a score, never which candidates
are scored, so decisions are the same (up to float rounding, as between any
two programs). Runs over several processes always take the exact shape, so
that every process runs the same programs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import os
import threading
import time
from pathlib import Path
from typing import Callable, Hashable, Optional

import jax

from .errors import positive_setting
from .program_record import DiskRecord

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_seconds = [0.0]  # in this process, so far
_thread = threading.local()  # the same, in this thread (programs compiled ahead: `Programs.compile_ahead`)
_programs = {"got": 0, "hits": 0}  # in this process: executables got from XLA, and of those read from disk


def _listen(event: str, duration: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += duration
        _thread.seconds = getattr(_thread, "seconds", 0.0) + duration
        if event == _COMPILE_EVENTS[-1]:  # also sent where the program came from disk
            _programs["got"] += 1


def _count(event: str, **_) -> None:
    if event in ("/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"):  # miss: written
        name = event.rsplit("_", 1)[-1]
        setattr(_thread, name, getattr(_thread, name, 0) + 1)
        if name == "hits":
            _programs["hits"] += 1


jax.monitoring.register_event_duration_secs_listener(_listen)
jax.monitoring.register_event_listener(_count)


def use_disk_cache(directory: Optional[str] = None) -> Optional[str]:
    """Keep compiled programs on disk (JAX's persistent compilation cache), so
    that a later process loads them instead of compiling: a batched run on a
    CPU spends more time compiling than scoring. `directory` defaults to
    ``$ACDC_JAX_CACHE`` or ``~/.cache/acdc-jax/xla``; "off" leaves the cache
    off. Programs compiled before the call are not saved, and JAX keeps the
    first directory a process saved to. Beside them acdc-jax keeps a small
    JSON file per kind of run (`program_record.py`). The entries are machine code that
    JAX runs: use a directory only you can write to. Returns the directory, or None."""
    where = directory or os.environ.get("ACDC_JAX_CACHE") or str(Path.home() / ".cache" / "acdc-jax" / "xla")
    if str(where).lower() == "off":
        return None
    jax.config.update("jax_compilation_cache_dir", str(where))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # a pass's small programs add up too
    return str(where)


def compile_seconds() -> float:
    """Seconds spent tracing, lowering and compiling in this process so far
    (in every thread: with programs compiled ahead, more than the wall time it took)."""
    return _compile_seconds[0]


def program_counts() -> dict[str, int]:
    """Programs this process has compiled and loaded (read back from the
    programs on disk, `use_disk_cache`) so far, every thread's."""
    return {"compiled": _programs["got"] - _programs["hits"], "loaded": _programs["hits"]}


def programs_since(before: dict[str, int]) -> dict[str, int]:
    """`programs_compiled` and `programs_loaded` since `program_counts()` gave `before` (a run's settings)."""
    return {f"programs_{k}": n - before[k] for k, n in program_counts().items()}


def thread_compile_seconds() -> float:
    """Seconds spent tracing, lowering and compiling in this thread so far."""
    return getattr(_thread, "seconds", 0.0)


_workers: list = []


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that compile programs ahead: XLA compiles in C++ without
    Python's lock, so one host core per program compiles while the device runs
    passes. ``ACDC_JAX_COMPILE_THREADS`` sets how many (default: 4, at most
    half the host's cores; how many pay on a GPU, whose autotuning they share, is not yet measured)."""
    if not _workers:
        n = positive_setting("ACDC_JAX_COMPILE_THREADS") or max(1, min(4, (os.cpu_count() or 2) // 2))
        _workers.append(concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="acdc-jax-compile"))
    return _workers[0]


_jobs: list = []  # submitted to `_pool`, pruned as they finish


def submit(fn: Callable[[], object]) -> concurrent.futures.Future:
    """Run `fn` (which compiles a program) in a compile thread."""
    _jobs[:] = [j for j in _jobs if not j.done()]
    job = _pool().submit(fn)
    _jobs.append(job)
    return job


def compiling() -> int:
    """How many programs submitted to the compile threads have not finished
    (running or queued). At exit Python waits for the running ones, which
    XLA cannot stop: see `cli.run`."""
    return sum(not j.done() for j in _jobs)


@dataclasses.dataclass(frozen=True)
class Cost:
    """What getting one program cost this thread: seconds tracing, lowering
    and compiling (or loading), and how many programs it read from disk
    (hits) and wrote there (misses: compiled for real)."""

    seconds: float = 0.0
    hits: int = 0
    misses: int = 0

    def __sub__(self, other: "Cost") -> "Cost":
        return Cost(self.seconds - other.seconds, self.hits - other.hits, self.misses - other.misses)

    @property
    def loaded(self) -> bool:
        return self.hits > 0 and self.misses == 0


def thread_cost() -> Cost:
    return Cost(thread_compile_seconds(), getattr(_thread, "hits", 0), getattr(_thread, "misses", 0))


def _timed(compile_program: Callable[[], object]) -> Cost:
    before = thread_cost()
    compile_program()
    return thread_cost() - before


@dataclasses.dataclass(frozen=True)
class Shape:
    """A compiled program's shape. kind: "pass" (a batched pass), "heads"
    (the start layer's heads under the base mask, computed once per pass), or
    "sparse" and "rebase" (`sparse.py`), and "receivers" (`receivers.py`).
    heads: heads recomputed in the start layer (None: all of them); rows:
    cached senders each candidate re-mixes (None: no shared upstream sum,
    every candidate mixes them all)."""

    kind: str
    start_layer: int
    width: int
    heads: Optional[int]
    rows: Optional[int]
    reach: Optional[tuple] = None  # sparse.py's programs: heads per layer, then heads into the logits

    def family(self) -> "Shape":
        """The programs that run each candidate through the same arithmetic
        as this one, so that one check of their rounding against a full pass
        serves them all (`decide.calibrate`): any width of two or more (a
        pass of one candidate is built otherwise), and for sparse programs
        any head counts (more heads are more terms in the same sums, whose
        rounding the band's margin covers)."""
        return dataclasses.replace(self, width=min(self.width, 2),
                                   reach=None if self.kind == "sparse" else self.reach)

    def cover(self, start_layer: Optional[int] = None) -> "Shape":
        """The pass program that covers every pass from this one's start layer
        at this width: every head recomputed, no shared upstream sum; from
        `start_layer` (an earlier one) if given, which covers the layers between too."""
        return Shape("pass", self.start_layer if start_layer is None else start_layer, self.width, None, None)

    def covers(self, need: "Shape") -> bool:
        """Whether a pass of shape `need` can run in this program. A cover
        serves passes from later layers too: it recomputes the layers between
        under the pass's masks, which there agree with the start circuit whose
        deviations a later start would read (or cut only senders that no longer
        reach the output), so only float rounding differs."""
        if self.reach is not None or need.reach is not None:
            return (self.kind == need.kind and self.start_layer == need.start_layer and self.width >= need.width
                    and len(self.reach or ()) == len(need.reach or ())
                    and all(a >= b for a, b in zip(self.reach, need.reach)))
        if self.kind == need.kind == "pass" and self.heads is None and self.rows is None:
            return self.start_layer <= need.start_layer and self.width >= need.width
        return (self.kind == need.kind and self.start_layer == need.start_layer and self.width >= need.width
                and (self.heads is None or (need.heads is not None and self.heads >= need.heads))
                and (self.rows is None or (need.rows is not None and self.rows >= need.rows)))


class Programs:
    """The shapes compiled for one kind of pass (one model shape, graph, task,
    metric, ...: see `Scorer`), and the choice for each new pass. `shared`
    keeps one per kind in the process, as XLA's compiled programs are kept."""

    def __init__(self, adaptive: bool = True, label: Optional[str] = None):
        self.adaptive = adaptive and jax.process_count() == 1
        self.record = DiskRecord(label) if label is not None else None  # what earlier processes compiled
        self.load_costs: list[float] = []  # seconds per program read from disk
        self.compiled: set[Shape] = set()
        # seconds of extra work paid so far for lack of each shape, or (per layer) of its own cover
        self.regret: dict[Hashable, float] = {}
        self.compile_costs: dict[str, list[float]] = {}
        self.seconds_per_flop: Optional[float] = None
        self.reused = 0  # passes run in a larger program than they needed
        self.gaps: dict[Shape, tuple[float, float]] = {}  # family -> (2 x its first pass's gap to a full pass, that metric)
        self.forgone = 0.0  # seconds sparse passes would have saved where none was compiled (sparse_passes.py)
        self.ahead: dict[Shape, concurrent.futures.Future] = {}  # compiling in the background
        self.compiled_ahead = 0  # programs compiled ahead that were ready or waited for
        self.failed_ahead: set[Shape] = set()  # left to their passes, never tried ahead again
        self.waited = 0.0  # seconds passes waited for programs compiling ahead

    def compile_ahead(self, shape: Shape, compile_program: Callable[[], object]) -> bool:
        """Compile the program `shape` in a background thread (`compile_program`
        lowers and compiles it, as `jax.jit(f).lower(...).compile()`, which a
        later call of the same function with such arguments reuses), unless it
        is compiled or on its way. A pass that needs it waits for it."""
        if shape in self.compiled or shape in self.ahead or shape in self.failed_ahead:
            return False
        self.ahead[shape] = submit(functools.partial(_timed, compile_program))
        return True

    def collect(self, wait_for: Optional[Shape] = None) -> None:
        """Count the programs compiled ahead that are ready (after waiting for
        `wait_for`'s, if on its way). One that failed (out of memory, ...) is
        left to the pass that needs it, which compiles it and fails or retries in its own way."""
        if wait_for in self.ahead:
            start = time.perf_counter()
            concurrent.futures.wait([self.ahead[wait_for]])
            self.waited += time.perf_counter() - start
        for shape, job in list(self.ahead.items()):
            if job.done():
                del self.ahead[shape]
                if not job.cancelled() and job.exception() is not None:
                    self.failed_ahead.add(shape)
                elif not job.cancelled():
                    self.compiled.add(shape)
                    self.compiled_ahead += 1
                    self._note(shape, job.result())

    def cancel_ahead(self) -> None:
        """Drop the programs not yet started (a run that ends early needs them no more)."""
        for job in self.ahead.values():
            job.cancel()
        self.collect()

    def _note(self, shape: Shape, cost: Cost) -> None:
        """Count what getting the program `shape` cost, as loading or as compiling."""
        if cost.seconds <= 0 and not cost.hits:
            return  # JAX had it compiled already (another Scorer of the same kind)
        if cost.loaded:
            self.load_costs.append(cost.seconds)
        else:
            self.compile_costs.setdefault(shape.kind, []).append(cost.seconds)
        if self.record is not None:
            self.record.note(shape, None if cost.loaded else cost.seconds, cost.hits > 0 or cost.misses > 0)

    def estimate_compile(self, kind: str, shape: Optional[Shape] = None) -> float:
        """Seconds to get a program of `kind`: to load `shape` where an
        earlier process left it on disk, else to compile one (as measured in
        this process, else as recorded beside the disk cache; of this kind if
        seen, else of any)."""
        if shape is not None and self.record is not None and self.record.on_disk(shape):
            return self.load_estimate()
        recorded = (lambda kind: None) if self.record is None else self.record.compile_seconds
        every = [c for cs in self.compile_costs.values() for c in cs]
        for guess in (_mean(self.compile_costs.get(kind, [])), recorded(kind), _mean(every), recorded(None)):
            if guess is not None:
                return guess
        return 0.0

    def estimate_from(self, kinds: tuple, start_layer: int) -> float:
        """Seconds to get a program of `kinds[0]` from `start_layer` where the
        exact shape is not known yet: to load one where an earlier process
        left one of `kinds` from that layer on disk, else to compile one."""
        if self.record is not None and self.record.on_disk_from(kinds, start_layer):
            return self.load_estimate()
        return self.estimate_compile(kinds[0])

    def load_estimate(self) -> float:
        """Seconds to read a program back from disk, as measured in this process (0 before the first)."""
        return _mean(self.load_costs) or 0.0

    def covering(self, need: Shape, max_width: Optional[int] = None) -> list[Shape]:
        """The compiled programs (at most `max_width` wide) that can run a pass that needs `need`."""
        return [s for s in self.compiled if s.covers(need) and (max_width is None or s.width <= max_width)]

    def has(self, need: Shape, max_width: Optional[int] = None) -> bool:
        return bool(self.covering(need, max_width))

    def rent(self, key: Hashable, extra: float, compile_cost: float) -> bool:
        """Ski rental for one choice `key`: pay `extra` seconds now (True) while
        the seconds paid so far stay below `compile_cost`, else buy (False)."""
        paid = self.regret.get(key, 0.0) + extra
        if paid >= compile_cost:
            return False
        self.regret[key] = paid
        return True

    def choose(self, need: Shape, flops: Callable[[Shape], float], cover: Optional[Shape] = None,
               max_width: Optional[int] = None, buy_ahead: Optional[Callable[[Shape], bool]] = None) -> Shape:
        """The shape to run a pass that needs `need`: `need` itself, or a
        compiled one (at most `max_width` wide: memory) that covers it while
        renting is still cheaper. `cover` (a shape that covers every pass
        from `need`'s start layer, perhaps from an earlier layer) is compiled
        instead of `need` when nothing compiled covers it yet, so that the
        later passes from those layers can rent it; where renting an earlier
        layer's cover has cost a compilation, `need`'s own layer's cover is
        bought before its exact shape. `buy_ahead(shape)`: start compiling a
        shape bought (True where it is compiling), renting meanwhile."""
        self.collect()
        if need in self.compiled or not self.adaptive:
            return need
        larger = self.covering(need, max_width)
        if not larger:
            return need if cover is None else cover
        if self.seconds_per_flop is None:
            return need
        best = min(larger, key=flops)
        extra = max(flops(best) - flops(need), 0.0) * self.seconds_per_flop
        # renting an earlier layer's cover is regretted per layer: this layer's own cover would serve all its passes
        early = cover is not None and best.start_layer < need.start_layer and need.cover() not in self.compiled
        key = ("cover", need.start_layer) if early else need
        buy = need.cover() if early else need
        if not self.rent(key, extra, self.estimate_compile(need.kind, buy)):
            if buy_ahead is None or not buy_ahead(buy):
                return buy
        self.reused += 1
        return best

    def run(self, shape: Shape, flops: float, fn: Callable[[], object]):
        """Call `fn` (which runs the program `shape` and returns host values),
        measuring its compile seconds and its seconds per FLOP (after waiting
        for the program if it is compiling ahead)."""
        self.collect(wait_for=shape)
        before, start = thread_cost(), time.perf_counter()
        out = fn()
        wall, cost = time.perf_counter() - start, thread_cost() - before
        if shape not in self.compiled:
            self.compiled.add(shape)
            self._note(shape, cost)
        if flops > 0 and shape.kind != "heads":  # the heads program runs asynchronously
            rate = max(wall - cost.seconds, 0.0) / flops
            self.seconds_per_flop = _average(self.seconds_per_flop, rate)
        return out


def _mean(seconds: list[float]) -> Optional[float]:
    return sum(seconds) / len(seconds) if seconds else None


def _average(old: Optional[float], new: float) -> float:
    """A moving average that follows recent passes (`new` alone at first)."""
    return new if old is None else 0.8 * old + 0.2 * new


_shared: "collections.OrderedDict[Hashable, Programs]" = collections.OrderedDict()


def shared(key: Hashable, keep: int = 32, label: Optional[str] = None) -> Programs:
    """The process's `Programs` for passes of kind `key` (the most recent
    `keep` kinds are remembered; `label`: its name across processes, see
    `program_record.py`). A wrong key costs time, never correctness: a shape
    believed compiled is compiled when first run."""
    if key not in _shared:
        _shared[key] = Programs(label=label)
        while len(_shared) > keep:
            _shared.popitem(last=False)
    _shared.move_to_end(key)
    return _shared[key]
