"""`mer report`: `dvc exp show --json` as a Markdown table (the ablation table of the papers).

    dvc exp run --queue -S semi.enabled=false -n no-semi
    dvc exp run --queue -S priors.method=none -n no-priors
    dvc exp run --queue -S align.method=none -n no-align
    dvc exp run --run-all && mer report --metric weighted_f1

One row per baseline commit / workspace / experiment; columns are the params that differ
between rows (or those named with --param) and every metric leaf whose dotted path contains
one of the --metric strings.
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from typing import Any, Iterable

from features.errors import MerError


@dataclass
class Row:
    name: str
    params: dict[str, Any]
    metrics: dict[str, Any]


def exp_show(cwd: str = ".") -> list[dict]:
    """The JSON of `dvc exp show --json` in `cwd`."""
    out = subprocess.run(["dvc", "exp", "show", "--json"], cwd=cwd, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise MerError(f"`dvc exp show --json` failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout)


def rows(data: list[dict]) -> list[Row]:
    """Workspace, baselines and their experiments, in `dvc exp show` order."""
    found = []
    for base in data:
        found += _row(_name(base), base)
        for exp in base.get("experiments") or []:
            for rev in exp.get("revs", []):
                found += _row(_name(rev), rev)
    return found


def markdown(table: list[Row], params: Iterable[str] = (), metrics: Iterable[str] = ()) -> str:
    params, metrics = list(params), list(metrics)
    if not params:  # the params that differ between rows: the switches of the ablation
        keys = sorted({k for r in table for k in r.params})
        params = [k for k in keys if len({json.dumps(r.params.get(k)) for r in table}) > 1]
    mkeys = sorted({k for r in table for k in r.metrics
                    if not metrics or any(m in k for m in metrics)})
    head = ["experiment", *params, *(_label(k) for k in mkeys)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r.name, *(_cell(r.params.get(k)) for k in params),
                 *(_cell(r.metrics.get(k)) for k in mkeys)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _label(key: str) -> str:
    """results/semi/metrics.json:heads.x.r2 -> semi/heads.x.r2 (the file's folder names it)."""
    path, _, leaf = key.partition(":")
    folder = path.rsplit("/", 2)[-2] if "/" in path else ""
    return f"{folder}/{leaf}" if folder else leaf


def _name(entry: dict) -> str:
    rev = entry.get("rev", "?")
    return entry.get("name") or (rev[:7] if len(rev) == 40 else rev)


def _row(name: str, entry: dict) -> list[Row]:
    data = entry.get("data")
    if not data:
        return []
    params = {}
    for file in (data.get("params") or {}).values():
        params.update(_flat(file.get("data") or {}))
    metrics = {}
    for path, file in (data.get("metrics") or {}).items():
        metrics.update({f"{path}:{k}": v for k, v in _flat(file.get("data") or {}).items()})
    return [Row(name, params, metrics)]


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)
