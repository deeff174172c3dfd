"""params.mer2024.yaml with only ids and paths edited builds every config its stages build
(benchmarks/mer2024_profile.py also runs each encoder of the profile's real architectures)."""
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from mer2024_profile import check_configs, edited_profile  # noqa: E402

from features.errors import ConfigError  # noqa: E402


def test_profile_with_edited_paths_builds_every_config(tmp_path):
    models = {name: str(tmp_path / name) for name in ("hubert", "clip", "llm")}
    params = edited_profile(models, tmp_path / "data")
    built = check_configs(params)
    assert {"prepare", "denoise", "asr", "faces", "probe", "evaluate"} <= set(built)
    assert {f"embed.encoders.{n}" for n in models} <= set(built)
    # Only ids/paths/devices differ from the profile as shipped.
    shipped = yaml.safe_load((ROOT / "params.mer2024.yaml").read_text())["embed"]["encoders"]
    for name, enc in params["embed"]["encoders"].items():
        assert {k for k in enc if enc[k] != shipped[name].get(k)} <= {"model", "input", "device"}
    # And a typo in it is caught there, naming the key.
    params["embed"]["encoders"]["hubert"]["poolling"] = "mean"
    with pytest.raises(ConfigError, match="embed.encoders.hubert: unknown key"):
        check_configs(params)


def test_repro_mode_changes_only_ids_paths_and_gpu_settings_unless_recorded():
    """benchmarks/mer2024_profile.py --mode repro: with the profile's own epochs and noise.clips,
    every difference from the shipped profile is an id/path, a GPU->CPU setting or the ASR
    stand-in; shortened settings are listed with a reason; an unexplained change stops it."""
    from mer2024_profile import deviations, repro_profile

    models = {name: f"/scratch/{name}" for name in ("hubert", "clip", "llm")}
    shipped = yaml.safe_load((ROOT / "params.mer2024.yaml").read_text())
    params = repro_profile(models, "/scratch/se", "/scratch/noise", adapt_epochs=99, noise_clips=0)
    kinds = {d["key"]: d["kind"] for d in deviations(params)}
    assert set(kinds.values()) <= {"path", "cpu", "standin"}
    assert kinds["asr.model"] == "standin" and kinds["denoise.device"] == "cpu"
    assert {k for k, v in kinds.items() if v == "cpu"} >= {
        f"{s}.{n}.device" for s in ("adapt", "joint") for n in shipped[s]}
    short = repro_profile(models, "/scratch/se", "/scratch/noise", adapt_epochs=2, noise_clips=6,
                          joint_epochs=1)
    timed = {d["key"] for d in deviations(short) if d["kind"] == "time"}
    assert timed == {"noise.clips"} | {f"joint.{n}.epochs" for n in shipped["joint"]} | {
        f"adapt.{n}.epochs" for n, a in shipped["adapt"].items() if a["encoder"] == "hubert"}
    short["probe"]["epochs"] = 1
    with pytest.raises(RuntimeError, match="probe.epochs: 20 -> 1 has no reason"):
        deviations(short)
