import json
import math
import os

import numpy as np
import pytest

from features.params import from_section
from features.errors import ConfigError
from features.media.manifest import Clip, read_manifest, write_manifest
from features.media.ffmpeg import load_audio, sha256_file
from features.noise.mixing import (MER2024_BLURS, MER2024_SNRS, ConditionConfig, babble, clip_rng, degrade_frame,
                            draw, fit_noise, mix_at_snr, noise_files, pink_noise, pyramid_blur, white_noise)
from features.noise.copies import NoiseConfig, make_copies, read_lineage
from features.testing import make_video, make_wav, speech_like


def measured_snr(mix, speech, noise):
    """mix = g*speech + g*a*noise exactly (a scale, g the overflow rescale): solve for both."""
    (g, ga), *_ = np.linalg.lstsq(np.stack([speech, noise], 1).astype(np.float64), mix.astype(np.float64),
                                  rcond=None)
    return 20 * math.log10(np.sqrt(np.mean((g * speech) ** 2)) / np.sqrt(np.mean((ga * noise) ** 2)))


@pytest.mark.parametrize("kind", ["white", "pink", "babble"])
@pytest.mark.parametrize("snr", [-5.0, 0.0, 7.5, 20.0])
def test_mix_hits_the_target_snr_within_half_a_db(kind, snr):
    rng = np.random.default_rng(1)
    speech = speech_like(1.0, seed=2)
    noise = {"white": lambda: white_noise(len(speech), rng), "pink": lambda: pink_noise(len(speech), rng),
             "babble": lambda: babble([speech_like(0.7, seed=s) for s in (3, 4, 5)], len(speech), rng)}[kind]()
    mix = mix_at_snr(speech, noise, snr)
    assert mix.dtype == np.float32 and abs(measured_snr(mix, speech, noise) - snr) < 0.5


def test_a_mix_that_would_overflow_is_rescaled_not_clipped():
    speech = 0.95 * np.sign(np.sin(np.linspace(0, 60, 16000)))  # near full scale
    noise = white_noise(16000, np.random.default_rng(0))
    mix = mix_at_snr(speech, noise, 0.0)
    assert np.max(np.abs(mix)) == pytest.approx(32767 / 32768, abs=1e-6)
    assert np.sum(np.abs(mix) >= 32767 / 32768 - 1e-6) <= 2  # one peak at full scale, no clipped run
    assert abs(measured_snr(mix, speech, noise) - 0.0) < 0.5


def test_pink_noise_has_a_one_over_f_spectrum():
    x = pink_noise(1 << 16, np.random.default_rng(0))
    power = np.abs(np.fft.rfft(x)) ** 2
    f = np.arange(len(power))
    low, high = power[(f > 100) & (f < 200)].mean(), power[(f > 10000) & (f < 20000)].mean()
    assert 10 * math.log10(low / high) == pytest.approx(20, abs=3)  # 100x in frequency = 20 dB


def test_short_noise_is_looped_and_draws_are_per_clip():
    rng = np.random.default_rng(0)
    out = fit_noise([np.arange(3.0), np.arange(2.0)], 12, rng)  # 5 samples looped to 12
    assert len(out) == 12 and set(out) <= {0.0, 1.0, 2.0}
    a = [draw(clip_rng(0, "c", "clip1"), [5, 6, 7, 8, 9, 10]) for _ in range(3)]
    assert len(set(a)) == 1  # the same clip always draws the same value
    assert clip_rng(0, "c", "clip1").random() != clip_rng(0, "c", "clip2").random()


def test_mer2024_preset_is_merTools_recipe():
    cfg = ConditionConfig(noise="folder", noise_dir="/x", preset="mer2024")
    assert cfg.snr_db == list(MER2024_SNRS) == [5, 6, 7, 8, 9, 10] and cfg.blur == [1, 2, 4]
    assert cfg.nominal_snr() == 7.5
    drawn = {draw(clip_rng(0, "mer", f"c{i}"), cfg.blur) for i in range(40)}
    assert drawn == set(MER2024_BLURS)


def test_pyramid_blur_is_down_then_up_and_keeps_the_size():
    import cv2

    frame = np.random.default_rng(0).integers(0, 255, (63, 80, 3), dtype=np.uint8)
    assert np.array_equal(pyramid_blur(frame, 1), frame)
    even = frame[:62]
    assert np.array_equal(pyramid_blur(even, 2), cv2.pyrUp(cv2.pyrDown(even)))
    four = pyramid_blur(frame, 4)
    assert four.shape == frame.shape
    assert np.abs(np.diff(four.astype(float), axis=1)).mean() < np.abs(np.diff(frame.astype(float), axis=1)).mean() / 3
    out = degrade_frame(frame, blur=2, downscale=0.5, jpeg_quality=10)
    assert out.shape == frame.shape and out.dtype == np.uint8


@pytest.mark.parametrize("bad, match", [({"snr_db": "ten"}, "not a number"), ({"snr_db": [5, "x"]}, "not a number"),
                                        ({"noise": "folder"}, "needs noise_dir"), ({"blur": 3}, "power of two"),
                                        ({"preset": "mer2023"}, "unknown"), ({"noise": "brown"}, "unknown")])
def test_bad_condition_settings_name_the_key(bad, match):
    with pytest.raises(ConfigError, match=f"noise.conditions.c: .*{match}"):
        from_section(ConditionConfig, bad, "noise.conditions.c")


def test_empty_or_missing_noise_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="is not a folder"):
        noise_files(tmp_path / "nowhere")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ConfigError, match="holds no audio files"):
        noise_files(tmp_path / "empty")


# ---------------------------------------------------------------- copies as clips

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    clips = []
    for i, label in enumerate(["happy", "sad", "angry", "happy"]):
        path = make_video(d / f"c{i}.mp4", seconds=0.6, tone_hz=200 + 50 * i)
        clips.append(Clip(f"c{i}", str(path), path.stat().st_size, sha256_file(path), 0.6, label, i % 2, "labelled"))
    silent = make_video(d / "mute.mp4", seconds=0.6, with_audio=False)
    clips.append(Clip("mute", str(silent), silent.stat().st_size, sha256_file(silent), 0.6, "sad", 1, "labelled"))
    noise_dir = d / "musan" / "noise" / "free-sound"
    make_wav(noise_dir / "n1.wav", np.random.default_rng(0).uniform(-0.5, 0.5, 2000))  # shorter than a clip
    write_manifest(d / "manifest.csv", clips)
    write_manifest(d / "voiced.csv", clips[:4])
    return d


def _cfg(**conds):
    return NoiseConfig(clips=0, conditions=conds)


def test_copies_are_clips_with_lineage_and_a_failed_clip_is_recorded(corpus, tmp_path):
    cfg = _cfg(musan={"noise": "folder", "noise_dir": str(corpus / "musan"), "snr_db": 5, "blur": 2})
    manifest = read_manifest(make_copies(corpus / "manifest.csv", "musan", cfg, tmp_path / "m"))
    assert [c.clip_id for c in manifest] == ["c0__musan", "c1__musan", "c2__musan", "c3__musan"]
    assert [(c.label, c.fold) for c in manifest] == [("happy", 0), ("sad", 1), ("angry", 0), ("happy", 1)]
    lineage = read_lineage(tmp_path / "m/lineage.csv")
    assert lineage[0]["source_id"] == "c0" and lineage[0]["noise_sources"].endswith("n1.wav")
    fails = json.loads((tmp_path / "m/failures.json").read_text())["failures"]
    assert [(f["clip_id"], f["reason"]) for f in fails] == [("mute", "no_audio")]
    make_copies(corpus / "manifest.csv", "musan", cfg, tmp_path / "m")  # only the bad clip to retry: no crash
    fails = json.loads((tmp_path / "m/failures.json").read_text())["failures"]
    assert [(f["clip_id"], f["reason"]) for f in fails] == [("mute", "no_audio")]
    clean = load_audio(corpus / "c0.mp4", "c0")
    noisy = load_audio(manifest[0].path, "c0__musan")
    assert abs(len(noisy) - len(clean)) < 2000  # aac priming/padding
    n = min(len(clean), len(noisy))
    assert 0.3 < np.corrcoef(clean[:n], noisy[:n])[0, 1] < 0.99  # speech still there, noise added


def test_copies_are_reproducible_for_a_seed(corpus, tmp_path):
    cond = {"noise": "white", "snr_db": [0, 5, 10], "jpeg_quality": 30}
    a = make_copies(corpus / "manifest.csv", "w", _cfg(w=cond), tmp_path / "a")
    b = make_copies(corpus / "manifest.csv", "w", _cfg(w=cond), tmp_path / "b")
    other = make_copies(corpus / "manifest.csv", "w", NoiseConfig(clips=0, seed=1, conditions={"w": cond}),
                        tmp_path / "c")
    sha = lambda m: [c.sha256 for c in read_manifest(m)]  # noqa: E731
    assert sha(a) == sha(b) and sha(a) != sha(other)
    assert read_lineage(tmp_path / "a/lineage.csv") == read_lineage(tmp_path / "b/lineage.csv")


def test_copies_are_made_incrementally(corpus, tmp_path, capsys):
    conds = {"white": {"noise": "white", "snr_db": 10}}
    out = tmp_path / "n"
    make_copies(corpus / "voiced.csv", "white", _cfg(**conds), out / "white")
    stamp = {p: p.stat().st_mtime_ns for p in (out / "white/videos").iterdir()}
    capsys.readouterr()
    # A second condition computes only its own copies and leaves the first one's untouched.
    conds["pink"] = {"noise": "pink", "snr_db": 0}
    make_copies(corpus / "voiced.csv", "pink", _cfg(**conds), out / "pink")
    make_copies(corpus / "voiced.csv", "white", _cfg(**conds), out / "white")
    printed = capsys.readouterr().out
    assert "[noise@pink] 4 copies: 0 cached, 4 to make" in printed
    assert "[noise@white] 4 copies: 4 cached, 0 to make" in printed
    assert {p: p.stat().st_mtime_ns for p in (out / "white/videos").iterdir()} == stamp
    # A new clip in the corpus: one copy to make; a changed setting remakes the condition.
    clips = read_manifest(corpus / "voiced.csv")
    path = make_video(tmp_path / "c9.mp4", seconds=0.6, tone_hz=500)
    write_manifest(tmp_path / "more.csv", clips + [Clip("c9", str(path), path.stat().st_size,
                                                        sha256_file(path), 0.6, "sad", 0, "labelled")])
    make_copies(tmp_path / "more.csv", "white", _cfg(**conds), out / "white")
    conds["white"]["snr_db"] = 5
    make_copies(tmp_path / "more.csv", "white", _cfg(**conds), out / "white")
    printed = capsys.readouterr().out
    assert "[noise@white] 5 copies: 4 cached, 1 to make" in printed
    assert "[noise@white] 5 copies: 0 cached, 5 to make" in printed


def test_downstream_stages_cache_copies_like_clips(corpus, tmp_path, capsys):
    from features.media.stages import AudioConfig, extract_audio

    cfg = _cfg(white={"noise": "white", "snr_db": 10})
    manifest = make_copies(corpus / "voiced.csv", "white", cfg, tmp_path / "copies")
    extract_audio(manifest, AudioConfig(), tmp_path / "audio")
    make_copies(corpus / "voiced.csv", "white", cfg, tmp_path / "copies")
    capsys.readouterr()
    extract_audio(manifest, AudioConfig(), tmp_path / "audio")
    assert "[audio] 4 clips: 4 cached, 0 to compute" in capsys.readouterr().out


def test_clean_condition_is_the_original_files(corpus, tmp_path):
    rows = read_manifest(make_copies(corpus / "manifest.csv", "clean", _cfg(clean={"noise": "none"}), tmp_path))
    src = {c.clip_id: c for c in read_manifest(corpus / "manifest.csv")}
    assert all(r.path == src[r.clip_id.split("__")[0]].path and r.sha256 == src[r.clip_id.split("__")[0]].sha256
               for r in rows) and len(rows) == 5
    assert not os.listdir(tmp_path / "videos") if (tmp_path / "videos").exists() else True


def test_report_gathers_conditions_into_metrics_and_plot_rows(tmp_path):
    from models.noise.evaluation import CLEAN_PLOT_DB, report
    from features.reliability.reports import write_json_atomic

    def scores(snr, noise, f1_none, f1_dfn, wer_none):
        return {"snr_db": snr, "noise": noise, "clips": 24,
                "wf1": {"attention": {"none": {"wf1": f1_none, "n": 24}, "deepfilternet": {"wf1": f1_dfn, "n": 24}}},
                "wer": {"none": wer_none, "deepfilternet+enh": wer_none / 2}}
    write_json_atomic(tmp_path / "s/clean/scores.json", scores(None, "none", 0.5, 0.5, 0.1))
    write_json_atomic(tmp_path / "s/b0/scores.json", scores(0.0, "babble", 0.2, 0.3, 0.6))
    metrics = report(tmp_path / "s", ["clean", "b0"], tmp_path / "out")
    assert metrics["b0"]["wf1"] == {"attention": {"none": 0.2, "deepfilternet": 0.3}}
    assert metrics["b0"]["wer"] == {"none": 0.6, "deepfilternet+enh": 0.3}
    rows = json.loads((tmp_path / "out/wf1.json").read_text())
    assert {(r["series"], r["snr_db"], r["wf1"]) for r in rows} == {
        ("attention/none", CLEAN_PLOT_DB, 0.5), ("attention/none", 0.0, 0.2),
        ("attention/deepfilternet", CLEAN_PLOT_DB, 0.5), ("attention/deepfilternet", 0.0, 0.3)}
    assert (tmp_path / "out/wf1_vs_snr.png").stat().st_size > 1000
    assert len(json.loads((tmp_path / "out/wer.json").read_text())) == 4
    assert metrics["b0"]["wer_unit"] == "wer"  # scores without a unit are English word error rates


def test_report_names_the_error_rate_unit_of_chinese_references(tmp_path):
    from models.noise.evaluation import report
    from features.reliability.reports import write_json_atomic

    write_json_atomic(tmp_path / "s/b0/scores.json", {"snr_db": 0.0, "noise": "babble", "clips": 2,
                                                      "wf1": {}, "wer": {"none": 0.25}, "wer_unit": "cer"})
    metrics = report(tmp_path / "s", ["b0"], tmp_path / "out")
    assert metrics["b0"]["wer_unit"] == "cer"
    assert json.loads((tmp_path / "out/wer.json").read_text())[0]["unit"] == "cer"


def test_condition_scores_chinese_references_in_characters():
    from features.audio.error_rate import unit_for
    assert unit_for(["我今天很高兴"], "zh") == "cer" and unit_for(["call me now"], "en") == "wer"


def test_wer_of_copies_is_scored_against_their_source_clip(tmp_path):
    from features.reliability.reports import write_json_atomic
    from models.noise.evaluation import _wers

    write_json_atomic(tmp_path / "t.json", {"transcripts": {"a__n": {"text": "call me now"},
                                                            "b__n": {"text": "hello"}}})
    lineage = [{"clip_id": "a__n", "source_id": "a"}, {"clip_id": "b__n", "source_id": "b"}]
    assert _wers({"none": tmp_path / "t.json"}, {"a": "Call me now.", "b": "Hello there"}, lineage) == \
        {"none": round(1 / 5, 4)}


def test_a_hung_ffmpeg_fails_its_copy_with_reason_timeout(corpus, tmp_path, monkeypatch):
    """ffmpeg writing a copy is stopped after MER_DECODE_TIMEOUT_S: that clip fails with reason
    `timeout` (no half-written file is left) and the other clips are still made."""
    import features.noise.copies as nc

    real = nc.write_video

    def slow_for_c1(clip, audio, path, degrade):
        if clip.clip_id == "c1":
            monkeypatch.setattr(nc, "DECODE_TIMEOUT_S", 0.0)  # the killer fires at once
        try:
            return real(clip, audio, path, degrade)
        finally:
            monkeypatch.setattr(nc, "DECODE_TIMEOUT_S", 300.0)
    monkeypatch.setattr(nc, "write_video", slow_for_c1)
    out = make_copies(corpus / "voiced.csv", "w", _cfg(w={"noise": "white", "snr_db": 10}), tmp_path / "t")
    assert [c.clip_id for c in read_manifest(out)] == ["c0__w", "c2__w", "c3__w"]
    fails = json.loads((tmp_path / "t/failures.json").read_text())["failures"]
    assert [(f["clip_id"], f["reason"]) for f in fails] == [("c1", "timeout")]
    assert not list((tmp_path / "t").rglob("*.tmp.mp4"))
