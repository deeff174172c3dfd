"""Cache keys follow the code, libraries and model files that compute a result."""
import shutil

import pytest

from features.cache import versions
from features.media.stages import AudioConfig, extract_audio
from features.media.manifest import Clip, write_manifest
from features.media.ffmpeg import sha256_file
from features.testing import make_video


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A copy of the project's sources that versions reads instead of the real one."""
    root = tmp_path / "src"
    for pkg in versions.PROJECT:
        shutil.copytree(versions.ROOT / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(versions, "ROOT", root)
    versions.code_version.cache_clear()
    yield root
    versions.code_version.cache_clear()


def _edit(root, module, text="\n# edited\n"):
    path = root / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + text)
    versions.code_version.cache_clear()


def _all():
    return {s: versions.code_version(s) for s in versions.STAGE_CODE}


def test_an_edit_changes_the_stages_it_computes_and_no_other(tree):
    before = _all()
    _edit(tree, "features.media.faces")
    after = _all()
    assert {s for s in before if before[s] != after[s]} == {"faces"}
    _edit(tree, "features.media.ffmpeg")
    changed = {s for s, v in _all().items() if v != after[s]}
    assert changed == {"audio", "asr", "faces"}  # asr and faces import media too
    _edit(tree, "features.encoders.pooling")
    assert versions.code_version("embed") != after["embed"]
    frozen = _all()
    _edit(tree, "features.storage.store")  # moves results, never changes one
    _edit(tree, "features.reliability.reports")
    assert _all() == frozen


def test_a_new_module_a_stage_imports_counts(tree):
    (tree / "features/facecrop.py").write_text("X = 1\n")
    _edit(tree, "features.media.faces", "\nfrom features.facecrop import X  # noqa\n")
    assert "features.facecrop" in versions.code_modules("faces")
    before = versions.code_version("faces")
    _edit(tree, "features.facecrop")
    assert versions.code_version("faces") != before


def test_model_files_cover_tokenizer_and_config_not_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text('{"v": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"w" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/preprocessor_config.json").write_text("{}")
    files = versions.model_files(tmp_path)
    assert set(files) == {"config.json", "tokenizer.json", "sub/preprocessor_config.json"}
    (tmp_path / "tokenizer.json").write_text('{"v": 2}')
    assert versions.model_files(tmp_path)["tokenizer.json"] != files["tokenizer.json"]


def test_library_and_ffmpeg_versions_are_in_the_fingerprint():
    fp = versions.fingerprint("faces")
    assert fp["packages"]["opencv-python-headless"] and "ffmpeg version" in fp["ffmpeg"]
    assert set(versions.fingerprint("asr")["packages"]) >= {"ctranslate2", "faster-whisper"}


def test_editing_the_decoder_recomputes_audio_clips_and_a_store_edit_does_not(tree, tmp_path, capsys):
    video = make_video(tmp_path / "v.mp4", seconds=0.3)
    clip = Clip(clip_id="v", path=str(video), size=video.stat().st_size, sha256=sha256_file(video),
                duration_s=0.3, label="", fold=-1, split="unlabelled")
    write_manifest(tmp_path / "m.csv", [clip])
    run = lambda: (extract_audio(tmp_path / "m.csv", AudioConfig(), tmp_path / "out"),  # noqa: E731
                   capsys.readouterr().out)[1]
    assert "1 to compute" in run()
    assert "1 cached, 0 to compute" in run()
    _edit(tree, "features.storage.store")
    assert "1 cached, 0 to compute" in run()
    _edit(tree, "features.media.ffmpeg")
    assert "0 cached, 1 to compute" in run()


def test_torch_floor_excludes_bypassable_weights_only():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    import torch
    from packaging.requirements import Requirement

    deps = tomllib.loads((versions.ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    assert "2.5.1" not in torch_req.specifier and "2.6.0" in torch_req.specifier
    assert torch.__version__.split("+")[0] in torch_req.specifier
