"""The cyclic garbage collector, tuned for the services' batch work.

A batch of 500 events makes and keeps hundreds of thousands of small objects (envelopes,
contracts, domain events, rows) until it is stored. With CPython's default thresholds the
collector runs every 700 allocations, promotes those live objects, and then walks the whole heap
(every imported module's objects included) over and over: measured here, a fifth of pipeline's
Python time per lead (decode, open, store: 150-160 µs per lead with the defaults, 120-130 with
this tuning; `tests/perf` holds the service benchmarks).

So each service process, and each relay process, before its main coroutine runs:
- collects once and freezes what its imports made (modules, classes, schemas) out of every
  later collection (`gc.freeze`, the standard library's own answer for long-lived processes);
- collects the young generation every `YOUNG` allocations instead of every 700.

Reference counting still frees almost everything at once; only cycles wait a little longer, and
a young generation of 50,000 objects is a few MiB at most.
"""

from __future__ import annotations

import gc

YOUNG = 50_000


def tune_gc(young: int = YOUNG) -> None:
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, old)
