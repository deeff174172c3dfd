"""`mer status`: clips per stage done / failed / pending / blocked, read from the stage outputs.

Done = in the stage's store; failed = in its failures.json; pending = ready upstream but not done
(run `dvc repro`); blocked = failed or missing upstream. Stages and paths come from
features.topology (checked against dvc.yaml). Fast: reads only store indexes and JSON, never arrays.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from features.errors import MerError
from features.audio.stages import read_transcripts
from features.media.manifest import read_manifest
from features.topology import MANIFEST, per_clip_stages
from features.reliability.reports import read_json
from features.storage.store import StoreError, StoreReader


@dataclass
class StageStatus:
    stage: str
    done: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)  # clip id -> reason
    pending: set[str] = field(default_factory=set)
    blocked: set[str] = field(default_factory=set)
    missing: bool = False  # the output does not exist yet

    def reasons(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for reason in self.failed.values():
            counts[reason] = counts.get(reason, 0) + 1
        return counts


def pipeline_status(root: str | os.PathLike, encoders: Mapping[str, Mapping]) -> list[StageStatus]:
    """Status rows for prepare and every per-clip stage of the project at `root`."""
    root = Path(root)
    if not (root / MANIFEST).is_file():
        raise MerError(f"{root / MANIFEST} does not exist: run `dvc repro prepare` first.")
    clips = {c.clip_id for c in read_manifest(root / MANIFEST)}
    rows: dict[str, StageStatus] = {}
    for stage in per_clip_stages(encoders):
        row = StageStatus(stage.name, failed=_failures(root / stage.failures))
        if stage.name == "prepare":
            row.done = clips
        else:
            row.done, row.missing = _done(root / stage.output)
            row.done &= clips  # clips removed from the corpus do not count
        ready = set(clips)
        for up in stage.upstream:
            ready &= rows[up].done if up in rows else clips
        row.pending = ready - row.done - set(row.failed)
        row.blocked = clips - row.done - set(row.failed) - row.pending
        rows[stage.name] = row
    return list(rows.values())


def _done(path: Path) -> tuple[set[str], bool]:
    if not path.exists():
        return set(), True
    if path.suffix == ".json":
        return set(read_transcripts(path)), False
    try:
        with StoreReader(path) as store:
            return set(store.ids), False
    except StoreError:
        return set(), True  # an interrupted first run: nothing committed yet


def _failures(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    return {f["clip_id"]: f["reason"] for f in read_json(path).get("failures", [])}


def format_status(rows: list[StageStatus]) -> str:
    lines = [f"{'stage':<18} {'done':>6} {'failed':>6} {'pending':>7} {'blocked':>7}  failures"]
    for r in rows:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r.reasons().items()))
        note = " (not run yet)" if r.missing else ""
        lines.append(f"{r.stage:<18} {len(r.done):>6} {len(r.failed):>6} {len(r.pending):>7} "
                     f"{len(r.blocked):>7}  {reasons}{note}")
    return "\n".join(lines)
