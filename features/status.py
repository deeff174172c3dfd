"""`mer status`: clips per stage done / failed / pending / blocked, read from the stage outputs.

Done = in the stage's store; failed = in its failures.json; pending = ready upstream but not done
(run `dvc repro`); blocked = failed or missing upstream. Paths are those of dvc.yaml (a test keeps
them in step). Fast: reads only store indexes and JSON, never arrays.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from features.errors import MerError
from features.extract import read_transcripts
from features.manifest import read_manifest
from features.reports import read_json
from features.store import StoreError, StoreReader

MANIFEST = "artifacts/prepare/manifest.csv"
# stage -> (output, failures.json, upstream stage); embed@<name> rows come from params.
MEDIA_STAGES = {
    "audio": ("artifacts/audio/audio", "artifacts/audio/failures.json", "prepare"),
    "denoise": ("artifacts/denoise/denoised", "artifacts/denoise/failures.json", "audio"),
    "asr": ("artifacts/asr/transcripts.json", "artifacts/asr/failures.json", "denoise"),
    "faces": ("artifacts/faces/faces", "artifacts/faces/failures.json", "prepare"),
}


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


def stage_table(encoders: Mapping[str, Mapping]) -> dict[str, tuple[str, str, str]]:
    """Every per-clip stage with its output, failure report and upstream stage."""
    by_output = {out: stage for stage, (out, _, _) in MEDIA_STAGES.items()}
    table = dict(MEDIA_STAGES)
    for name, enc in encoders.items():
        upstream = by_output.get(str(enc.get("input", "")).rstrip("/"), "prepare")
        table[f"embed@{name}"] = (f"artifacts/features/{name}",
                                  f"artifacts/features/{name}.failures.json", upstream)
    return table


def pipeline_status(root: str | os.PathLike, encoders: Mapping[str, Mapping]) -> list[StageStatus]:
    """Status rows for prepare and every per-clip stage of the project at `root`."""
    root = Path(root)
    if not (root / MANIFEST).is_file():
        raise MerError(f"{root / MANIFEST} does not exist: run `dvc repro prepare` first.")
    clips = {c.clip_id for c in read_manifest(root / MANIFEST)}
    prepare = StageStatus("prepare", done=clips,
                          failed=_failures(root / "artifacts/prepare/failures.json"))
    rows = {"prepare": prepare}
    for stage, (out, fails, upstream) in stage_table(encoders).items():
        row = StageStatus(stage, failed=_failures(root / fails))
        row.done, row.missing = _done(root / out)
        row.done &= clips  # clips removed from the corpus do not count
        ready = rows[upstream].done if upstream in rows else clips
        row.pending = ready - row.done - set(row.failed)
        row.blocked = clips - row.done - set(row.failed) - row.pending
        rows[stage] = row
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
