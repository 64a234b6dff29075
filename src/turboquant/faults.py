"""Kill points for fault-injection tests: a run can be made to die (SIGKILL) at a named point.

``TURBOQUANT_FAULT=<point>[:<n>]`` kills the process the ``n``-th time (default: the first) ``point(<point>)`` is
reached. Unset (always, outside tests) every call is a dictionary lookup and nothing else. The points sit at the
task boundaries of the flow and inside the writers (between shards, before a manifest, between the renames of an
atomic output), where a crash could leave partial work behind; the fault tests kill a run at each of them and check
that a re-run completes, redoes nothing that had finished and leaves no partial output.
"""

from __future__ import annotations

import os
import signal
import threading

FAULT_ENV = "TURBOQUANT_FAULT"

_counts: dict[str, int] = {}
_lock = threading.Lock()


def point(name: str) -> None:
    """SIGKILL this process when ``name`` is the point ``TURBOQUANT_FAULT`` names and its count is reached."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    with _lock:
        _counts[name] = _counts.get(name, 0) + 1
        hit = _counts[name] == int(nth or 1)
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)
