"""`mer store export`: an embedding store's features in the layouts other code reads.

    mer store export STORE --format mertools --layers last4 --level utterance OUT/

- ``mertools``: one ``<clip id>.npy`` per clip in ``OUT/``, MERTools' layout (utterance ``[D]``,
  frame ``[T, D]``, float32): point MERTools' training scripts at ``OUT/`` as a feature folder.
- ``npz``: one ``OUT.npz`` with ``ids`` [N], ``features`` ([N, D] utterance, or every clip's
  frames stacked ``[sum T, D]`` with ``offsets`` [N+1]: clip i is ``features[offsets[i]:offsets[i+1]]``)
  and ``info`` (a JSON string: store, layers, reduce, level).
- ``parquet``: one ``OUT.parquet`` (needs pyarrow), a row per clip: ``id`` and ``feature``
  (a list of D floats, or of T lists for frames), the same ``info`` in the file metadata.

The chosen layers are combined by ``--reduce``: ``sum`` (default; what MERTools computes from
its last four layers, ``torch.stack(hidden_states)[-4:].sum(0)``) or ``mean``. Hidden state 0 is
the embeddings output, so for a 24-layer model ``last4`` = states 21..24. Utterance vectors are
sums of the stored per-layer means (the mean over frames of the summed layers, as MERTools
takes it); frame level needs the layers among the store's ``layers_frames``. Clips are written
one at a time (utterance level reads one layer of the store at a time).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from features.errors import ConfigError
from features.storage.store import StoreReader

FORMATS = ("mertools", "npz", "parquet")
LEVELS = ("utterance", "frame")
REDUCES = ("sum", "mean")
SUFFIX = {"npz": ".npz", "parquet": ".parquet"}


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """`last4`, `last<N>`, `all`, or indices/ranges like `-1`, `12,13`, `21-24` -> positive indices."""
    spec = spec.strip()
    if spec == "all":
        return list(range(num_layers))
    if spec.startswith("last") and spec[4:].isdigit():
        count = int(spec[4:])
        if not 1 <= count <= num_layers:
            raise ConfigError(f"--layers {spec}: the store has {num_layers} hidden states.")
        return list(range(num_layers - count, num_layers))
    picked = []
    try:
        for part in spec.split(","):
            first, sep, last = part.strip().partition("-") if not part.strip().startswith("-") \
                else (part.strip(), "", "")
            picked += list(range(int(first), int(last) + 1)) if sep else [int(first)]
    except ValueError:
        raise ConfigError(f"--layers {spec!r}: use last4, last<N>, all, or indices such as -1, "
                          f"12,13 or 21-24 (0 = embeddings output).") from None
    bad = [i for i in picked if not -num_layers <= i < num_layers]
    if bad or not picked:
        raise ConfigError(f"--layers {spec!r}: {bad or 'nothing'} out of range; the store has "
                          f"{num_layers} hidden states (0..{num_layers - 1}).")
    return sorted({i % num_layers for i in picked})


def export_store(store: str | os.PathLike, out: str | os.PathLike, fmt: str = "mertools",
                 layers: str = "last4", level: str = "utterance", reduce: str = "sum",
                 force: bool = False) -> dict:
    """Write `store`'s features in `fmt` to `out`; returns the `info` it records."""
    for name, value, allowed in (("--format", fmt, FORMATS), ("--level", level, LEVELS),
                                 ("--reduce", reduce, REDUCES)):
        if value not in allowed:
            raise ConfigError(f"{name} {value!r}: use one of {list(allowed)}.")
    out = Path(out)
    if fmt in SUFFIX and out.suffix != SUFFIX[fmt]:
        out = out.with_name(out.name + SUFFIX[fmt])
    with StoreReader(store, kind="embedding") as reader:
        num_layers = int(reader.meta.get("num_layers") or reader.pooled_shape[0])
        picked = parse_layers(layers, num_layers)
        info = {"store": str(store), "encoder": reader.meta.get("encoder"), "format": fmt,
                "level": level, "layers": picked, "layers_spec": layers, "reduce": reduce,
                "dtype": "float32", "clips": len(reader.ids), "out": str(out)}
        rows = (_utterances if level == "utterance" else _frames)(reader, picked, reduce)
        _claim(out, fmt, force)
        WRITERS[fmt](out, reader.ids, rows, info)
    return info


def _claim(out: Path, fmt: str, force: bool) -> None:
    """Refuse to overwrite without --force; with it, clear the old output first."""
    taken = out.exists() and (out.is_file() or any(out.iterdir()))
    if taken and not force:
        raise ConfigError(f"{out} already exists; pass --force to overwrite it, or choose another path.")
    if taken and out.is_dir() and fmt == "mertools":
        shutil.rmtree(out)
    elif taken:
        out.unlink()
    (out if fmt == "mertools" else out.parent).mkdir(parents=True, exist_ok=True)


def _utterances(reader: StoreReader, picked: list[int], reduce: str) -> Iterator[np.ndarray]:
    total = None
    for layer in picked:  # one layer of the store in memory at a time
        vectors = reader.pooled(layer=layer).astype(np.float32)
        total = vectors if total is None else total + vectors
    total = total / np.float32(len(picked)) if reduce == "mean" else total
    yield from total


def _frames(reader: StoreReader, picked: list[int], reduce: str) -> Iterator[np.ndarray]:
    """Checks the layers now (before any output is touched), then yields clip by clip."""
    num_layers = int(reader.meta.get("num_layers") or reader.pooled_shape[0])
    stored = [int(k) % num_layers for k in reader.meta.get("layers_frames", [])]
    missing = [k for k in picked if k not in stored]
    if missing:
        raise ConfigError(f"--level frame: layers {missing} have no frame-level states in "
                          f"{reader.path} (it keeps {stored}: params.yaml layers_frames). Add them "
                          f"there and rerun its embed stage, or export --level utterance.")
    index = [stored.index(k) for k in picked]

    def clips() -> Iterator[np.ndarray]:
        for cid in reader.ids:
            # only the picked layers are read (StoreReader.frame_layer), not every kept one
            states = np.stack([reader.frame_layer(cid, k) for k in index]).astype(np.float32)
            yield states.sum(0) if reduce == "sum" else states.mean(0)
    return clips()


def _mertools(out: Path, ids: list[str], rows: Iterator[np.ndarray], info: dict) -> None:
    for cid, row in tqdm(zip(ids, rows), total=len(ids), desc="export mertools", unit="clip"):
        np.save(out / f"{cid}.npy", row)
    (out / "export.json").write_text(json.dumps(info, indent=1))


def _npz(out: Path, ids: list[str], rows: Iterator[np.ndarray], info: dict) -> None:
    """A zip of .npy members written as rows arrive (np.savez needs every array in memory):
    rows go to a scratch file first, as the header of `features` must state its length."""
    tmp, scratch = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".rows")
    offsets, width = [0], 0
    try:
        with open(scratch, "wb") as fh:
            for row in tqdm(rows, total=len(ids), desc="export npz", unit="clip"):
                fh.write(np.ascontiguousarray(row, dtype="<f4").tobytes())
                offsets.append(offsets[-1] + (len(row) if row.ndim == 2 else 1))
                width = row.shape[-1]
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            zf.writestr("ids.npy", _npy_bytes(np.array(ids, dtype=str)))
            zf.writestr("info.npy", _npy_bytes(np.array(json.dumps(info))))
            if info["level"] == "frame":
                zf.writestr("offsets.npy", _npy_bytes(np.array(offsets, dtype=np.int64)))
            with zf.open("features.npy", "w", force_zip64=True) as fh, open(scratch, "rb") as src:
                header = {"descr": "<f4", "fortran_order": False, "shape": (offsets[-1], width)}
                np.lib.format.write_array_header_2_0(fh, header)
                shutil.copyfileobj(src, fh, 1 << 22)
        os.replace(tmp, out)
    finally:
        scratch.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _parquet(out: Path, ids: list[str], rows: Iterator[np.ndarray], info: dict) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("--format parquet needs pyarrow: `pip install pyarrow` (or use --format "
                          "npz).") from None
    tmp = out.with_name(out.name + ".tmp")
    writer = None
    try:
        batch_ids, batch = [], []
        for cid, row in tqdm(zip(ids, rows), total=len(ids), desc="export parquet", unit="clip"):
            batch_ids.append(cid)
            batch.append(row.tolist())
            if len(batch) == 256:
                writer = _parquet_batch(pa, pq, writer, tmp, batch_ids, batch, info)
                batch_ids, batch = [], []
        if batch or writer is None:
            writer = _parquet_batch(pa, pq, writer, tmp, batch_ids, batch, info)
    finally:
        if writer is not None:
            writer.close()
    os.replace(tmp, out)


def _parquet_batch(pa, pq, writer, path: Path, ids: list[str], rows: list, info: dict):
    item = pa.float32() if info["level"] == "utterance" else pa.list_(pa.float32())
    schema = pa.schema([("id", pa.string()), ("feature", pa.list_(item))],
                       metadata={"mer_export": json.dumps(info)})
    table = pa.table({"id": ids, "feature": rows}, schema=schema)
    writer = writer or pq.ParquetWriter(path, schema)
    writer.write_table(table)
    return writer


WRITERS: dict[str, Callable] = {"mertools": _mertools, "npz": _npz, "parquet": _parquet}
