"""`mer report`: `dvc exp show --json` (DVC 3 format, recorded from a real run) as Markdown."""
import json

from models.evaluation.report import markdown, rows
from stages.cli import main

EXP_SHOW = json.loads('''[{"rev": "workspace", "name": null, "data": {"rev": "workspace", "params": {"params.yaml": {"data": {"semi": {"enabled": false}, "priors": {"method": "em"}}}}, "metrics": {"m.json": {"data": {"heads": {"a": {"weighted_f1": 0.5}}}}}}, "error": null, "experiments": null}, {"rev": "9b2a8ec0e9b2cae8c7ab70811ffb689554067d6c", "name": "master", "data": {"rev": "9b2a8ec0e9b2cae8c7ab70811ffb689554067d6c", "params": {"params.yaml": {"data": {"semi": {"enabled": true}, "priors": {"method": "em"}}}}, "metrics": {"m.json": {"error": {"type": "FileNotFoundError", "msg": "[Errno 2] No storage files available: 'm.json'"}}}}, "error": null, "experiments": [{"revs": [{"rev": "0e508a5eca4cf2a7cdfd624314305c38edc2a1b8", "name": "no-semi", "data": {"rev": "0e508a5eca4cf2a7cdfd624314305c38edc2a1b8", "params": {"params.yaml": {"data": {"semi": {"enabled": false}, "priors": {"method": "em"}}}}, "metrics": {"m.json": {"data": {"heads": {"a": {"weighted_f1": 0.5}}}}}}, "error": null, "experiments": null}]}, {"revs": [{"rev": "f32348e451b469577a36538f58229906a67062b8", "name": "kaput-tach", "data": {"rev": "f32348e451b469577a36538f58229906a67062b8", "params": {"params.yaml": {"data": {"semi": {"enabled": true}, "priors": {"method": "em"}}}}, "metrics": {"m.json": {"data": {"heads": {"a": {"weighted_f1": 0.6}}}}}}, "error": null, "experiments": null}]}]}]''')


def test_rows_and_markdown_show_the_switch_and_the_metric():
    table = rows(EXP_SHOW)
    assert [r.name for r in table] == ["workspace", "master", "no-semi", "kaput-tach"]
    text = markdown(table, metrics=["weighted_f1"])
    lines = text.splitlines()
    assert lines[0] == "| experiment | semi.enabled | heads.a.weighted_f1 |"
    assert "| no-semi | False | 0.5000 |" in lines and "| kaput-tach | True | 0.6000 |" in lines
    assert "| master | True |  |" in lines  # metric missing in that revision: an empty cell
    assert "priors.method" not in text  # same in every row: not a switch of this table
    assert "priors.method" in markdown(table, params=["priors.method"])


def test_mer_report_reads_a_saved_json(tmp_path, capsys):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps(EXP_SHOW))
    assert main(["report", "--json", str(path), "--metric", "weighted_f1"]) in (0, None)
    assert "| no-semi | False | 0.5000 |" in capsys.readouterr().out
