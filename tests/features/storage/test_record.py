"""StoreRecord (features/storage/record.py): the typed meta behind every embedding store.

The four writers (embed, adapt@, joint@, align) run on one tiny random Llama store, a synthetic
speech store and a small manifest; each store's meta must read back as a record of the right
producer with a top-level code_version, and keep the keys its readers use.
"""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import features.encoders  # noqa: E402
from features import testing  # noqa: E402
from features.embedding.stage import embed_store  # noqa: E402
from features.cache import versions  # noqa: E402
from features.encoders import EncoderConfig  # noqa: E402
from features.media.manifest import Clip, write_manifest  # noqa: E402
from features.reliability.reports import write_json_atomic  # noqa: E402
from features.storage.record import RecordError, StoreRecord  # noqa: E402
from features.storage.store import INDEX, StoreReader, write_store  # noqa: E402
from models.adapt import lora  # noqa: E402
from models.adapt.joint_llm import JointConfig  # noqa: E402
from models.adapt.joint_stage import joint_store  # noqa: E402
from models.adapt.lora_stage import adapt_store  # noqa: E402
from models.training.train_config import CLASSES  # noqa: E402
from models.unlabelled.align import AlignConfig, align_store  # noqa: E402

WORDS = "i am so happy sad angry today you are not very good bad the a day".split()
N = 8  # clips: 6 labelled in 3 folds, 2 unlabelled


def _record(**changes) -> StoreRecord:
    base = dict(producer="encoder", name="hubert", family="speech", layers_pooled=range(3),
                layers_frames=[-1], hidden_size=4, store_dtype="float16",
                fingerprint={"weights": "abc", "layers_frames": (-1,)}, code_version="encoders-3",
                extra={"sources": "src:1", "compression": None, "shard_mb": 1024.0})
    return StoreRecord(**{**base, **changes})


def test_round_trip_through_json():
    rec = _record()
    meta = json.loads(json.dumps(rec.to_meta()))  # what store.json gives back
    assert StoreRecord.from_meta(meta) == rec
    assert meta["num_layers"] == 3 and meta["layers_pooled"] == [0, 1, 2]
    assert meta["encoder"] == "hubert" and meta["code_version"] == "encoders-3"
    assert meta["sources"] == "src:1" and meta["fingerprint"]["layers_frames"] == [-1]
    meta["fingerprint"]["weights"] = "changed"  # to_meta hands out copies
    assert rec.fingerprint["weights"] == "abc"


def test_bad_records_and_old_metas_are_refused():
    with pytest.raises(RecordError, match="producer"):
        _record(producer="model")
    with pytest.raises(RecordError, match=r"\['num_layers'\]"):
        _record(extra={"num_layers": 2})
    with pytest.raises(RecordError, match="lacks"):
        StoreRecord.from_meta({"encoder": "x", "num_layers": 2})  # written before records
    with pytest.raises(RecordError, match="num_layers=2"):
        StoreRecord.from_meta({**_record().to_meta(), "num_layers": 2})


# ----------------------------------------------------------------------------- the four writers
@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: no OpenMP spin-waits on a busy machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """features/llm (embed stage, frames of hidden state 0), features/speech (synthetic), manifest."""
    root = tmp_path_factory.mktemp("record")
    rng = np.random.default_rng(0)
    ids = [f"c{i}" for i in range(N)]
    texts = {cid: " ".join(rng.choice(WORDS, 3 + i % 3)) for i, cid in enumerate(ids)}
    write_json_atomic(root / "transcripts.json", {"asr": {}, "transcripts": {
        cid: {"text": t, "source": "csv", "key": f"k-{cid}"} for cid, t in texts.items()}})
    llm_cfg = EncoderConfig(family="text", model=testing.tiny_llama(root / "llama", WORDS),
                            layers_frames=[0])
    embed_store("llm", llm_cfg, root / "transcripts.json", root / "features/llm", workers=0)
    write_store(root / "features/speech", "embedding",
                {"encoder": "speech", "layers_frames": [-1], "fingerprint": {"weights": "w"}},
                [(cid, rng.standard_normal((1, 6 + i, 8)).astype(np.float16), None,
                  rng.standard_normal((2, 8)).astype(np.float16)) for i, cid in enumerate(ids)])
    write_manifest(root / "manifest.csv", [
        Clip(cid, f"{cid}.mp4", 1, cid, 1.0, CLASSES[i % 2] if i < 6 else "", i % 3 if i < 6 else -1,
             "labelled" if i < 6 else "unlabelled") for i, cid in enumerate(ids)])
    return root, llm_cfg


def _read(path) -> tuple[StoreRecord, dict, tuple]:
    with StoreReader(path, kind="embedding") as store:
        return StoreRecord.from_meta(store.meta), store.meta, store.pooled_shape


def test_embed_store_meta_is_an_encoder_record(project):
    root, _ = project
    rec, meta, (layers, clips, dim) = _read(root / "features/llm")
    assert (rec.producer, rec.name, rec.family) == ("encoder", "llm", "text")
    assert rec.code_version == versions.module_version("features.encoders.text") == meta["fingerprint"]["code_version"]
    assert rec.layers_pooled == tuple(range(layers)) and rec.hidden_size == dim == 32
    assert rec.layers_frames == (0,) and meta["sources"].startswith("src:") and clips == N


def test_cached_embed_rerun_rebuilds_the_record_without_loading(project, monkeypatch):
    """A store written before records (no producer, family, layers_pooled, code_version) gets
    them on a fully cached rerun, from its remembered fingerprint: no model load, same keys."""
    root, llm_cfg = project
    store = root / "features/llm"
    index = json.loads((store / INDEX).read_text())
    written = index["meta"]
    index["meta"] = {k: v for k, v in written.items()
                     if k not in ("producer", "family", "layers_pooled", "code_version")}
    (store / INDEX).write_text(json.dumps(index))
    with StoreReader(store) as s:
        keys = dict(s.keys)

    def refuse(cfg):
        raise AssertionError("a model was loaded although every clip is cached")

    monkeypatch.setattr(features.encoders, "load_encoder", refuse)
    embed_store("llm", llm_cfg, root / "transcripts.json", store, workers=0)
    with StoreReader(store) as s:
        assert s.meta == written and dict(s.keys) == keys


def test_adapt_store_meta_is_a_transform_record(project):
    root, llm_cfg = project
    cfg = lora.AdaptConfig(encoder="llm", layers=[1, 2], rank=2, epochs=1, batch_size=4)
    adapt_store("llm_lora", cfg, llm_cfg, root / "manifest.csv", root / "features", root / "probe",
                root / "adapt/llm_lora")
    rec, meta, (layers, clips, _) = _read(root / "features/llm_lora")
    assert (rec.producer, rec.name, rec.family) == ("transform", "llm_lora", "adapt")
    assert rec.code_version == versions.code_version("adapt") and set(rec.fingerprint) == {"base", "adapt"}
    assert rec.layers_pooled == (1, 2) == tuple(meta["adapted_layers"]) and layers == 2
    assert meta["source"] == "llm" and meta["prefix_layer"] == 0 and clips == N


def test_joint_store_meta_is_a_transform_record(project):
    root, llm_cfg = project
    cfg = JointConfig(speech="speech", llm="llm", layers=[1, 2], audio_tokens=2, projector_hidden=8,
                      rank=2, epochs=1, batch_size=4)
    joint_store("joint", cfg, llm_cfg, root / "manifest.csv", root / "features", root / "joint")
    rec, meta, (layers, clips, _) = _read(root / "features/joint")
    assert (rec.producer, rec.name, rec.family) == ("transform", "joint", "joint")
    assert rec.code_version == versions.code_version("joint") and set(rec.fingerprint) == {"llm", "speech", "joint"}
    assert rec.layers_pooled == (1, 2) and layers == 2 and clips == N
    assert meta["sources"] == ["speech", "llm"] and meta["layers_frames"] == []


def test_aligned_store_meta_is_a_transform_record(project):
    root, _ = project
    cfg = AlignConfig(name="aligned", source="llm", target="speech", alpha=1e-2)
    align_store(cfg, root / "manifest.csv", root / "features", str(root / "pool"),
                root / "features/aligned")
    rec, meta, (layers, clips, dim) = _read(root / "features/aligned")
    assert (rec.producer, rec.name, rec.family) == ("transform", "aligned", "align")
    assert rec.code_version == versions.code_version("align")  # in its clip keys too
    assert rec.layers_pooled == (0,) and meta["num_layers"] == layers == 1
    assert rec.hidden_size == dim == 8 and clips == N
