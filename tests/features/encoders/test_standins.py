"""Random-weight stand-ins: built once, reused, and loaded through load_encoder like real folders."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from features.encoders import EncoderConfig, load_encoder  # noqa: E402
from features.encoders.standins import MARKER, build_standins  # noqa: E402
from stages.standins import main  # noqa: E402


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    return build_standins(tmp_path_factory.mktemp("standins"), seed=0)


def test_folders_hold_safetensors_preprocessor_and_marker(standins):
    assert set(standins) == {"hubert-standin", "clip-standin"}
    for name, folder in standins.items():
        files = set(os.listdir(folder))
        assert {"config.json", "model.safetensors", "preprocessor_config.json", MARKER} <= files
        marker = json.loads(open(os.path.join(folder, MARKER)).read())
        assert marker["name"] == name and marker["random_weights"] is True


def test_hubert_standin_batches_with_attention_mask(standins):
    enc = load_encoder(EncoderConfig(family="speech", model=standins["hubert-standin"], layers_frames=[-1]))
    assert enc.padded_batches and (enc.num_layers, enc.hidden_size) == (5, 96)
    assert enc.extractor.return_attention_mask
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(n).astype(np.float32) for n in (8000, 3000)]
    batched, single = enc.encode(waves), [enc.encode([w])[0] for w in waves]
    assert [c.frames.shape for c in batched] == [(1, 24, 96), (1, 9, 96)]  # 20 ms frames, as HuBERT
    for a, b in zip(batched, single):
        np.testing.assert_allclose(a.pooled, b.pooled, atol=1e-4)


def test_clip_standin_encodes_face_sized_crops(standins):
    enc = load_encoder(EncoderConfig(family="vision", model=standins["clip-standin"]))
    assert (enc.num_layers, enc.hidden_size) == (5, 96)
    crops = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    out = enc.encode([crops])[0]
    assert out.pooled.shape == (5, 96) and out.frames.shape == (1, 2, 96)


def test_idempotent_deterministic_and_seeded(standins, tmp_path, capsys):
    folder = standins["clip-standin"]
    weights = os.path.join(folder, "model.safetensors")
    before = os.stat(weights).st_mtime_ns
    again = build_standins(os.path.dirname(folder), seed=0)
    assert again == standins and os.stat(weights).st_mtime_ns == before  # reused, not rebuilt

    params = tmp_path / "params.yaml"
    params.write_text("standins: {seed: 0}\n")
    out = tmp_path / "built"
    main([str(out), "--params", str(params)])  # the stage builds the same bytes from the same seed
    assert "clip-standin" in capsys.readouterr().out
    with open(weights, "rb") as a, open(out / "clip-standin" / "model.safetensors", "rb") as b:
        assert a.read() == b.read()

    other = build_standins(tmp_path, seed=1)["clip-standin"]  # marker mismatch -> rebuilt
    assert json.loads(open(os.path.join(other, MARKER)).read())["seed"] == 1
    with open(weights, "rb") as a, open(os.path.join(other, "model.safetensors"), "rb") as b:
        assert a.read() != b.read()
