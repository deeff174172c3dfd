"""features.topology (the stage graph `mer status` and `mer predict` use) against dvc.yaml."""
from pathlib import Path

import yaml

from features import topology as pipeline

ROOT = Path(__file__).resolve().parents[2]
ENCODERS = {"hubert": {"input": "artifacts/denoise/denoised"},
            "clip": {"input": "artifacts/faces/faces"},
            "minilm": {"input": "artifacts/asr/transcripts.json"}}


def _dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _paths(entries) -> set[str]:
    """dvc.yaml outs/deps/metrics/plots entries (strings or one-key mappings) as paths."""
    return {e if isinstance(e, str) else next(iter(e)) for e in entries or []}


def _declared(stage: dict) -> set[str]:
    return set().union(*(_paths(stage.get(k)) for k in ("outs", "metrics", "plots")))


def _check(stage: pipeline.Stage, dvc: dict, outputs: dict[str, str]) -> None:
    """stage.output (or its folder) and failures are declared; each upstream output is a dep."""
    declared, deps = _declared(dvc), _paths(dvc.get("deps"))
    assert any(stage.output == p or p.startswith(stage.output + "/") for p in declared), stage
    if stage.failures:
        assert stage.failures in declared or any(stage.failures.startswith(p + "/")
                                                 for p in declared), stage
    for up in stage.upstream:
        if up in outputs:
            out = outputs[up]
            assert out in deps or any(out.startswith(d + "/") for d in deps), (stage.name, up)


def test_media_stages_match_dvc_yaml():
    dvc = _dvc_stages()
    outputs = {s.name: s.output for s in pipeline.MEDIA.values()}
    for stage in pipeline.MEDIA.values():
        _check(stage, dvc[stage.name], outputs)


def test_foreach_stages_match_dvc_yaml_templates():
    dvc = _dvc_stages()
    template = {name: dvc[name]["do"] for name in ("embed", "probe", "train", "ensemble")}
    key = "${key}"
    outputs = {s.name: s.output for s in pipeline.MEDIA.values()}
    outputs.update({f"embed@{key}": f"artifacts/features/{key}",
                    f"probe@{key}": f"artifacts/probe/{key}"})
    # embed reads its encoder's `input` (${item.input}): the upstream is the stage writing it
    assert "${item.input}" in _paths(template["embed"]["deps"])
    _check(pipeline.embed(key, "artifacts/denoise/denoised"), template["embed"], {})
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["embed"]["encoders"]
    for name, enc in params.items():
        up = pipeline.embed(name, enc["input"]).upstream[0]
        assert up == "prepare" or pipeline.MEDIA[up].output == enc["input"].rstrip("/"), name
    _check(pipeline.probe(key), template["probe"], outputs)
    train = pipeline.train(key, [key])
    _check(train, template["train"], {"prepare": pipeline.MANIFEST})
    assert {"artifacts/features", "artifacts/probe"} <= _paths(template["train"]["deps"])
    assert _paths(template["ensemble"]["deps"]) >= {"artifacts/heads"}
    _check(pipeline.ensemble(key, []), template["ensemble"], {})
    assert pipeline.EVALUATE.output in _declared(dvc["evaluate"])


def test_embed_upstream_follows_the_input_and_predict_needs():
    rows = pipeline.per_clip_stages(ENCODERS)
    assert [s.name for s in rows] == ["prepare", "audio", "denoise", "asr", "faces",
                                      "embed@hubert", "embed@clip", "embed@minilm"]
    assert [s.upstream for s in rows[5:]] == [("denoise",), ("faces",), ("asr",)]
    assert pipeline.embed("x", "data/clips.csv").upstream == ("prepare",)
    assert pipeline.needed(["asr"]) == ["audio", "denoise", "asr"]
    assert pipeline.needed(["faces", "denoise"]) == ["audio", "denoise", "faces"]
    assert pipeline.needed(["prepare"]) == []


def test_topology_names_every_dvc_stage_with_its_command():
    """STAGES is dvc.yaml's stage list, in order: each stage's `python -m` module, the arguments
    before any others and, for a foreach stage, its params section and the key after them."""
    dvc = _dvc_stages()
    assert list(dvc) == list(pipeline.STAGES)
    for name, spec in dvc.items():
        entry = pipeline.STAGES[name]
        words = spec.get("do", spec)["cmd"].split()
        key = ["${key}"] if entry.foreach else []
        assert words[:3 + len(entry.args) + len(key)] == [
            "python", "-m", entry.module, *entry.args, *key], name
        assert spec.get("foreach") == (f"${{{entry.foreach}}}" if entry.foreach else None), name
    graph = [*pipeline.MEDIA, pipeline.EVALUATE.name, *(s.split("@")[0] for s in (
        pipeline.embed("k", "").name, pipeline.probe("k").name, pipeline.train("k", []).name,
        pipeline.ensemble("k", []).name))]
    assert set(graph) <= set(pipeline.STAGES)
