"""The `mer` command outside DVC: metrics table, store inspection, errors as exit codes."""
import json

import numpy as np

from features.storage.store import write_store
from stages.cli import main


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
    assert "embedding store, 4 clips" in out and "3 layers x 8 dims, float16" in out
    assert main(["store", "inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["clips"] == 4 and info["meta"]["model"] == "tiny"
