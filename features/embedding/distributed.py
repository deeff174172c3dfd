"""Scale-out of the embed stage over torch.distributed ranks (torchrun, SLURM, any launcher).

Each rank encodes every WORLD_SIZE-th clip still to do into its own store,
``<out>/.ranks/rank-<r>-of-<w>`` (a normal store: a killed rank resumes from its parts), then
rank 0 copies all finished rank stores into ``<out>`` through the store API and deletes ``.ranks``
only when every rank succeeded (a failed rank's finished parts are its rerun's resume point).
The merged store is built by one `StoreUpdate` over the full `wanted` map, so it is packed in
the same order, with the same keys and meta, as a single-process run. Rank stores live inside
the output folder because rank 0 must read them: several nodes need a shared filesystem.
The process group (gloo on CPU, nccl on GPUs) is used only for barriers.
"""
from __future__ import annotations

import dataclasses
import os
from datetime import timedelta
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as torch_dist

from features.cache.keys import still_to_do  # noqa: F401  (ranks' share of what is left)
from features.reliability.clips import CHECKPOINT_S
from features.encoders import EncoderConfig
from features.reliability import faults
from features.storage.store import RANKS, StoreError, StoreReader, StoreUpdate

MERGE_CHECKPOINT_CLIPS = 256  # clips copied per part file while merging (bounds memory)


def rank_and_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun / torch.distributed launchers set them; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def init() -> None:
    """Join the process group once (barriers only); a no-op for a single process."""
    _, world = rank_and_world()
    if world > 1 and not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch_dist.init_process_group(backend, timeout=timedelta(hours=12))


def barrier() -> None:
    if torch_dist.is_initialized():
        if torch_dist.get_backend() == "nccl":
            torch_dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            torch_dist.barrier()


def all_succeeded(ok: bool) -> bool:
    """A barrier that also tells every rank whether every rank got here with ``ok``."""
    if not torch_dist.is_initialized():
        return ok
    nccl = torch_dist.get_backend() == "nccl"
    failed = torch.tensor([0 if ok else 1], device=f"cuda:{torch.cuda.current_device()}"
                          if nccl else "cpu")
    torch_dist.all_reduce(failed)
    return int(failed.item()) == 0


def rank_config(cfg: EncoderConfig) -> EncoderConfig:
    """One GPU per rank: cuda / auto become cuda:<LOCAL_RANK> when several ranks share a node."""
    _, world = rank_and_world()
    if world == 1 or not torch.cuda.is_available() or cfg.device == "cpu":
        return cfg
    device = f"cuda:{local_rank() % torch.cuda.device_count()}"
    torch.cuda.set_device(device)
    return dataclasses.replace(cfg, device=device)


def checkpoint_seconds() -> float:
    return CHECKPOINT_S


def shard(ids: list[str], rank: int, world: int) -> list[str]:
    """Every world-th clip: ranks get similar duration mixes, and the split is deterministic."""
    return ids[rank::world]


def ranks_dir(out: Path) -> Path:
    return Path(out) / RANKS


def rank_store(out: Path, rank: int, world: int) -> Path:
    return ranks_dir(out) / f"rank-{rank}-of-{world}"


def rank_stores(out: Path, world: int) -> list[Path]:
    return [rank_store(out, r, world) for r in range(world)]


def merge(out: Path, kind: str, meta: Mapping, wanted: Mapping[str, str], parts: list[Path]) -> Path:
    """Bring `out` to `wanted` from its own valid clips plus the rank stores' clips."""
    with StoreUpdate(out, kind, meta, wanted, compression=meta["compression"],
                     shard_mb=meta["shard_mb"]) as up:  # the layout embed_store put in meta
        todo = set(up.todo)
        for path in parts:
            if (path / "store.json").is_file():
                _copy(path, up, todo)
    return Path(out)


def _copy(path: Path, up: StoreUpdate, todo: set[str]) -> None:
    """Copy a rank store's clips in blocks: memory holds one block, not the rank store."""
    with StoreReader(path) as reader:
        ids = [cid for cid in reader.ids if cid in todo and reader.keys[cid] == up.wanted[cid]]
        for start in range(0, len(ids), MERGE_CHECKPOINT_CLIPS):
            block = ids[start:start + MERGE_CHECKPOINT_CLIPS]
            pooled = reader.pooled(ids=block) if reader.has_pooled else None  # [n, L, D]
            for n, cid in enumerate(block):
                array = reader.get(cid) if _has_array(reader, cid) else None
                up.add(cid, array, attrs=reader.attrs(cid) if array is not None else None,
                       pooled=None if pooled is None else pooled[n])
                todo.discard(cid)
            up.checkpoint()
            faults.point("distributed.mid_merge")


def _has_array(reader: StoreReader, cid: str) -> bool:
    try:
        reader.attrs(cid)
        return True
    except StoreError:  # a pooled-only clip
        return False
