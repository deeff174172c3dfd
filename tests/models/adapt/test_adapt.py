"""LoRA adapters trained from cached prefix states (models/adapt/lora.py, the adapt@ stage).

Tiny random HuBERT / Llama models saved to tmp folders and loaded through load_encoder, as users do.
"""

import copy
import hashlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402
from transformers import (  # noqa: E402
    HubertConfig,
    HubertModel,
    Wav2Vec2FeatureExtractor,
)

from features.storage.dataset import FeatureSet  # noqa: E402
from features.encoders import EncoderConfig, load_encoder  # noqa: E402
from features import testing  # noqa: E402
from features.errors import ConfigError, ModelLoadError  # noqa: E402
from features.media.manifest import Clip, write_manifest  # noqa: E402
from features.storage.store import StoreReader, StoreUpdate, clip_key  # noqa: E402
from models.adapt.lora import (  # noqa: E402
    Adapter,
    AdaptConfig,
    adapt_features,
    DEFAULT_TARGETS,
    adapted_features,
    class_weights,
    count_parameters,
    layer_stack,
    pad,
    pool,
    train_adapter,
)
from models.adapt.lora_stage import adapt_store, base_model  # noqa: E402
from models.training.train_config import CLASSES  # noqa: E402

WORDS = "i am so happy sad angry today you are not very good bad the a day".split()


def tiny_hubert(folder, layers=4, seed=0):
    torch.manual_seed(seed)
    config = HubertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                          conv_dim=(16, 16), conv_kernel=(10, 4), conv_stride=(5, 4), feat_extract_norm="layer",
                          do_stable_layer_norm=True, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    HubertModel(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(folder)
    return str(folder)


def tiny_llama(folder):
    return testing.tiny_llama(folder, WORDS)


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread avoids OpenMP spin-waits on a busy 2-core machine (15x here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hubert(tmp_path_factory):
    return tiny_hubert(tmp_path_factory.mktemp("hubert") / "m")


# ----------------------------------------------------------------------------- equivalence
def full_model_losses(model, inputs, y, first, last, adapter, cfg, kind):
    """Reference: LoRA inside the whole model (same init), every layer run on every step."""
    full = copy.deepcopy(model).train(False)
    full.requires_grad_(False)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=DEFAULT_TARGETS[adapter.stack.kind],
                      layers_to_transform=list(range(first - 1, last)), layers_pattern="layers")
    inject_adapter_in_model(lora, full)
    state = {}
    for name, tensor in adapter.blocks.state_dict().items():  # block j of the adapter = layer first-1+j
        if "lora_" in name:
            j, rest = name.split(".", 1)
            state[f"{int(j) + first - 1}.{rest}"] = tensor
    layers = full.encoder.layers if kind == "hubert" else full.layers
    layers.load_state_dict(state, strict=False)
    classifier = copy.deepcopy(adapter.classifier)
    params = [p for n, p in full.named_parameters() if "lora_" in n] + list(classifier.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss(weight=class_weights(y, len(CLASSES)))
    rng, losses = np.random.default_rng(cfg.seed), []
    for _ in range(cfg.epochs):
        order, total = rng.permutation(len(inputs)), 0.0
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start:start + cfg.batch_size]
            batch = torch.stack([inputs[r] for r in rows])
            key = "input_values" if kind == "hubert" else "input_ids"
            h = full(**{key: batch}, output_hidden_states=True).hidden_states[last]
            mask = torch.ones(h.shape[:2], dtype=torch.bool)
            loss = loss_fn(classifier(pool(h, mask, cfg.pooling)), torch.from_numpy(y[rows]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(rows)
        losses.append(total / len(inputs))
    return losses


@pytest.mark.parametrize("kind", ["hubert", "llama"])
def test_cached_prefix_training_matches_the_whole_model(kind, tmp_path, hubert):
    if kind == "hubert":
        enc = load_encoder(EncoderConfig(family="speech", model=hubert, layers_frames=[1]))
        rng = np.random.default_rng(0)
        waves = [rng.standard_normal(1200).astype(np.float32) for _ in range(8)]
        inputs = [torch.from_numpy(enc.prepare(w)[0].data) for w in waves]  # equal lengths: no padding
        frames = [c.frames[0] for c in enc.encode(waves)]
        first, last, cfg_pool = 2, 4, "mean"
    else:
        enc = load_encoder(EncoderConfig(family="text", model=tiny_llama(tmp_path / "llama"),
                                         layers_frames=[1], pooling="last"))
        texts = [" ".join(np.random.default_rng(i).choice(WORDS, 5)) for i in range(8)]
        inputs = [torch.tensor(enc.tokenizer(t)["input_ids"]) for t in texts]
        assert len({len(i) for i in inputs}) == 1
        frames = [c.frames[0] for c in enc.encode(texts)]
        first, last, cfg_pool = 2, 3, "last"
    model = base_model(enc)
    before = digest(model)
    y = np.arange(8) % 3
    cfg = AdaptConfig(encoder="x", layers=[first, last], rank=2, epochs=3, lr=5e-3, batch_size=4, pooling=cfg_pool)
    stack = layer_stack(model)
    torch.manual_seed(0)
    adapter = Adapter(stack, first, last, cfg, len(CLASSES))
    reference = full_model_losses(model, inputs, y, first, last, adapter, cfg, kind)
    losses = train_adapter(adapter, frames, y, cfg, torch.device("cpu"), cfg.seed)
    np.testing.assert_allclose(losses, reference, rtol=1e-4, atol=1e-5)
    assert losses[-1] < losses[0]  # it learns (the comparison is not between two flat lines)
    assert digest(model) == before  # the base never changed


def test_only_lora_and_classifier_train(hubert):
    enc = load_encoder(EncoderConfig(family="speech", model=hubert, layers_frames=[2]))
    stack = layer_stack(enc.model)
    cfg = AdaptConfig(encoder="x", layers=[3, 4], rank=2, epochs=2, lr=1e-2, batch_size=4)
    adapter = Adapter(stack, 3, 4, cfg, len(CLASSES))
    frozen = {n: p.detach().clone() for n, p in adapter.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in adapter.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("classifier.") for n in trainable)
    base_before = digest(enc.model)
    frames = [c.frames[0] for c in enc.encode([np.random.default_rng(i).standard_normal(2400).astype(np.float32)
                                               for i in range(8)])]
    train_adapter(adapter, frames, np.arange(8) % 2, cfg, torch.device("cpu"), 0)
    assert all(torch.equal(p, frozen[n]) for n, p in adapter.named_parameters() if n in frozen)
    assert digest(enc.model) == base_before
    lora = [p for n, p in adapter.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora)  # B starts at zero: it moved
    counts = count_parameters(enc.model, adapter)
    assert 0 < counts["trainable_share"] < 0.2 and counts["trainable"] == sum(
        p.numel() for p in adapter.parameters() if p.requires_grad)


@pytest.mark.slow
def test_out_of_fold_features_never_come_from_an_adapter_that_trained_on_the_clip(hubert):
    """Planted memorisation: random labels on distinct random clips. Adapters fit their own
    training clips almost perfectly; the features and scores a clip gets must be held-out ones."""
    enc = load_encoder(EncoderConfig(family="speech", model=hubert, layers_frames=[2]))
    stack = layer_stack(enc.model)
    rng = np.random.default_rng(1)
    n = 30
    frames = {f"c{i}": rng.standard_normal((6, 32)).astype(np.float32) * 3 for i in range(n + 4)}
    labels = {f"c{i}": int(rng.integers(0, 2)) for i in range(n)}
    folds = {f"c{i}": i % 3 for i in range(n)}
    cfg = AdaptConfig(encoder="x", layers=[3, 4], rank=8, epochs=60, lr=3e-2, batch_size=8)
    seen: list[tuple[Adapter, set]] = []

    def make():
        adapter = Adapter(stack, 3, 4, cfg, len(CLASSES))
        seen.append((adapter, set()))
        return adapter

    result = adapt_features(stack, enc.model, 3, 4, cfg, frames, labels, folds, torch.device("cpu"), make)
    assert len(seen) == 3
    for k, (adapter, _) in enumerate(seen):
        train = [c for c in labels if folds[c] != k]
        _, _, probs = adapted_features(adapter, [frames[c] for c in train], cfg, torch.device("cpu"))
        in_sample = (probs.argmax(1) == np.array([labels[c] for c in train])).mean()
        assert in_sample > 0.9  # it memorised its training clips
    oof = np.mean([result.oof_probs[c].argmax() == labels[c] for c in labels])
    assert oof < 0.75  # held out: no memorised answer leaks into a clip's own features
    assert all(result.source[c] == [folds[c]] for c in labels)
    assert all(result.source[f"c{i}"] == [0, 1, 2] for i in range(n, n + 4))
    # a labelled clip's stored vector is exactly its own fold adapter's output
    for c in list(labels)[:3]:
        own, _, _ = adapted_features(seen[folds[c]][0], [frames[c]], cfg, torch.device("cpu"))
        np.testing.assert_allclose(result.pooled[c], own[0], atol=1e-5)


# ----------------------------------------------------------------------------- the stage
def embed_like(enc, waves, path, name="hubert"):
    """The store the embed stage writes (prefix frames + pooled, the encoder's fingerprint)."""
    fp = enc.fingerprint()
    meta = {"encoder": name, "fingerprint": fp, "layers_frames": enc.cfg.layers_frames,
            "num_layers": enc.num_layers, "hidden_size": enc.hidden_size, "store_dtype": "float16"}
    wanted = {cid: clip_key("embed", cid, "test") for cid in waves}
    with StoreUpdate(path, "embedding", meta, wanted) as up:
        for cid, clip in zip(waves, enc.encode(list(waves.values()))):
            up.add(cid, clip.frames.astype(np.float16), pooled=clip.pooled.astype(np.float16))


@pytest.fixture()
def project(tmp_path, hubert):
    rng = np.random.default_rng(0)
    waves = {f"s{i:02d}": (rng.standard_normal(1600 + 160 * (i % 3)) * (1 + (i % 2))).astype(np.float32)
             for i in range(14)}
    clips = [Clip(cid, f"{cid}.mp4", 1, cid, 1.0, CLASSES[i % 2] if i < 12 else "", i % 3 if i < 12 else -1,
                  "labelled" if i < 12 else "unlabelled") for i, cid in enumerate(waves)]
    write_manifest(tmp_path / "manifest.csv", clips)
    enc_cfg = EncoderConfig(family="speech", model=hubert, layers_frames=[2, -1])
    embed_like(load_encoder(enc_cfg), waves, tmp_path / "features/hubert")
    return tmp_path, enc_cfg


def test_adapt_stage_writes_a_store_heads_can_read_and_reuses_it(project):
    root, enc_cfg = project
    cfg = AdaptConfig(encoder="hubert", layers=[3, 4], rank=2, epochs=2, batch_size=4, write_frames=True)
    args = ("hubert_lora", cfg, enc_cfg, root / "manifest.csv", root / "features", root / "probe",
            root / "adapt/hubert_lora")
    report = adapt_store(*args)
    assert report["labelled"] == 12 and report["clips"] == 14 and 0 < report["trainable_share"] < 1
    assert len(report["loss_per_fold"]) == 3 and report["adapted_layers"] == [3, 4]
    with FeatureSet(root / "features") as fs:
        assert fs.n_layers("hubert_lora") == 2 and fs.dim("hubert_lora") == 32
        assert fs.pooled("hubert_lora", -1).shape == (14, 32)
        assert fs.frames("hubert_lora", ["s00"], -1)[0].shape[1] == 32
    stamp = (root / "features/hubert_lora/store.json").read_text()
    again = adapt_store(*args)  # nothing changed: every clip cached, no training
    assert again == report and (root / "features/hubert_lora/store.json").read_text() == stamp


def test_missing_prefix_frames_name_the_layers_frames_entry(project):
    root, enc_cfg = project
    cfg = AdaptConfig(encoder="hubert", layers=[2, 4])  # needs hidden state 1 at frame level
    with pytest.raises(ConfigError, match=r"Add 1 to embed.encoders.hubert.layers_frames"):
        adapt_store("a", cfg, enc_cfg, root / "manifest.csv", root / "features", root / "probe", root / "o")


def test_changed_base_weights_are_refused(project, tmp_path):
    root, enc_cfg = project
    other = tiny_hubert(tmp_path / "other", seed=5)  # same architecture, other weights
    cfg = AdaptConfig(encoder="hubert", layers=[3, 4])
    moved = EncoderConfig(family="speech", model=other, layers_frames=[2, -1])
    with pytest.raises(ModelLoadError, match=r"\['weights'\] differ"):
        adapt_store("a", cfg, moved, root / "manifest.csv", root / "features", root / "probe", root / "o")


def test_lora_targets_matching_nothing_list_the_module_names(hubert):
    enc = load_encoder(EncoderConfig(family="speech", model=hubert, layers_frames=[2]))
    cfg = AdaptConfig(encoder="x", layers=[3, 4], target_modules=["query_key_value"])
    with pytest.raises(ConfigError, match=r"query_key_value.*named \[.*q_proj"):
        Adapter(layer_stack(enc.model), 3, 4, cfg, len(CLASSES))


def test_best_layer_from_the_probe_and_padding_is_masked(project):
    from models.adapt.lora import resolve_layers

    assert resolve_layers(AdaptConfig(encoder="x", layers="best", span=2), 5, 4) == (3, 4)
    assert resolve_layers(AdaptConfig(encoder="x", layers="best", span=3), 5, 1) == (1, 1)
    with pytest.raises(ConfigError, match="best.json"):
        resolve_layers(AdaptConfig(encoder="x", layers="best"), 5, None)
    x, mask = pad([np.ones((2, 3), np.float32), np.ones((4, 3), np.float32)], torch.device("cpu"))
    assert x.shape == (2, 4, 3) and mask.sum().item() == 6
    assert torch.allclose(pool(x, mask, "mean"), torch.ones(2, 3))


@pytest.mark.parametrize("profile", ["params.yaml", "params.mer2024.yaml"])
def test_profiles_adapt_and_joint_entries_build_and_keep_their_prefix_frames(profile):
    """Every adapt/joint entry parses strictly and its prefix layer is kept at frame level."""
    from pathlib import Path

    import yaml

    from features.params import from_section
    from models.adapt.joint_llm import JointConfig

    params = yaml.safe_load((Path(__file__).resolve().parents[3] / profile).read_text())
    encoders = params["embed"]["encoders"]
    kept = lambda name: [int(v) for v in encoders[name]["layers_frames"]]  # noqa: E731
    assert params.get("adapt") and params.get("joint")
    for name, entry in params["adapt"].items():
        cfg = from_section(AdaptConfig, entry, f"adapt.{name}")
        assert cfg.encoder in encoders and cfg.layers[0] - 1 in kept(cfg.encoder), name
    for name, entry in params["joint"].items():
        cfg = from_section(JointConfig, entry, f"joint.{name}")
        assert cfg.layers[0] - 1 in kept(cfg.llm) and cfg.speech_layer in kept(cfg.speech), name
    with pytest.raises(ConfigError, match="unknown key"):
        from_section(AdaptConfig, {"encoder": "x", "rnak": 4}, "adapt.x")
