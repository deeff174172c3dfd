"""Shared by every benchmark: machine/device description, timing, and saving results as JSON.

Each benchmark prints a human summary, saves ``benchmarks/results/<name>-<date>.json`` with the
machine, the device, the commit and the numbers, and ends by printing one JSON line with its keys.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from a checkout without install
    sys.path.insert(0, str(ROOT))


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, memory, GPU if any, library versions."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        # 1/5/15-minute load averages when the result was saved: above the core count, other work
        # shared the CPU and absolute times are inflated (ratios from one run less so)
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        info["device"] = "cpu"
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, text=True,
                               capture_output=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    """with timer() as t: ...; then t["s"] holds the wall-clock seconds."""
    out = {"s": 0.0}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["s"] = time.perf_counter() - start


def save(name: str, results: dict[str, Any], summary: dict[str, Any]) -> Path:
    """Write the full results with machine/commit/date; print `summary` as the final JSON line."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now()
    record = {"benchmark": name, "date": now.isoformat(timespec="seconds"), "commit": commit(),
              "machine": machine(), "summary": summary, "results": results}
    path = RESULTS / f"{name}-{now:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=1, default=str))
    print(f"saved {path.relative_to(ROOT)}", file=sys.stderr)
    print(json.dumps({**summary, "device": record["machine"]["device"]}, default=str))
    return path
