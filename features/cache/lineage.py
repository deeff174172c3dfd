"""Which features a head was trained on, and the check that prediction computes the same ones.

A head learns from one encoder's numbers; the same clip encoded by other weights, another
dtype, pooling, tokenizer or encoder code gives other numbers, and the head's output on them means
nothing. At training, `record` takes each feature store's fingerprint (what decides its values:
`features.embedding.stage`) into the head's bundle; `mer predict` computes features for new clips with
params.yaml's settings and `check`s them against the record, so a mismatch (params edited since
training, other weights, another library version) is an error naming what differs, never
silently different features.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping

from features.errors import MerError
from features.storage.store import StoreReader

# Fingerprint entries that do not change the pooled numbers a head reads: where the model
# folder lies on this machine, and which layers also keep frame-level states.
IGNORED = ("resolved_path", "layers_frames")


class LineageError(MerError):
    """Features for prediction differ from those the head was trained on."""


def record(features_dir: str | os.PathLike, encoders: Iterable[str]) -> dict[str, dict]:
    """{encoder: what decides its features} for the stores a head trains on."""
    out = {}
    for name in encoders:
        with StoreReader(Path(features_dir) / name, kind="embedding") as store:
            out[name] = _decisive(store.meta)
    return out


def _decisive(meta: Mapping) -> dict:
    fp = {k: v for k, v in dict(meta.get("fingerprint", {})).items() if k not in IGNORED}
    return json.loads(json.dumps({"fingerprint": fp, "store_dtype": meta.get("store_dtype")},
                                 sort_keys=True, default=str))


def check(recorded: Mapping[str, Mapping] | None, features_dir: str | os.PathLike,
          encoders: Iterable[str], head: str = "the head") -> None:
    """Raise LineageError when a store under `features_dir` was computed differently from what
    `recorded` says the head was trained on. A bundle without a record is not checked."""
    if not recorded:
        return
    now = record(features_dir, encoders)
    for name, have in now.items():
        want = recorded.get(name)
        if want is None:
            raise LineageError(f"{head} has no record of encoder {name!r}; retrain it "
                               f"(`dvc repro`).")
        diff = _differences(want, have)
        if diff:
            shown = "; ".join(f"{k}: trained {a}, now {b}" for k, a, b in diff[:4])
            raise LineageError(
                f"{head} was trained on {name!r} features computed differently from the ones "
                f"computed now for prediction ({shown}). Retrain with the current settings "
                f"(`dvc repro`), or restore the settings, weights and libraries it was trained "
                f"with.")


def _differences(want: Mapping, have: Mapping, prefix: str = "") -> list[tuple[str, str, str]]:
    out = []
    for key in sorted(set(want) | set(have)):
        a, b = want.get(key), have.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((prefix + key, _short(a), _short(b)))
    return out


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
