"""The pipeline's topology: every stage dvc.yaml runs, and each stage's inputs and outputs.

The one stage list: `STAGES` names each dvc.yaml stage with the module that runs it (the `mer`
subcommands and scripts/dvc_deps.py come from it); `MEDIA` and the functions below give the
outputs and upstream stages that `mer status` (clips per stage) and `mer predict` (which stages a
new clip needs) read. `tests/features/test_topology.py` checks both against dvc.yaml, so they
cannot drift. Foreach stages are templates over a name (``embed@<encoder>``, ``train@<head>``, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

MANIFEST = "artifacts/prepare/manifest.csv"
HEADS = "artifacts/heads"  # one folder per trained head (train@<head>)
ENSEMBLES = "artifacts/ensembles"  # one folder per ensemble (ensemble@<name>)


@dataclass(frozen=True)
class Entry:
    """How dvc.yaml runs a stage: ``python -m <module> <args> ...``; a foreach stage runs once per
    key of the params section `foreach` names, with the key as the first argument after `args`."""

    name: str
    module: str
    args: tuple[str, ...] = ()
    foreach: str = ""  # params section of a foreach stage ("" = one stage)


# every stage of dvc.yaml, in its order
STAGES = {e.name: e for e in (
    Entry("standins", "stages.standins"),  # the demo's random-weight encoders, shared like stores
    Entry("prepare", "stages.prepare"),
    Entry("audio", "stages.audio"),
    Entry("denoise", "stages.denoise"),
    Entry("asr", "stages.asr"),
    Entry("faces", "stages.faces"),
    Entry("embed", "stages.embed", foreach="embed.encoders"),
    Entry("probe", "stages.probe", foreach="embed.encoders"),
    Entry("adapt", "stages.adapt", foreach="adapt"),
    Entry("joint", "stages.joint", foreach="joint"),
    Entry("train", "stages.train", foreach="train.heads"),
    Entry("ensemble", "stages.ensemble", foreach="ensemble"),
    Entry("evaluate", "stages.evaluate"),
    Entry("align", "stages.align"),
    Entry("priors", "stages.priors"),
    Entry("semi_base", "stages.semi", ("base",)),  # round 0 of the self-training rounds
    Entry("semi", "stages.semi", foreach="semi.rounds"),
    Entry("semi_report", "stages.semi_report"),
    Entry("noise", "stages.noise", foreach="noise.conditions"),
    Entry("noise_report", "stages.noise_report"),
)}


@dataclass(frozen=True)
class Stage:
    """One DVC stage: its main output, its failure report and the stages it reads from."""

    name: str
    output: str  # store folder or file (relative to the project root)
    failures: str = ""  # failures.json ("" = the stage writes none)
    upstream: tuple[str, ...] = ()
    per_clip: bool = True  # one result per clip (a store or transcripts): `mer status` counts it


# the fixed stages before the encoders, in run order
MEDIA = {s.name: s for s in (
    Stage("prepare", MANIFEST, "artifacts/prepare/failures.json"),
    Stage("audio", "artifacts/audio/audio", "artifacts/audio/failures.json", ("prepare",)),
    Stage("denoise", "artifacts/denoise/denoised", "artifacts/denoise/failures.json", ("audio",)),
    Stage("asr", "artifacts/asr/transcripts.json", "artifacts/asr/failures.json", ("audio", "denoise")),
    Stage("faces", "artifacts/faces/faces", "artifacts/faces/failures.json", ("prepare",)),
)}


def stage_of(path: str) -> str:
    """The media stage whose output `path` is ("prepare" for a path no stage writes)."""
    path = str(path).rstrip("/")
    return next((s.name for s in MEDIA.values() if s.output == path), "prepare")


def embed(name: str, input_path: str) -> Stage:
    return Stage(f"embed@{name}", f"artifacts/features/{name}",
                 f"artifacts/features/{name}.failures.json", (stage_of(input_path),))


def probe(name: str) -> Stage:
    return Stage(f"probe@{name}", f"artifacts/probe/{name}", "", ("prepare", f"embed@{name}"),
                 per_clip=False)


def train(name: str, encoders: list[str]) -> Stage:
    upstream = ("prepare", *(f"embed@{e}" for e in encoders), *(f"probe@{e}" for e in encoders))
    return Stage(f"train@{name}", f"{HEADS}/{name}", f"{HEADS}/{name}/failures.json",
                 upstream, per_clip=False)


def ensemble(name: str, heads: list[str]) -> Stage:
    return Stage(f"ensemble@{name}", f"{ENSEMBLES}/{name}", "",
                 tuple(f"train@{h}" for h in heads), per_clip=False)


EVALUATE = Stage("evaluate", "results/metrics.json", "", ("train", "ensemble"), per_clip=False)


def per_clip_stages(encoders: Mapping[str, Mapping]) -> list[Stage]:
    """prepare, the media stages and one embed@<encoder> per encoder, in run order."""
    return list(MEDIA.values()) + [embed(n, str(e.get("input", ""))) for n, e in encoders.items()]


def needed(stages: list[str]) -> list[str]:
    """The media stages `stages` need, upstream ones included, in run order (no prepare)."""
    need, todo = set(), list(stages)
    while todo:
        s = todo.pop()
        if s in MEDIA and s != "prepare" and s not in need:
            need.add(s)
            todo.extend(MEDIA[s].upstream)
    return [s for s in MEDIA if s in need]
