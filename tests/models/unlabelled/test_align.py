"""Visual-to-acoustic alignment: the ridge map, and the aligned store any head can name."""
import numpy as np
import pytest

from features.errors import ConfigError
from features.media.manifest import Clip, write_manifest
from features.storage.store import StoreReader, StoreUpdate
from models.unlabelled.align import AlignConfig, align_store, fit_ridge, fit_with_holdout, r2


def paired(n, seed=0, dv=24, da=16, noise=0.3):
    """Visual and acoustic vectors that share a 4-d latent, each with its own noise."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    p, q = rng.normal(size=(4, dv)), rng.normal(size=(4, da))
    v = z @ p + noise * rng.normal(size=(n, dv)) + 5.0  # offsets: standardisation matters
    a = z @ q + noise * rng.normal(size=(n, da)) - 2.0
    return v, a


def test_ridge_map_predicts_the_acoustic_vector_of_new_clips():
    v, a = paired(1200)
    amap = fit_ridge(v[:1000], a[:1000], alpha=1e-3)
    assert r2(amap(v[1000:]), a[1000:]) > 0.9
    shuffled = fit_ridge(v[:1000], a[:1000][np.random.default_rng(1).permutation(1000)], 1e-3)
    assert r2(shuffled(v[1000:]), a[1000:]) < 0.05  # no pairing, nothing to learn
    _, held = fit_with_holdout(v, a, 1e-3, seed=0)
    assert held > 0.9


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="align.method"):
        AlignConfig(method="cca")
    with pytest.raises(ConfigError, match="align.alpha"):
        AlignConfig(alpha=0)
    with pytest.raises(ConfigError, match="must differ"):
        AlignConfig(source="hubert", target="hubert")


def write_store(path, ids, pooled):
    with StoreUpdate(path, "embedding", {"encoder": path.name}, {i: f"k{i}" for i in ids}) as up:
        for i, cid in enumerate(ids):
            up.add(cid, pooled=pooled[i][None])


@pytest.mark.parametrize("transductive", [False, True])
def test_aligned_store_from_pool_and_labelled_clips(tmp_path, transductive):
    v, a = paired(90, seed=2)
    (tmp_path / "pool").mkdir()
    clips = [Clip(f"c{i}", str(tmp_path / ("pool" if i >= 60 else "videos") / f"c{i}.mp4"), 1,
                  "x", 1.0, "happy" if i < 40 else "", i % 4 if i < 40 else -1,
                  "labelled" if i < 40 else "unlabelled") for i in range(90)]
    write_manifest(tmp_path / "manifest.csv", clips)  # 40 labelled, 20 test, 30 pool
    ids = [c.clip_id for c in clips]
    write_store(tmp_path / "features" / "clip", ids, v)
    write_store(tmp_path / "features" / "hubert", ids, a)
    cfg = AlignConfig(alpha=1e-3, transductive=transductive)
    info = align_store(cfg, tmp_path / "manifest.csv", tmp_path / "features", str(tmp_path / "pool"),
                       tmp_path / "features" / "clip_aligned")
    assert info["fit_clips"] == (90 if transductive else 70) and info["transductive"] is transductive
    with StoreReader(tmp_path / "features" / "clip_aligned", kind="embedding") as st:
        out = st.pooled(0, ids=ids)
    assert out.shape == (90, 16)
    assert r2(out, a) > 0.8  # test clips too: mapped with a map that never saw them
    info = align_store(AlignConfig(method="none"), tmp_path / "manifest.csv",
                       tmp_path / "features", str(tmp_path / "pool"),
                       tmp_path / "features" / "clip_aligned")
    with StoreReader(tmp_path / "features" / "clip_aligned", kind="embedding") as st:
        assert np.allclose(st.pooled(0, ids=ids), v, atol=1e-5)  # the ablation: raw visual
