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
    _clear()
    yield root
    _clear()


def _clear():
    versions.code_version.cache_clear()
    versions.module_version.cache_clear()


def _edit(root, module, text="\n# edited\n"):
    path = root / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + text)
    _clear()


def _all():
    return {s: versions.code_version(s) for s in versions.STAGE_CODE}


def test_an_edit_changes_the_stages_it_computes_and_no_other(tree):
    before = _all()
    _edit(tree, "features.media.faces")
    after = _all()
    assert {s for s in before if before[s] != after[s]} == {"faces"}
    _edit(tree, "features.media.ffmpeg")
    changed = {s for s, v in _all().items() if v != after[s]}
    assert changed == {"audio", "asr", "faces", "noisy_copies"}  # they decode with it too
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


FAMILIES = ("speech", "vision", "text", "whisper", "face_cnn")


def _families():
    return {f: versions.module_version(f"features.encoders.{f}") for f in FAMILIES}


def test_an_encoder_family_edit_changes_only_that_familys_code_version(tree):
    stages, families = _all(), _families()
    _edit(tree, "features.encoders.whisper")
    assert {f for f, v in _families().items() if v != families[f]} == {"whisper"}
    assert _all() == stages  # no media stage, not the embed stage's shared code, no transform
    _edit(tree, "features.encoders.vision")  # the face CNN is a vision-family class
    assert {f for f, v in _families().items() if v != families[f]} == {"whisper", "vision", "face_cnn"}
    families = _families()
    _edit(tree, "features.encoders.base")  # shared by every family
    assert all(v != families[f] for f, v in _families().items())


def test_a_transform_edit_changes_only_the_transforms_that_run_it(tree):
    before = _all()
    _edit(tree, "models.adapt.lora")  # the LoRA trainer: adapt@ and joint@ (which reuses it)
    assert {s for s, v in _all().items() if v != before[s]} == {"adapt", "joint"}
    before = _all()
    _edit(tree, "models.unlabelled.align")
    assert {s for s, v in _all().items() if v != before[s]} == {"align"}
    before = _all()
    _edit(tree, "features.noise.copies")
    assert {s for s, v in _all().items() if v != before[s]} == {"noisy_copies"}


def test_an_asr_edit_leaves_audio_denoise_and_faces_alone(tree):
    before = _all()
    _edit(tree, "features.audio.asr")
    assert {s for s, v in _all().items() if v != before[s]} == {"asr"}
    before = _all()
    _edit(tree, "features.audio.denoise")
    assert {s for s, v in _all().items() if v != before[s]} == {"denoise"}


def test_derived_stores_record_their_libraries():
    for stage in ("adapt", "joint"):
        assert {"torch", "peft", "transformers"} <= set(versions.fingerprint(stage)["packages"])
    assert "ffmpeg" in versions.fingerprint("noisy_copies")


@pytest.mark.parametrize("junk", ["__pycache__/__init__.cpython-311.pyc", "__init__.pyc", ".DS_Store",
                                  "config.json.swp", "config.json~", "Thumbs.db", ".git/HEAD"])
def test_model_files_leave_out_caches_editor_and_os_files(tmp_path, junk):
    (tmp_path / "config.json").write_text("{}")
    clean = versions.model_files(tmp_path)
    (tmp_path / junk).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / junk).write_bytes(b"x")
    assert versions.model_files(tmp_path) == clean == {"config.json": clean["config.json"]}
