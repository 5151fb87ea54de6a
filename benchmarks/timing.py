"""Side-by-side step timing shared by the benchmarks.

A `Variant` is one compiled step with its own carry (the train state, donated, and
whatever else the step threads through) and its own pre-put batches. `interleave` first
compiles and warms up every variant untimed, then runs rounds that each time `steps`
consecutive steps of every variant (ended by jax.block_until_ready), the first variant
rotating each round so that a change of machine load hits all variants alike. Lowerings
during the timed rounds are counted per variant: any would be a recompile inside the timing.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

# Emitted once per program lowered (jit, pmap), before any persistent-cache lookup.
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@dataclasses.dataclass
class Variant:
    """`step(carry, batch) -> (carry, metrics)`; the carry is donated, so always rebound."""

    step: Callable[[Any, Any], tuple[Any, Any]]
    carry: Any
    batches: Sequence[Any]
    times: list[float] = dataclasses.field(default_factory=list)  # seconds per step, one per round
    recompiles: int = 0

    def steps(self, n: int) -> float:
        """Seconds per step over n consecutive steps."""
        t0 = time.perf_counter()
        for i in range(n):
            self.carry, m = self.step(self.carry, self.batches[i % len(self.batches)])
        jax.block_until_ready((self.carry, m))
        return (time.perf_counter() - t0) / n


def interleave(variants: Mapping[str, Variant], rounds: int, steps: int, warmup: int = 2) -> None:
    """Compiles and warms up every variant, then times `rounds` interleaved rounds."""
    for v in variants.values():
        v.steps(warmup)
    lowered: list[str] = []

    def listener(event: str, _secs: float, **_: Any) -> None:
        if event == LOWERING_EVENT:
            lowered.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        names = list(variants)
        for r in range(rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                before = len(lowered)
                variants[k].times.append(variants[k].steps(steps))
                variants[k].recompiles += len(lowered) - before
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def print_table(variants: Mapping[str, Variant]) -> None:
    """Per-step medians, minima and maxima over rounds, and recompiles while timed."""
    w = max(8, *map(len, variants))
    print(f"{'variant':<{w}} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'recompiles':>10}")
    for k, v in variants.items():
        print(f"{k:<{w}} {1e3 * statistics.median(v.times):>10.1f} {1e3 * min(v.times):>8.1f} "
              f"{1e3 * max(v.times):>8.1f} {v.recompiles:>10d}")


def ratio(num: Sequence[float], den: Sequence[float]) -> tuple[float, str]:
    """The ratio of the medians of two variants' times, and it printed with the median,
    min and max of the per-round ratios (the per-round median is the robust one when the
    machine's load changes mid-run) and how many rounds' ratios exceed 1: a two-sided sign
    test of "no difference" on that count tells parity from a real gap (at parity each
    round is a coin flip)."""
    r = statistics.median(num) / statistics.median(den)
    per_round = [a / b for a, b in zip(num, den)]
    above = sum(x > 1 for x in per_round)
    n = len(per_round)
    tail = sum(math.comb(n, k) for k in range(min(above, n - above) + 1)) / 2 ** n
    return r, (f"{r:.3f} (per-round ratios: median {statistics.median(per_round):.3f}, "
               f"min {min(per_round):.3f}, max {max(per_round):.3f}; {above} of {n} rounds > 1, "
               f"sign test p = {min(1.0, 2 * tail):.2g})")
