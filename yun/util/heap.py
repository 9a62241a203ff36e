"""The cyclic garbage collector of a long-running component, set for a server's heap.

A started component holds a few hundred thousand objects that live as long as the
process: modules, mapped classes, Pydantic and FastAPI schemas, compiled statements.
With CPython's defaults every full collection walks all of them, and a young-generation
collection runs every 700 allocations of container objects, a few times per API request.
Measured on the control server serving VM reads (issue 10, benchmarks/api_reads.py):
collections took 15 % of its CPU (4.5 s of 29 s), and moving the started heap out of the
collector's reach and collecting the young generation less often brought that to 2 %,
a page of 50 VMs from 8.7 to 6.1 ms of CPU.

Nothing else changes: reference counting still frees almost every object at once; only
garbage in reference cycles waits longer (at most :data:`YOUNG_THRESHOLD` allocations
before the young generation is looked at).
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)

#: Container allocations between two young-generation collections (CPython: 700).
YOUNG_THRESHOLD = 20_000


def settle_started_heap() -> None:
    """Collect what starting up left behind, then freeze what survived (it is never
    walked again) and raise the young generation's threshold. Call once, after the
    component started."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
    log.info("garbage collector set for a started server",
             extra={"frozen_objects": gc.get_freeze_count(),
                    "young_threshold": YOUNG_THRESHOLD})
