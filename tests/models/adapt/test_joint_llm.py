"""Paper 002's joint audio-text module: projected speech frames + transcript token states in one
LLM sequence, LoRA + projector trained jointly, out-of-fold features."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from models.adapt.lora import adapt_features, layer_stack
from models.training.train_config import CLASSES
from models.adapt.joint_llm import JointAudioText, JointConfig, segments


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: no OpenMP spin-waits on a busy machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llm():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaModel(config).eval()


def planted(where: str, n: int = 36, seed: int = 0):
    """Two classes; the class shifts only the audio frames or only the token states."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    direction_a, direction_t = rng.standard_normal(8), rng.standard_normal(32)
    items = {}
    for i in range(n):
        sign = 1.0 if y[i] else -1.0
        audio = rng.standard_normal((int(rng.integers(20, 40)), 8))
        text = rng.standard_normal((int(rng.integers(4, 9)), 32))
        if where == "audio":
            audio += 1.5 * sign * direction_a
        else:
            text += 1.5 * sign * direction_t
        items[f"c{i}"] = (audio.astype(np.float32), text.astype(np.float32))
    labels = {f"c{i}": int(y[i]) for i in range(n)}
    return items, labels, {f"c{i}": i % 3 for i in range(n)}


@pytest.mark.slow
@pytest.mark.parametrize("where", ["audio", "text"])
def test_a_class_only_in_one_modality_is_learnt(llm, where):
    items, labels, folds = planted(where)
    stack = layer_stack(llm)
    cfg = JointConfig(speech="s", llm="l", layers=[2, 3], audio_tokens=4, projector_hidden=16, rank=4,
                      epochs=12, lr=1e-2, batch_size=8)
    made = []

    def make():
        made.append(JointAudioText(stack, 2, 3, cfg, 8, len(CLASSES)))
        return made[-1]

    before = {n: p.detach().clone() for n, p in llm.named_parameters()}
    result = adapt_features(stack, llm, 2, 3, cfg.adapt_config(), items, labels, folds, torch.device("cpu"), make)
    acc = np.mean([result.oof_probs[c].argmax() == labels[c] for c in labels])
    assert acc >= 0.8, f"class only in the {where}: out-of-fold accuracy {acc:.2f}"
    assert all(torch.equal(p, before[n]) for n, p in llm.named_parameters())  # the LLM stays frozen
    module = made[0]
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert any(n.startswith("projector.") for n in trainable) and any("lora_" in n for n in trainable)
    assert all(n.startswith(("projector.", "classifier.")) or "lora_" in n for n in trainable)
    assert result.pooled["c0"].shape == (2, 32)


def test_audio_segments_and_sequence_layout(llm):
    frames = np.arange(10, dtype=np.float32)[:, None].repeat(3, 1)
    seg = segments(frames, 4)
    assert seg.shape == (4, 3) and seg[0, 0] == 1.0  # mean of frames 0..2
    assert segments(frames[:2], 4).shape == (2, 3)  # fewer frames than tokens: one per frame
    stack = layer_stack(llm)
    cfg = JointConfig(speech="s", llm="l", layers=[2, 3], audio_tokens=4)
    module = JointAudioText(stack, 2, 3, cfg, 3, len(CLASSES))
    items = [(frames, np.ones((5, 32), np.float32)), (frames[:2], np.ones((2, 32), np.float32))]
    with torch.no_grad():
        states, mask = module.states(*module.collate(items, torch.device("cpu")))
    assert mask.sum(1).tolist() == [4 + 5, 2 + 2] and states[-1].shape == (2, 9, 32)
