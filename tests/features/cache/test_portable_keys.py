"""Keys hold what computes a result, never where it lives: two checkouts share every key."""
import json
import shutil

from tiny_models import _bert

from features.cache import versions
from features.embedding.stage import _sources
from features.encoders import EncoderConfig, load_encoder
from features.params import resolve_model_path


def _keys_in(root, monkeypatch):
    """The embed stage's fingerprint parts for the model `model` (relative, as params.yaml has it)
    seen from checkout `root`."""
    monkeypatch.chdir(root)
    cfg = EncoderConfig(family="text", model="model")
    fingerprint = load_encoder(cfg).fingerprint()
    return {"fingerprint": fingerprint, "model_files": versions.model_files(resolve_model_path("model")),
            "sources": _sources(cfg), "embed": versions.fingerprint("embed")}


def test_two_checkouts_in_other_folders_give_the_same_keys(tmp_path, monkeypatch):
    first, second = tmp_path / "alice" / "project", tmp_path / "bob" / "work" / "mer"
    _bert(first / "model")
    shutil.copytree(first / "model", second / "model")
    # what a fresh install, another Python or a file manager leaves in a model folder
    (second / "model" / "__pycache__").mkdir()
    (second / "model" / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"\x00cache")
    (second / "model" / ".DS_Store").write_bytes(b"os")
    a, b = _keys_in(first, monkeypatch), _keys_in(second, monkeypatch)
    assert a == b
    text = json.dumps(a, default=str)
    assert str(tmp_path) not in text and "resolved_path" not in text


def test_other_weights_or_tokenizer_change_the_keys(tmp_path, monkeypatch):
    _bert(tmp_path / "a" / "model", seed=0)
    _bert(tmp_path / "b" / "model", seed=1)  # same config and vocabulary, other weights
    a, b = _keys_in(tmp_path / "a", monkeypatch), _keys_in(tmp_path / "b", monkeypatch)
    assert a["fingerprint"]["weights"] != b["fingerprint"]["weights"] and a["sources"] != b["sources"]
    vocab = tmp_path / "b" / "model" / "vocab.txt"
    vocab.write_text(vocab.read_text() + "extra\n")
    assert _keys_in(tmp_path / "b", monkeypatch)["model_files"] != b["model_files"]
