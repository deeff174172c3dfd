"""Cache keys before weights: a stage learns which clips need computing before it loads a model.

A model stage's fingerprint (what decides its numbers: weight hashes, preprocessing, dtype ...) is
read off the loaded model, which costs the torch import and the weights load (seconds to
minutes) even when every clip is cached. But the fingerprint is a function of its *sources*:
the settings, the bytes of every file in the model folder, the versions of the packages that
interpret them, and the stage's code version. `source_key` hashes those without importing torch;
the stage stores it next to the fingerprint in its store's meta, and a rerun whose source key
matches reuses the remembered fingerprint (`remembered`), computes the clip keys, and loads
nothing when `still_to_do` is empty. A hub id (no local files to hash) has no source key: its
stage always loads. A shard that fails its integrity check (`features.storage.store.check_shard`)
counts as not cached, so this fast path never reuses damaged clips: the stage loads its model and
its `StoreUpdate` sets the shard aside and recomputes them.
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Iterable, Mapping

from features.cache import versions
from features.params import resolve_model_path
from features.cache.hashcache import sha256_file
from features.storage.store import StoreError, StoreReader, clip_key, read_meta


def source_key(settings: Mapping, model: str, packages: Iterable[str], code: Iterable[str],
               runtime: Mapping | None = None) -> str | None:
    """Hash of everything a fingerprint is computed from, or None when `model` is not local.

    `model` is a params value (path or pypkg:); every file of its folder (of the file's folder
    for a single-file model such as a GGUF) is hashed (`hashcache`: big files by stat). `code`
    are the project modules that compute the fingerprint (an edit to them is a miss). `runtime`
    holds machine facts a fingerprint resolves (e.g. what dtype `auto` became). Files are named
    relative to their folder and modules by name: the key is the same in every checkout.
    """
    files = model_files(model)
    if files is None:
        return None
    model_part = {f.name: sha256_file(f) for f in files}
    code_part = {m: sha256_file(versions.module_file(m)) for m in sorted(code)}
    return "src:" + clip_key("sources", dict(settings), model_part, code_part,
                             {p: package_version(p) for p in packages}, dict(runtime or {}))


def model_files(model: str) -> list[Path] | None:
    """The files that make up a local model ([] for none configured), or None for a hub id."""
    if not model:
        return []
    path = Path(resolve_model_path(model))
    folder = path if path.is_dir() else path.parent if path.is_file() else None
    if folder is None:
        return None
    return sorted(p for p in folder.iterdir() if p.is_file() and not versions.is_junk(p.name))


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def remembered(store: str | Path, key: str | None) -> dict | None:
    """The meta of the finished store at `store` if it was written under source key `key`."""
    if key is None:
        return None
    try:
        meta = read_meta(store)  # store.json only: whether clips are intact is still_to_do's part
    except StoreError:
        return None
    return meta if meta.get("sources") == key else None


def still_to_do(out: str | Path, wanted: Mapping[str, str]) -> list[str]:
    """Clips of `wanted` (in order) whose result in the finished store `out` is missing, stale or
    in a damaged shard."""
    try:
        with StoreReader(out, on_damage="skip") as reader:
            have = dict(reader.keys)
    except StoreError:
        have = {}
    return [cid for cid, key in wanted.items() if have.get(cid) != key]
