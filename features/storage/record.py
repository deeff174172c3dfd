"""What a feature store holds and where it came from: one typed record behind every store's meta.

Every writer of an embedding store (the embed stage, adapt@, joint@, the aligned store) builds
its ``store.json`` meta through `StoreRecord.to_meta`, and a reader can check a meta back with
`StoreRecord.from_meta`. The JSON keys are those readers already use (``encoder``,
``fingerprint``, ``num_layers``, ``hidden_size``, ``layers_frames``, ``store_dtype``; a
producer's own keys such as ``sources`` or ``adapted_layers`` travel in `extra`), plus
``producer``, ``family``, ``layers_pooled`` and ``code_version``. Clip keys and head lineage
come from ``fingerprint`` (and the dtype) alone: the record adds keys beside it, never changes it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, get_args

from features.storage.store import StoreError

Producer = Literal["encoder", "transform"]
PRODUCERS = get_args(Producer)
_NAME_KEY = "encoder"  # the meta key exports and benchmarks already read a store's name from
_REQUIRED = ("producer", _NAME_KEY, "family", "layers_pooled", "layers_frames", "hidden_size",
             "store_dtype", "fingerprint", "code_version")
_OWN = (*_REQUIRED, "num_layers")  # keys the record writes itself; `extra` may not reuse them


class RecordError(StoreError):
    """A store's meta is not a valid StoreRecord (written by old code, or edited by hand)."""


@dataclass(frozen=True)
class StoreRecord:
    producer: Producer  # "encoder": a model's own states; "transform": computed from other stores
    name: str  # the store's encoder name, as heads list it in `features`
    family: str  # encoder family (speech | vision | text) or transform type (adapt | joint | align)
    layers_pooled: tuple[int, ...]  # what row i of /pooled holds: a hidden-state index (row number if none)
    layers_frames: tuple[int, ...]  # hidden states also kept frame by frame in /clips (may be negative)
    hidden_size: int  # width D of every pooled and frame vector
    store_dtype: str  # numpy dtype the vectors are stored in
    fingerprint: Mapping[str, Any]  # what decides the numbers: enters the clip keys and head lineage
    code_version: str | None  # the producer's code version as its keys already record it (None: none)
    extra: Mapping[str, Any] = field(default_factory=dict)  # producer-specific top-level keys

    def __post_init__(self) -> None:
        if self.producer not in PRODUCERS:
            raise RecordError(f"store record producer {self.producer!r}: use one of {list(PRODUCERS)}.")
        clash = sorted(set(self.extra) & set(_OWN))
        if clash:
            raise RecordError(f"store record extra keys {clash} would overwrite the record's own keys.")
        # Tuples and plain JSON values, so a record read back from its meta equals the one written.
        object.__setattr__(self, "layers_pooled", tuple(int(v) for v in self.layers_pooled))
        object.__setattr__(self, "layers_frames", tuple(int(v) for v in self.layers_frames))
        object.__setattr__(self, "fingerprint", _plain(self.fingerprint))
        object.__setattr__(self, "extra", _plain(self.extra))

    @property
    def num_layers(self) -> int:
        return len(self.layers_pooled)

    def to_meta(self) -> dict:
        """The store.json meta: plain JSON values (a fresh copy, never the record's own dicts)."""
        meta = {**self.extra, "producer": self.producer, _NAME_KEY: self.name, "family": self.family,
                "layers_pooled": list(self.layers_pooled), "num_layers": self.num_layers,
                "layers_frames": list(self.layers_frames), "hidden_size": int(self.hidden_size),
                "store_dtype": self.store_dtype, "fingerprint": dict(self.fingerprint),
                "code_version": self.code_version}
        return _plain(meta)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "StoreRecord":
        """The record a meta was written from; a RecordError names what is missing or wrong."""
        missing = [k for k in _REQUIRED if k not in meta]
        if missing:
            raise RecordError(f"store meta lacks {missing}: it was written before store records "
                              f"or by hand; rerun the stage that writes it.")
        if "num_layers" in meta and int(meta["num_layers"]) != len(meta["layers_pooled"]):
            raise RecordError(f"store meta says num_layers={meta['num_layers']} but lists "
                              f"{len(meta['layers_pooled'])} pooled layers.")
        return cls(producer=meta["producer"], name=meta[_NAME_KEY], family=meta["family"],
                   layers_pooled=meta["layers_pooled"], layers_frames=meta["layers_frames"],
                   hidden_size=int(meta["hidden_size"]), store_dtype=meta["store_dtype"],
                   fingerprint=dict(meta["fingerprint"]), code_version=meta["code_version"],
                   extra={k: v for k, v in meta.items() if k not in _OWN})


def _plain(mapping: Mapping[str, Any]) -> dict:
    """A deep copy in JSON values, as StoreUpdate stores them (tuples -> lists, others -> str)."""
    return json.loads(json.dumps(dict(mapping), default=str))
