"""`mer status` reads stage outputs: done / failed / pending / blocked per stage."""
from pathlib import Path

import numpy as np
import pytest
import yaml

from features.errors import MerError
from features.media.manifest import Clip, write_manifest
from features.reliability.reports import FailureReport, write_json_atomic
from features.topology import MANIFEST
from features.status import format_status, pipeline_status
from features.storage.store import write_store
from stages.cli import main

ROOT = Path(__file__).resolve().parents[2]
ENCODERS = {"hubert": {"input": "artifacts/denoise/denoised"},
            "clip": {"input": "artifacts/faces/faces"},
            "minilm": {"input": "artifacts/asr/transcripts.json"}}


def _store(path: Path, kind: str, ids: list[str]) -> None:
    write_store(path, kind, {}, [(i, np.zeros(3, np.float32), None, None) for i in ids])


def _failed(path: Path, stage: str, ids: dict[str, str]) -> None:
    report = FailureReport(stage)
    for cid, reason in ids.items():
        report.add(cid, reason, "test")
    report.write(path)


@pytest.fixture
def project(tmp_path):
    ids = [f"c{i}" for i in range(6)]
    write_manifest(tmp_path / MANIFEST, [Clip(i, f"{i}.mp4", 1, "h", 1.0, "happy", 0, "labelled")
                                         for i in ids])
    a = tmp_path / "artifacts"
    _store(a / "audio/audio", "audio", ids[:5])
    _failed(a / "audio/failures.json", "audio", {"c5": "no_audio"})
    _store(a / "denoise/denoised", "audio", ids[:3])  # c3, c4 pending (interrupted run)
    _store(a / "faces/faces", "faces", ids[:4] + ["old_clip"])  # old_clip left the corpus
    _failed(a / "faces/failures.json", "faces", {"c4": "unreadable", "c5": "unreadable"})
    write_json_atomic(a / "asr/transcripts.json", {"asr": {}, "transcripts": {
        i: {"text": "hi", "source": "asr", "key": "k"} for i in ids[:3]}})
    return tmp_path


def test_counts_per_stage(project):
    rows = {r.stage: r for r in pipeline_status(project, ENCODERS)}
    assert (len(rows["audio"].done), rows["audio"].failed, rows["audio"].pending) == (5, {"c5": "no_audio"}, set())
    assert rows["denoise"].pending == {"c3", "c4"} and rows["denoise"].blocked == {"c5"}
    assert rows["faces"].done == {"c0", "c1", "c2", "c3"}  # old_clip is not counted
    assert rows["embed@hubert"].missing and rows["embed@hubert"].pending == {"c0", "c1", "c2"}
    assert rows["embed@clip"].pending == {"c0", "c1", "c2", "c3"}
    assert rows["embed@clip"].blocked == {"c4", "c5"}
    text = format_status(list(rows.values()))
    assert "faces" in text and "unreadable 2" in text and "(not run yet)" in text


def test_cli_status_and_missing_manifest(project, tmp_path_factory, capsys):
    (project / "params.yaml").write_text(yaml.safe_dump({"embed": {"encoders": ENCODERS}}))
    assert main(["status", "--root", str(project)]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == [
        "stage", "done", "failed", "pending", "blocked", "failures"]
    with pytest.raises(MerError, match="dvc repro prepare"):
        pipeline_status(tmp_path_factory.mktemp("empty"), ENCODERS)
