"""A head's bundle records its encoders' fingerprints; prediction on other features is an error."""
import numpy as np
import pytest

from features.cache.lineage import LineageError, check, record
from features.storage.store import write_store


def _store(path, **fingerprint):
    fp = {"model": "m", "weights": "sha256:1", "dtype": "float32", "pooling": "mean",
          "resolved_path": str(path), "layers_frames": [-1], **fingerprint}
    write_store(path, "embedding", {"fingerprint": fp, "store_dtype": "float16"},
                [("c0", None, None, np.zeros((2, 3), np.float16))])


def test_same_features_pass_and_a_changed_setting_is_named(tmp_path):
    _store(tmp_path / "train/hubert")
    rec = record(tmp_path / "train", ["hubert"])
    _store(tmp_path / "predict/hubert", resolved_path="/elsewhere", layers_frames=[0, -1])
    check(rec, tmp_path / "predict", ["hubert"])  # where the model lies does not matter
    _store(tmp_path / "other/hubert", pooling="attention")
    with pytest.raises(LineageError, match=r"'hubert'.*pooling: trained \"mean\", now \"attention\""):
        check(rec, tmp_path / "other", ["hubert"], head="attention")


def test_weights_code_and_library_versions_count(tmp_path):
    _store(tmp_path / "train/enc", code="a1", packages={"torch": "2.6.0"})
    rec = record(tmp_path / "train", ["enc"])
    _store(tmp_path / "p1/enc", code="a1", packages={"torch": "2.7.0"})
    with pytest.raises(LineageError, match="packages.torch"):
        check(rec, tmp_path / "p1", ["enc"])
    _store(tmp_path / "p2/enc", code="b2", packages={"torch": "2.6.0"})
    with pytest.raises(LineageError, match="code"):
        check(rec, tmp_path / "p2", ["enc"])
    with pytest.raises(LineageError, match="no record of encoder 'other'"):
        _store(tmp_path / "p3/other")
        check(rec, tmp_path / "p3", ["other"])
    check(None, tmp_path / "p3", ["other"])  # a bundle from before records: not checked


def test_mer_predict_runs_offline_like_the_stages(tmp_path, monkeypatch):
    import os

    from stages.cli import main as mer
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    (tmp_path / "params.yaml").write_text("evaluate: {main_head: h}\n")
    assert mer(["predict", "x.mp4", "--params", str(tmp_path / "params.yaml"),
                "--heads", str(tmp_path / "heads")]) == 1  # no trained head: an error, after setup
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
