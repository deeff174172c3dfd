"""Fault injection at named points, for crash-recovery tests: ``MER_FAULT=<point>[@N]``.

When the variable names a point, the process exits at once (``os._exit``: no ``finally``, no
flush, no atexit: what a ``kill -9`` or a power cut leaves) the N-th time (default 1st) the code
passes that point. A point may carry a detail (``json.mid_write:transcripts.json``); the variable
then matches the bare name or the name with that detail. Unset, a point costs one dict lookup.

Points: store.mid_shard, store.before_index, store.cleanup, distributed.mid_merge,
json.mid_write[:<file name>] (ASR transcripts, prepare's probes.json, every atomic JSON write).
"""
from __future__ import annotations

import os
import sys

EXIT_CODE = 86  # what a test checks to know the fault fired (the point was reached)
_hits: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    value = os.environ.get("MER_FAULT", "").strip()
    if not value:
        return None
    name, _, count = value.partition("@")
    return name, int(count or 1)


def point(name: str, detail: str = "") -> None:
    """Exit hard here if MER_FAULT names this point (and this is its N-th pass)."""
    target = _target()
    if target is None or target[0] not in (name, f"{name}:{detail}"):
        return
    _hits[target[0]] = _hits.get(target[0], 0) + 1
    if _hits[target[0]] == target[1]:
        sys.stderr.write(f"MER_FAULT: exiting at {target[0]} (pass {target[1]})\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)
