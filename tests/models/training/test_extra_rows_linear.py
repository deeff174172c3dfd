"""The pseudo-label join of training (`_extra_rows`) is linear in the extra clips."""
import time

import numpy as np

from features.storage.dataset import FeatureSet
from features.storage.store import StoreReader, write_store
from models.heads import registry
from models.heads.layer_select import plan_head
from models.training.stage import ExtraClips, _extra_rows
from models.training.train_config import CLASSES

SMALL, LARGE = 1000, 4000


def _store(path, n, dim, seed):
    rng = np.random.default_rng(seed)
    pooled = rng.normal(size=(n, 3, dim)).astype(np.float16)
    write_store(path, "embedding", {}, ((f"u{i:05d}", None, None, pooled[i]) for i in range(n)))


def _join(features, cfg, plans, n):
    ids = [f"u{i:05d}" for i in range(n)]
    extra = ExtraClips(ids, [CLASSES[i % len(CLASSES)] for i in range(n)])
    start = time.perf_counter()
    x, labels, _ = _extra_rows(registry.get(cfg.type), cfg, features, plans, extra)
    elapsed = time.perf_counter() - start
    assert all(v.shape[0] == n for v in x.values()) and len(labels) == n
    return elapsed


def test_extra_rows_join_is_linear(tmp_path, monkeypatch):
    _store(tmp_path / "hubert", LARGE, 8, 0)
    _store(tmp_path / "clip", LARGE, 4, 1)
    cfg = registry.head_config({"type": "probe", "features": ["hubert", "clip"], "layer": -1})
    lookups = []
    real = StoreReader.__contains__
    monkeypatch.setattr(StoreReader, "__contains__",
                        lambda self, cid: lookups.append(1) or real(self, cid))
    with FeatureSet(tmp_path) as features:
        plans = plan_head(cfg, features)
        _join(features, cfg, plans, 10)  # warm up: stores opened, imports done
        lookups.clear()
        small = min(_join(features, cfg, plans, SMALL) for _ in range(3))
        assert len(lookups) <= 3 * 2 * SMALL  # one membership test per clip and store (x3 runs)
        large = min(_join(features, cfg, plans, LARGE) for _ in range(3))
    # Quadratic work would take ~16x at 4x the ids; linear ~4x (best of three: a loaded machine)
    assert large / small <= 5.0, (small, large)
