"""Trained feature transforms keep their weights (models/adapt/lora_stage.py, joint_stage.py).

adapt@ and joint@ save each fold's trained tensors (safetensors) with a record of what they were
trained on; a rerun with the same record loads them and featurises only the clips its store lacks;
`apply_saved` featurises new clips (`mer predict`) with them. One tiny random Llama store (made by
the embed stage) and a synthetic speech store; the manifest grows by unlabelled clips.
"""
import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from features import testing  # noqa: E402
from features.cache import versions  # noqa: E402
from features.embedding.stage import embed_store  # noqa: E402
from features.encoders import EncoderConfig, load_encoder  # noqa: E402
from features.errors import MerError  # noqa: E402
from features.media.manifest import Clip, write_manifest  # noqa: E402
from features.reliability.reports import write_json_atomic  # noqa: E402
from features.storage.store import StoreReader, StoreUpdate, write_store  # noqa: E402
from models.adapt import joint_stage, lora, lora_stage  # noqa: E402
from models.adapt.joint_llm import JointConfig  # noqa: E402
from models.training.train_config import CLASSES  # noqa: E402

WORDS = "i am so happy sad angry today you are not very good bad the a day".split()
N = 14  # c00..c08 labelled (3 folds), c09.. unlabelled; the first manifest stops at c11
FIRST = 12
ADAPT = lora.AdaptConfig(encoder="llm", layers=[1, 2], rank=2, epochs=2, batch_size=4)
JOINT = JointConfig(speech="speech", llm="llm", layers=[1, 2], audio_tokens=2, projector_hidden=8,
                    rank=2, epochs=2, batch_size=4)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: no OpenMP spin-waits on a busy machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Base stores of all N clips: features/llm (embed stage, frames of hidden state 0) and
    features/speech (synthetic frames)."""
    root = tmp_path_factory.mktemp("saved")
    rng = np.random.default_rng(0)
    ids = [f"c{i:02d}" for i in range(N)]
    write_json_atomic(root / "transcripts.json", {"asr": {}, "transcripts": {
        cid: {"text": " ".join(rng.choice(WORDS, 3 + i % 4)), "source": "csv", "key": f"k-{cid}"}
        for i, cid in enumerate(ids)}})
    llm_cfg = EncoderConfig(family="text", model=testing.tiny_llama(root / "llama", WORDS), layers_frames=[0])
    embed_store("llm", llm_cfg, root / "transcripts.json", root / "features/llm", workers=0)
    write_store(root / "features/speech", "embedding",
                {"encoder": "speech", "layers_frames": [-1], "fingerprint": {"weights": "w"}},
                [(cid, rng.standard_normal((1, 5 + i % 4, 8)).astype(np.float16), None,
                  rng.standard_normal((2, 8)).astype(np.float16)) for i, cid in enumerate(ids)])
    return root, llm_cfg


def manifest(path, n: int = FIRST, relabel: dict | None = None):
    clips = [Clip(f"c{i:02d}", f"c{i:02d}.mp4", 1, f"c{i:02d}", 1.0, CLASSES[i % 2] if i < 9 else "",
                  i % 3 if i < 9 else -1, "labelled" if i < 9 else "unlabelled") for i in range(n)]
    for cid, label in (relabel or {}).items():
        clips = [Clip(**{**c.__dict__, "label": label}) if c.clip_id == cid else c for c in clips]
    write_manifest(path, clips)
    return path


@pytest.fixture()
def project(tmp_path, base):
    root, llm_cfg = base
    shutil.copytree(root / "features", tmp_path / "features")
    manifest(tmp_path / "manifest.csv")
    return tmp_path, llm_cfg


def run(kind: str, root, llm_cfg, cfg=None, manifest_name: str = "manifest.csv") -> dict:
    if kind == "adapt":
        return lora_stage.adapt_store("llm_lora", cfg or ADAPT, llm_cfg, root / manifest_name,
                                      root / "features", root / "probe", root / "adapt/llm_lora")
    return joint_stage.joint_store("joint", cfg or JOINT, llm_cfg, root / manifest_name, root / "features",
                                   root / "joint/joint")


STORE = {"adapt": "llm_lora", "joint": "joint"}
TRAINED = {"adapt": "adapt/llm_lora/trained", "joint": "joint/joint/trained"}


def pooled(store, ids) -> np.ndarray:
    with StoreReader(store) as reader:
        return reader.pooled(ids=list(ids)).astype(np.float32)


def copy_clip(src, dst, cid: str, new_id: str) -> None:
    """`dst`: a store holding only `src`'s clip `cid`, under `new_id`, with `src`'s meta."""
    with StoreReader(src) as reader:
        array, vec = reader.get(cid), reader.pooled(ids=[cid])[0]
        with StoreUpdate(dst, "embedding", reader.meta, {new_id: f"new-{cid}"}) as up:
            up.add(new_id, array, pooled=vec)


def count_training(monkeypatch) -> list:
    calls = []
    real = lora.train_adapter

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(lora, "train_adapter", counted)
    return calls


# ----------------------------------------------------------------------------- apply only
@pytest.mark.parametrize("kind", ["adapt", "joint"])
def test_a_new_clip_gets_what_the_store_holds_for_an_unlabelled_clip(kind, project, tmp_path):
    root, llm_cfg = project
    run(kind, root, llm_cfg)
    sources = ["llm"] if kind == "adapt" else ["speech", "llm"]
    for source in sources:  # the new videos' base stores: an unlabelled clip's inputs, a new id
        copy_clip(root / "features" / source, tmp_path / "new" / source, "c10", "fresh")
    module = lora_stage if kind == "adapt" else joint_stage
    cfg = ADAPT if kind == "adapt" else JOINT
    out = module.apply_saved(STORE[kind], cfg, root / TRAINED[kind], tmp_path / "new", ["fresh"],
                             tmp_path / "out")
    np.testing.assert_allclose(pooled(out, ["fresh"]), pooled(root / "features" / STORE[kind], ["c10"]),
                               rtol=1e-3, atol=1e-3)
    with StoreReader(out) as reader, StoreReader(root / "features" / STORE[kind]) as stage:
        assert reader.ids == ["fresh"] and reader.meta == stage.meta  # heads see the same lineage


def test_apply_refuses_other_base_stores_settings_and_missing_weights(project, tmp_path):
    root, llm_cfg = project
    run("adapt", root, llm_cfg)
    trained = root / TRAINED["adapt"]
    copy_clip(root / "features/llm", tmp_path / "new/llm", "c10", "fresh")
    apply = lambda cfg=ADAPT, folder=trained, ids=("fresh",): lora_stage.apply_saved(  # noqa: E731
        "llm_lora", cfg, folder, tmp_path / "new", list(ids), tmp_path / "out")
    with pytest.raises(MerError, match=r"\['epochs'\] differ.*dvc repro adapt@llm_lora"):
        apply(cfg=lora.AdaptConfig(**{**ADAPT.__dict__, "epochs": 3}))
    with pytest.raises(MerError, match=r"no saved fold weights in .*dvc repro adapt@llm_lora"):
        apply(folder=tmp_path / "nothing")
    with pytest.raises(MerError, match=r"not in store .*'ghost'"):
        apply(ids=("fresh", "ghost"))
    index = tmp_path / "new/llm/store.json"
    info = json.loads(index.read_text())
    info["meta"]["fingerprint"]["weights"] = "sha256:other"
    index.write_text(json.dumps(info))
    with pytest.raises(MerError, match=r"store .*new/llm was made with other \['weights'\].*embed.encoders.llm"):
        apply()
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- retraining
@pytest.mark.parametrize("kind", ["adapt", "joint"])
def test_added_unlabelled_clips_are_the_only_work_and_nothing_retrains(kind, project, monkeypatch):
    root, llm_cfg = project
    first = run(kind, root, llm_cfg)
    store = root / "features" / STORE[kind]
    old_ids = [f"c{i:02d}" for i in range(FIRST)]
    before = pooled(store, old_ids)

    def refuse(*args, **kwargs):
        raise AssertionError("a fold model was trained again")

    monkeypatch.setattr(lora, "train_adapter", refuse)
    manifest(root / "manifest.csv", N)
    report = run(kind, root, llm_cfg)
    assert report["featurised"] == N - FIRST and report["fold_models"].startswith("loaded")
    assert report["loss_per_fold"] == first["loss_per_fold"] and report["clips"] == N
    np.testing.assert_array_equal(pooled(store, old_ids), before)
    if kind == "adapt":  # the saved weights give what one in-memory run over every clip gives
        monkeypatch.undo()
        expected = in_memory_adapt(root, llm_cfg)
        new = [f"c{i:02d}" for i in range(FIRST, N)]
        np.testing.assert_allclose(pooled(store, new), np.stack([expected[c] for c in new]),
                                   rtol=2e-3, atol=2e-3)


def in_memory_adapt(root, llm_cfg) -> dict:
    """`adapt_features` (train and featurise every clip at once) on the stage's inputs."""
    encoder = load_encoder(lora_stage.base_config(llm_cfg, "float32", torch.device("cpu")))
    base = lora_stage.base_model(encoder)
    ids, labels, folds = lora_stage.labelled_clips(root / "manifest.csv", [f"c{i:02d}" for i in range(N)])
    with StoreReader(root / "features/llm") as reader:
        frames = {cid: reader.get(cid)[0] for cid in ids}
    result = lora.adapt_features(lora.layer_stack(base), base, 1, 2, ADAPT, frames, labels, folds,
                                 torch.device("cpu"))
    return result.pooled


@pytest.mark.parametrize("change", ["setting", "code", "label"])
@pytest.mark.parametrize("kind", ["adapt", "joint"])
def test_a_changed_training_record_retrains(kind, change, project, monkeypatch):
    root, llm_cfg = project
    run(kind, root, llm_cfg)
    digest = json.loads((root / TRAINED[kind] / "record.json").read_text())["digest"]
    calls = count_training(monkeypatch)
    cfg = None
    if change == "setting":
        cfg = (lora.AdaptConfig(**{**ADAPT.__dict__, "lr": 2e-3}) if kind == "adapt"
               else JointConfig(**{**JOINT.__dict__, "lr": 2e-3}))
    elif change == "code":  # an edit to the trainer's code (or a library upgrade)
        real = versions.fingerprint
        monkeypatch.setattr(versions, "fingerprint", lambda stage: {**real(stage), "code": "edited"})
    else:
        manifest(root / "manifest.csv", relabel={"c04": CLASSES[2]})
    report = run(kind, root, llm_cfg, cfg)
    assert len(calls) == 3 and report["fold_models"].startswith("trained now")
    assert report["featurised"] == FIRST  # other weights: every clip again
    assert json.loads((root / TRAINED[kind] / "record.json").read_text())["digest"] != digest


def test_deleted_weights_are_trained_again_and_equal_weights_keep_the_store(project, monkeypatch):
    root, llm_cfg = project
    run("adapt", root, llm_cfg)
    record = json.loads((root / TRAINED["adapt"] / "record.json").read_text())
    shutil.rmtree(root / TRAINED["adapt"])
    calls = count_training(monkeypatch)
    report = run("adapt", root, llm_cfg)
    assert len(calls) == 3
    again = json.loads((root / TRAINED["adapt"] / "record.json").read_text())
    # CPU training is reproducible: the same weights, so the store's clips (keyed by them) stay
    assert again["weights"] == record["weights"] and report["featurised"] == 0


# ----------------------------------------------------------------------------- the saved files
@pytest.mark.parametrize("kind", ["adapt", "joint"])
def test_saved_files_are_safetensors_of_the_trained_tensors_and_the_record_names_the_digest(kind, project):
    root, llm_cfg = project
    report = run(kind, root, llm_cfg)
    folder = root / TRAINED[kind]
    record = json.loads((folder / "record.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == [
        "fold-0.safetensors", "fold-1.safetensors", "fold-2.safetensors", "record.json"]
    own = ("classifier.",) if kind == "adapt" else ("classifier.", "projector.")
    for k in (0, 1, 2):
        with safe_open(str(folder / record["files"][str(k)]["file"]), framework="pt") as f:
            names = list(f.keys())
            count = sum(f.get_tensor(n).numel() for n in names)
        assert names and all("lora_" in n or n.startswith(own) for n in names)  # no base weights
        assert count == report["trainable"]
    with StoreReader(root / "features" / STORE[kind]) as store:
        assert record["digest"] == store.meta["fingerprint"][kind]
        assert record["weights"] == store.meta["weights_digest"]
    assert record["stage"] == kind and record["folds"] == [0, 1, 2] and record["training"]["labelled"] == 9
    assert record["code"] == json.loads(json.dumps(versions.fingerprint(kind)))


def test_a_run_killed_while_featurising_resumes_without_training(project, monkeypatch):
    root, llm_cfg = project
    real = lora_stage.write_features

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed after training")

    monkeypatch.setattr(lora_stage, "write_features", killed)
    with pytest.raises(KeyboardInterrupt):
        run("adapt", root, llm_cfg)
    monkeypatch.setattr(lora_stage, "write_features", real)
    calls = count_training(monkeypatch)
    report = run("adapt", root, llm_cfg)
    assert not calls and report["featurised"] == FIRST and report["loss_per_fold"]
