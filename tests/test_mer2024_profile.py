"""params.mer2024.yaml with only ids and paths edited builds every config its stages build
(benchmarks/mer2024_profile.py also runs each encoder of the profile's real architectures)."""
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
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
