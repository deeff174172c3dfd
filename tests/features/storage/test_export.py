"""`mer store export`: MERTools' per-clip .npy layout, npz and parquet, read back and compared
with the sums computed here from what the store holds."""
import json

import numpy as np
import pytest

from features.errors import ConfigError
from features.storage.export import export_store, parse_layers
from features.storage.store import StoreUpdate
from stages.cli import main

L, D = 6, 8  # hidden states (embeddings output + 5 layers), width


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    clips = {f"clip{i}": (rng.standard_normal((L, D)).astype(np.float16),
                          rng.standard_normal((2, int(rng.integers(1, 9)), D)).astype(np.float16))
             for i in range(5)}
    meta = {"encoder": "toy", "num_layers": L, "hidden_size": D, "layers_frames": [-1, 3]}
    path = tmp_path / "store"
    with StoreUpdate(path, "embedding", meta, {cid: f"k{cid}" for cid in clips}) as up:
        for cid in up.todo:
            up.add(cid, clips[cid][1], pooled=clips[cid][0], attrs={"layers": np.array([-1, 3])})
    return path, clips


def test_parse_layers():
    assert parse_layers("last4", 25) == [21, 22, 23, 24]
    assert parse_layers("-1", 25) == [24] and parse_layers("12,13", 25) == [12, 13]
    assert parse_layers("21-24", 25) == [21, 22, 23, 24] and parse_layers("all", 3) == [0, 1, 2]
    for bad in ("last30", "25", "x", "-26"):
        with pytest.raises(ConfigError, match="--layers"):
            parse_layers(bad, 25)


def test_mertools_layout_round_trip(store, tmp_path, capsys):
    path, clips = store
    out = tmp_path / "hubert-last4-UTT"
    assert main(["store", "export", str(path), str(out), "--format", "mertools"]) == 0
    assert "exported 5 clips" in capsys.readouterr().out
    for cid, (pooled, _) in clips.items():
        got = np.load(out / f"{cid}.npy")
        assert got.shape == (D,) and got.dtype == np.float32
        # MERTools: sum of the last four hidden states, mean over frames (= sum of the means).
        np.testing.assert_allclose(got, pooled[-4:].astype(np.float32).sum(0), rtol=1e-6)
    info = json.loads((out / "export.json").read_text())
    assert info["layers"] == [2, 3, 4, 5] and info["reduce"] == "sum"
    # Refuses to overwrite without --force; --force replaces the folder.
    assert main(["store", "export", str(path), str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    (out / "stale.npy").write_bytes(b"")
    assert main(["store", "export", str(path), str(out), "--force", "--reduce", "mean",
                 "--layers=-1,3", "--level", "frame"]) == 0
    assert not (out / "stale.npy").exists()
    for cid, (_, frames) in clips.items():
        got = np.load(out / f"{cid}.npy")
        assert got.shape == frames.shape[1:]
        np.testing.assert_allclose(got, frames.astype(np.float32).mean(0), rtol=1e-6)


def test_npz_round_trip(store, tmp_path):
    path, clips = store
    info = export_store(path, tmp_path / "feats", "npz", layers="last4")
    with np.load(tmp_path / "feats.npz") as data:
        assert list(data["ids"]) == list(clips) and json.loads(str(data["info"])) == info
        want = np.stack([p[-4:].astype(np.float32).sum(0) for p, _ in clips.values()])
        np.testing.assert_allclose(data["features"], want, rtol=1e-6)
    export_store(path, tmp_path / "frames.npz", "npz", layers="3,5", level="frame")
    with np.load(tmp_path / "frames.npz") as data:
        offsets, feats = data["offsets"], data["features"]
        for i, (_, frames) in enumerate(clips.values()):
            np.testing.assert_allclose(feats[offsets[i]:offsets[i + 1]],
                                       frames.astype(np.float32).sum(0), rtol=1e-6)
    with pytest.raises(ConfigError, match="already exists"):
        export_store(path, tmp_path / "feats.npz", "npz")
    with pytest.raises(ConfigError, match=r"layers \[4\] have no frame-level states"):
        export_store(path, tmp_path / "x.npz", "npz", layers="4", level="frame")


def test_parquet_round_trip(store, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    path, clips = store
    export_store(path, tmp_path / "feats.parquet", "parquet", layers="3,5", level="frame")
    table = pq.read_table(tmp_path / "feats.parquet")
    assert table.column("id").to_pylist() == list(clips)
    assert json.loads(table.schema.metadata[b"mer_export"])["layers"] == [3, 5]
    for got, (_, frames) in zip(table.column("feature").to_pylist(), clips.values()):
        np.testing.assert_allclose(np.array(got), frames.astype(np.float32).sum(0), rtol=1e-6)
