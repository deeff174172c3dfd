"""features.runner: the media stages and embed@ in process give what the stage functions give."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from tiny_models import _hubert  # noqa: E402

from features import topology  # noqa: E402
from features.audio.denoise import DenoiseConfig  # noqa: E402
from features.audio.stages import denoise_audio  # noqa: E402
from features.embedding.stage import embed_store  # noqa: E402
from features.encoders import EncoderConfig  # noqa: E402
from features.errors import ConfigError  # noqa: E402
from features.media.faces import FacesConfig  # noqa: E402
from features.media.manifest import describe, write_manifest  # noqa: E402
from features.media.stages import AudioConfig, crop_faces, extract_audio  # noqa: E402
from features.runner import _config, run_stages  # noqa: E402
from features.storage.store import StoreReader  # noqa: E402

PARAMS = {"audio": {"sample_rate": 16000}, "denoise": {"backend": "none"},
          "faces": {"fps": 2.0, "size": 32, "max_frames": 2}}


@pytest.fixture
def manifest(media, tmp_path):
    clips = [describe("v", media["video"], "", "unlabelled"), describe("w", media["wav"], "", "unlabelled")]
    write_manifest(tmp_path / "manifest.csv", clips)
    return tmp_path / "manifest.csv"


def _contents(path):
    with StoreReader(path) as s:
        return s.ids, dict(s.keys), {cid: s.get(cid) for cid in s.ids}


def _same_store(a, b):
    ids, keys, arrays = _contents(a)
    ids_b, keys_b, arrays_b = _contents(b)
    assert (ids, keys) == (ids_b, keys_b)
    for cid in ids:
        np.testing.assert_array_equal(arrays[cid], arrays_b[cid])


def test_audio_and_denoise_equal_the_stage_functions_at_the_pipeline_paths(manifest, tmp_path):
    run = run_stages(manifest, PARAMS, tmp_path / "work", ["denoise"])
    assert run.failed == {}
    assert set(run.paths) == {"audio", "denoise"}  # denoise needs audio; nothing else ran
    for stage, path in run.paths.items():  # artifacts/x -> work/x, as dvc.yaml places them
        assert path == tmp_path / "work" / topology.MEDIA[stage].output.split("/", 1)[1]
    audio = extract_audio(manifest, AudioConfig(), tmp_path / "direct/audio")
    _same_store(run.paths["audio"], audio)
    _same_store(run.paths["denoise"], denoise_audio(audio, DenoiseConfig(backend="none"), tmp_path / "direct/den"))


def test_faces_equal_the_stage_function(manifest, tmp_path):
    run = run_stages(manifest, PARAMS, tmp_path / "work", ["faces"])
    assert set(run.paths) == {"faces"}
    _same_store(run.paths["faces"], crop_faces(manifest, FacesConfig(fps=2.0, size=32, max_frames=2),
                                               tmp_path / "direct"))
    assert "w" in run.failed and run.failed["w"].startswith("faces: ")  # a WAV has no frames


def test_overrides_folders_and_given_outputs(manifest, tmp_path):
    """A variant: another backend than params.yaml's (here one that does not exist), its own
    folder, the audio made before; only denoise runs."""
    audio = run_stages(manifest, PARAMS, tmp_path / "work", ["audio"]).paths["audio"]
    params = {**PARAMS, "denoise": {"backend": "rnnoise"}}
    run = run_stages(manifest, params, tmp_path / "work", ["denoise"], given={"audio": audio},
                     overrides={"denoise": {"backend": "none"}}, folders={"denoise": tmp_path / "work/den_none"})
    assert run.paths == {"audio": audio, "denoise": tmp_path / "work/den_none/denoised"}
    assert (tmp_path / "work/den_none/failures.json").is_file()
    assert not (tmp_path / "work/denoise").exists()
    _same_store(run.paths["denoise"], denoise_audio(audio, DenoiseConfig(backend="none"), tmp_path / "direct"))


def test_a_stage_that_stops_fails_every_clip_only_when_told_to_keep_going(manifest, tmp_path):
    params = {**PARAMS, "denoise": {"backend": "rnnoise"}}
    with pytest.raises(ConfigError, match="rnnoise"):
        run_stages(manifest, params, tmp_path / "work", ["denoise"])
    run = run_stages(manifest, params, tmp_path / "work", ["denoise"], keep_going=True)
    assert set(run.failed) == {"v", "w"} and all(m.startswith("denoise: ") for m in run.failed.values())
    assert run.paths["denoise"] == tmp_path / "work/denoise/denoised"  # where it would have been


def test_a_clip_list_is_written_as_the_manifest_and_a_failed_clip_is_reported(media, tmp_path):
    clips = [describe("v", media["video"], "", "unlabelled"),
             describe("mute", media["silent_video"], "", "unlabelled")]
    run = run_stages(clips, PARAMS, tmp_path / "work", ["audio"], keep_going=True)
    assert (tmp_path / "work/manifest.csv").is_file()
    assert list(run.failed) == ["mute"] and run.failed["mute"].startswith("audio: ")
    with StoreReader(run.paths["audio"]) as store:
        assert store.ids == ["v"]


def test_an_encoder_runs_after_the_media_stages_it_reads(manifest, tmp_path):
    enc = {"family": "speech", "model": _hubert(tmp_path / "hubert"), "input": "artifacts/denoise/denoised",
           "batch_size": 2}
    params = {**PARAMS, "embed": {"encoders": {"enc": enc}}}
    run = run_stages(manifest, params, tmp_path / "work", encoders=["enc"])
    assert list(run.paths) == ["audio", "denoise", "embed@enc"]  # topology order
    assert run.paths["embed@enc"] == tmp_path / "work/features/enc"
    assert (tmp_path / "work/features/enc.failures.json").is_file()
    direct = embed_store("enc", EncoderConfig(**enc), run.paths["denoise"], tmp_path / "direct/enc")
    _same_store(run.paths["embed@enc"], direct)
    with StoreReader(run.paths["embed@enc"]) as a, StoreReader(direct) as b:
        np.testing.assert_array_equal(a.pooled(), b.pooled())


def test_overrides_merge_into_nested_sections():
    params = {"asr": {"transcripts_csv": "data/t.csv", "enhance": {"select": True, "rewrite": {"max_new_tokens": 7}}}}
    cfg = _config("asr", params, {"asr": {"transcripts_csv": "", "enhance": {"select": False}}})
    assert (cfg.transcripts_csv, cfg.enhance.select, cfg.enhance.rewrite.max_new_tokens) == ("", False, 7)


def test_unknown_stage_names_are_refused(manifest, tmp_path):
    with pytest.raises(ValueError, match="denoize"):
        run_stages(manifest, PARAMS, tmp_path, ["denoize"])
