"""The saved alignment map (issue 23): fitted once, reused for added clips, applied to new ones."""
import numpy as np
import pytest

from features.errors import MerError
from features.media.manifest import Clip, write_manifest
from features.storage.store import StoreReader, StoreUpdate
import models.unlabelled.align as align
from models.unlabelled.align import AlignConfig, align_store, apply_saved_map, load_map

N_LAB, N_POOL = 30, 20


def features(n, seed=0, dv=12, da=8):
    """Paired visual [n, 2, dv] and acoustic [n, 1, da] pooled rows sharing a latent."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3))
    v = z @ rng.normal(size=(3, 2 * dv)) + 0.3 * rng.normal(size=(n, 2 * dv)) + 4.0
    a = z @ rng.normal(size=(3, da)) + 0.3 * rng.normal(size=(n, da)) - 1.0
    return v.reshape(n, 2, dv).astype(np.float32), a[:, None].astype(np.float32)


def store(path, ids, rows, fingerprint="w1"):
    meta = {"encoder": path.name, "fingerprint": {"weights": fingerprint}, "store_dtype": "float32"}
    with StoreUpdate(path, "embedding", meta, {c: f"k-{c}" for c in ids}) as up:
        for cid in up.todo:
            up.add(cid, pooled=rows[ids.index(cid)])


def project(root, n_pool=N_POOL, extra=0, fingerprint="w1"):
    """Labelled clips under videos/, `n_pool` pool clips under pool/, then `extra` more pool clips
    (c-numbers continue: earlier clips keep their ids and features)."""
    n = N_LAB + n_pool + extra
    v, a = features(N_LAB + N_POOL + 10)
    (root / "pool").mkdir(exist_ok=True)
    clips = [Clip(f"c{i:03d}", str(root / ("videos" if i < N_LAB else "pool") / f"c{i:03d}.mp4"),
                  1, "x", 1.0, "happy" if i < N_LAB else "", i % 3 if i < N_LAB else -1,
                  "labelled" if i < N_LAB else "unlabelled") for i in range(n)]
    write_manifest(root / "manifest.csv", clips)
    ids = [c.clip_id for c in clips]
    store(root / "features" / "clip", ids, list(v[:n]), fingerprint)
    store(root / "features" / "hubert", ids, list(a[:n]))
    return ids


def run(root, cfg=None):
    return align_store(cfg or AlignConfig(alpha=0.1), root / "manifest.csv", root / "features",
                       str(root / "pool"), root / "features" / "clip_aligned")


def aligned(root, ids, name="features/clip_aligned"):
    with StoreReader(root / name, kind="embedding") as st:
        return st.pooled(0, ids=ids)


@pytest.fixture
def fits(monkeypatch):
    count = []
    real = align.fit_with_holdout
    monkeypatch.setattr(align, "fit_with_holdout", lambda *a: count.append(1) or real(*a))
    return count


def test_added_pool_clips_are_mapped_with_the_saved_map_without_refitting(tmp_path, fits):
    ids = project(tmp_path)
    first = run(tmp_path)
    assert first["refitted"] and first["mapped"] == len(ids) and len(fits) == 1
    assert (tmp_path / "align" / "clip_aligned" / "map.safetensors").is_file()
    before = aligned(tmp_path, ids)
    grown = project(tmp_path, extra=5)  # five new unlabelled clips
    second = run(tmp_path)
    assert len(fits) == 1 and not second["refitted"] and second["mapped"] == 5
    assert second["fit_clips"] == first["fit_clips"] and second["holdout_r2"] == first["holdout_r2"]
    after = aligned(tmp_path, grown)
    assert np.array_equal(after[:len(ids)], before)  # stored vectors never move
    saved = load_map(tmp_path / "align" / "clip_aligned")
    with StoreReader(tmp_path / "features" / "clip") as vs:
        expect = saved(vs.pooled(None, ids=grown[-5:]).astype(np.float32).mean(axis=1))
    np.testing.assert_allclose(after[-5:], expect, rtol=1e-6, atol=1e-6)
    assert run(tmp_path)["mapped"] == 0 and len(fits) == 1  # nothing new: nothing computed


@pytest.mark.parametrize("change", ["alpha", "labelled", "source_weights"])
def test_the_map_is_refitted_when_its_record_changes(tmp_path, fits, change):
    project(tmp_path)
    run(tmp_path)
    cfg = AlignConfig(alpha=0.1)
    if change == "alpha":
        cfg = AlignConfig(alpha=0.2)
    elif change == "labelled":  # a labelled clip's features change (a new key)
        v, _ = features(1, seed=9)
        with StoreUpdate(tmp_path / "features" / "clip", "embedding",
                         StoreReader(tmp_path / "features" / "clip").meta,
                         {**{f"c{i:03d}": f"k-c{i:03d}" for i in range(1, N_LAB + N_POOL)},
                          "c000": "k-new"}) as up:
            up.add("c000", pooled=v[0])
    else:
        project(tmp_path, fingerprint="w2")
    info = run(tmp_path, cfg)
    assert info["refitted"] and len(fits) == 2


def test_a_damaged_map_is_refitted(tmp_path, fits):
    project(tmp_path)
    run(tmp_path)
    path = tmp_path / "align" / "clip_aligned" / "map.safetensors"
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    assert run(tmp_path)["refitted"] and len(fits) == 2


def test_apply_saved_map_gives_a_new_clip_the_stores_vector(tmp_path):
    """`mer predict`'s path: a clip's source features computed elsewhere, mapped with the saved
    map, equal what the aligned store holds for that clip."""
    project(tmp_path)
    run(tmp_path)
    v, _ = features(N_LAB + N_POOL + 10)
    new = tmp_path / "predict" / "features"
    store(new / "clip", ["n1", "c042"], [v[41], v[42]])
    trained = tmp_path / "align" / "clip_aligned"
    cfg = AlignConfig(alpha=0.1)
    info = apply_saved_map(cfg, trained, new, ["n1", "c042"], new / "clip_aligned")
    assert info["mapped"] == 2
    got = aligned(new, ["n1", "c042"], "clip_aligned")
    np.testing.assert_allclose(got, aligned(tmp_path, ["c041", "c042"]), rtol=1e-6, atol=1e-6)
    with StoreReader(new / "clip_aligned") as a, \
            StoreReader(tmp_path / "features" / "clip_aligned") as b:
        assert a.meta["fingerprint"] == b.meta["fingerprint"]  # heads' lineage check passes
    assert apply_saved_map(cfg, trained, new, ["n1"], new / "clip_aligned")["mapped"] == 0
    with pytest.raises(MerError, match="no saved alignment map"):
        apply_saved_map(cfg, tmp_path / "nowhere", new, ["n1"], new / "x")
    with pytest.raises(MerError, match="alpha"):
        apply_saved_map(AlignConfig(alpha=0.3), trained, new, ["n1"], new / "x")
    with pytest.raises(MerError, match="no clip features"):
        apply_saved_map(cfg, trained, new, ["n9"], new / "x")
    other = tmp_path / "other"
    store(other / "clip", ["n1"], [v[41]], fingerprint="w2")
    with pytest.raises(MerError, match="computed differently"):
        apply_saved_map(cfg, trained, other, ["n1"], other / "clip_aligned")


def test_no_pool_fits_on_the_labelled_clips_and_says_so(tmp_path, capsys):
    """Without unlabelled clips the store still holds the labelled clips (heads read it)."""
    ids = project(tmp_path, n_pool=0)
    info = run(tmp_path)
    assert info["fit_clips"] == N_LAB and aligned(tmp_path, ids).shape == (N_LAB, 8)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no unlabelled pool clips" in err
