"""The FER2013 face-expression CNN of `what-the-face-classification` as a vision-family encoder."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from features.encoders import EncoderConfig, load_encoder
from features.encoders.face_cnn import CLASSES, FaceCNNEncoder, preprocess
from features.errors import ModelLoadError
from features.media.faces import extract_faces

DEMO_CLIP = Path(__file__).resolve().parents[3] / "data/demo/video/samplenew_00000001.mp4"
MODEL = "pypkg:what_the_face_classification/active_model.pth"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("what_the_face_classification") is None,
                                reason="what-the-face-classification not installed")


def package_classifier(path: str) -> torch.nn.Module:
    """The package's own network class with its own weights (its model.py imports only torch)."""
    from what_the_face_classification.model import SimpleConvolutionalNetwork

    net = SimpleConvolutionalNetwork(3, [[1, 28], [28, 56], [56, 112]], [3, 3, 3], [0, 0, 0], 304, 1792)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


def test_face_cnn_matches_the_package_classifier_on_a_face_crop():
    crops = extract_faces(DEMO_CLIP, "demo").crops
    enc = load_encoder(EncoderConfig(family="vision", model=MODEL, layers_frames=[-1, 3]))
    assert isinstance(enc, FaceCNNEncoder) and enc.num_layers == 7 and enc.hidden_size == 2000
    clip = enc.encode([crops])[0]
    net = package_classifier(enc.path)
    with torch.no_grad():
        expected = torch.cat([net(torch.from_numpy(preprocess(c))) for c in crops]).numpy()
    ours = clip.frames[0, :, :7]  # layer -1: the 7 logits, zero-padded to the widest layer
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    assert [CLASSES[i] for i in ours.argmax(1)] == [CLASSES[i] for i in expected.argmax(1)]
    assert not clip.frames[0, :, 7:].any() and not clip.frames[1, :, 112:].any()
    np.testing.assert_allclose(clip.pooled[-1, :7], expected.mean(0), atol=1e-4)
    np.testing.assert_allclose(clip.pooled[3, :112], clip.frames[1, :, :112].mean(0), atol=1e-5)
    assert enc.fingerprint()["widths"] == [1, 28, 56, 112, 2000, 304, 7]


def test_preprocess_is_resize_centercrop_grey_like_torchvision():
    torchvision = pytest.importorskip("torchvision")
    from PIL import Image

    crop = np.random.default_rng(0).integers(0, 255, (112, 96, 3), dtype=np.uint8)
    t = torchvision.transforms
    want = t.Compose([t.Resize(48), t.CenterCrop(48), t.Grayscale(), t.ToTensor()])(Image.fromarray(crop))
    np.testing.assert_allclose(preprocess(crop), want.numpy(), atol=1e-6)


def test_state_dict_without_conv_layers_is_refused(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(ModelLoadError, match="conv"):
        load_encoder(EncoderConfig(family="vision", model=str(bad)))
