"""The `mer` command outside DVC: metrics table, store inspection, errors as exit codes; every
stage dvc.yaml runs as a `mer` subcommand."""
import json
import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import yaml

from features.storage.store import write_store
from features.topology import STAGES
from stages.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def offline(monkeypatch):
    """What a stage's setup() sets, undone after the test."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.delenv("MER_EMBED_NPROC", raising=False)


def _dvc_args(stage: str) -> list[str]:
    """The arguments dvc.yaml passes to the stage's module, ${...} filled in with `x`."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    return [re.sub(r"\$\{[^}]*\}", "x", w) for w in spec.get("do", spec)["cmd"].split()[3:]]


def test_metrics_table_sorted_by_weighted_f1(tmp_path, capsys):
    head = {"accuracy": 0.5, "macro_f1": 0.4, "per_class_f1": {}, "clips": 72, "type": "probe"}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"main_head": "attention", "heads": {
        "probe_a": {**head, "weighted_f1": 0.2}, "attention": {**head, "weighted_f1": 0.6}}}))
    assert main(["metrics", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("attention") and lines[1].endswith("<- main")
    assert lines[2].split()[:4] == ["probe_a", "probe", "72", "0.200"]


def test_missing_metrics_is_a_clear_error(tmp_path, capsys):
    assert main(["metrics", str(tmp_path / "nope.json")]) == 1
    assert "run `dvc repro`" in capsys.readouterr().err


def test_unknown_command_exits_2(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_store_inspect_text_and_json(tmp_path, capsys):
    rng = np.random.default_rng(0)
    items = [(f"c{i}", rng.normal(size=(5, 8)).astype(np.float16), None,
              rng.normal(size=(3, 8)).astype(np.float16)) for i in range(4)]
    path = write_store(tmp_path / "enc", "embedding", {"model": "tiny"}, items)
    assert main(["store", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "embedding store (code None), 4 clips" in out and "3 layers x 8 dims, float16" in out
    assert main(["store", "inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["clips"] == 4 and info["meta"]["model"] == "tiny"


def test_store_inspect_json_has_the_code_version_of_every_kind(tmp_path, capsys, media):
    """`code_version` sits at the top level for a media store and for a recorded (encoder or
    transform) store alike: the source hash of the code that computed it."""
    from features.cache import versions
    from features.media.manifest import Clip, write_manifest
    from features.media.ffmpeg import sha256_file
    from features.media.stages import AudioConfig, extract_audio
    from features.storage.record import StoreRecord

    video = media["video"]
    write_manifest(tmp_path / "m.csv", [Clip("v", str(video), video.stat().st_size, sha256_file(video),
                                             1.0, "", -1, "unlabelled")])
    audio = extract_audio(tmp_path / "m.csv", AudioConfig(), tmp_path / "audio")
    meta = StoreRecord(producer="transform", name="x_lora", family="adapt", layers_pooled=(0,),
                       layers_frames=(), hidden_size=8, store_dtype="float16", fingerprint={},
                       code_version=versions.code_version("adapt")).to_meta()
    derived = write_store(tmp_path / "x_lora", "embedding", meta,
                          [("v", None, None, np.zeros((1, 8), np.float16))])
    capsys.readouterr()
    for path, expected in ((audio, versions.code_version("audio")),
                           (derived, versions.code_version("adapt"))):
        assert main(["store", "inspect", str(path), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["code_version"] == expected


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_is_a_command_with_help(stage, capsys, offline):
    with pytest.raises(SystemExit) as done:
        main([stage, "--help"])
    assert done.value.code == 0
    assert "--params" in capsys.readouterr().out


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_error_is_one_line_and_exit_1(stage, tmp_path, capsys, monkeypatch, offline):
    """`mer <stage>` and `python -m stages.<x>` (dvc.yaml's command) through the one wrapper."""
    monkeypatch.chdir(tmp_path)  # no params.yaml here: every stage stops with a ConfigError
    entry, args = STAGES[stage], _dvc_args(stage)
    assert main([stage, *args[len(entry.args):]]) == 1
    assert capsys.readouterr().err.startswith(f"mer {stage}: error: params.yaml not found")
    monkeypatch.setattr("sys.argv", ["-m", *args])
    with pytest.warns(RuntimeWarning, match="found in sys.modules"):  # runpy: already imported
        with pytest.raises(SystemExit) as done:
            runpy.run_module(entry.module, run_name="__main__", alter_sys=True)
    assert done.value.code == 1
    name = entry.module.split(".")[-1]
    assert capsys.readouterr().err.startswith(f"{name}: error: params.yaml not found")
