"""One in-process runner of the per-clip stages: the media stages and embed@<encoder>, as DVC runs them.

`mer predict` (new videos) and the noise evaluation (noisy copies) need these stages on clips outside
the corpus, without `dvc repro`. Both run them here: the stage functions that stages/*.py call, with
the params.yaml sections read into the same config dataclasses, in topology order (features/topology.py),
into a work folder laid out like the project's artifacts/ (``artifacts/x`` -> ``<work>/x``). Every
store is a per-clip cache, as in the pipeline, so a second run computes only what is new.

Callers that evaluate variants change a stage's settings (`overrides`: keys of its params section),
where it writes (`folders`) or hand in an output made elsewhere (`given`, which then is not run).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from features import topology
from features.audio.asr import AsrConfig
from features.audio.denoise import DenoiseConfig
from features.audio.stages import denoise_audio, transcribe_audio
from features.embedding.stage import embed_store
from features.encoders import EncoderConfig
from features.errors import MerError
from features.media.faces import FacesConfig
from features.media.manifest import Clip, read_manifest, write_manifest
from features.media.stages import AudioConfig, crop_faces, extract_audio
from features.params import from_section
from features.reliability.reports import read_json

MANIFEST = "manifest.csv"  # where a clip list given instead of a manifest is written, in the work folder
EMBED = "embed@"

# params.yaml section -> config dataclass of each media stage (embed@<encoder>: EncoderConfig)
CONFIGS: dict[str, type] = {"audio": AudioConfig, "denoise": DenoiseConfig, "asr": AsrConfig,
                            "faces": FacesConfig}

Outputs = dict[str, Path]
# Each media stage as its stages/<name>.py calls it: (manifest, config, outputs so far, out folder).
MEDIA_STAGES: dict[str, Callable[[Path, Any, Outputs, Path], Path]] = {
    "audio": lambda manifest, cfg, up, out: extract_audio(manifest, cfg, out),
    "denoise": lambda manifest, cfg, up, out: denoise_audio(up["audio"], cfg, out),
    "asr": lambda manifest, cfg, up, out: transcribe_audio(up["denoise"], cfg, out, up["audio"]),
    "faces": lambda manifest, cfg, up, out: crop_faces(manifest, cfg, out),
}


@dataclass
class StageRun:
    """What one run left behind."""

    paths: Outputs = field(default_factory=dict)  # stage -> its store folder or transcripts.json
    failed: dict[str, str] = field(default_factory=dict)  # clip id -> "<stage>: <why>", first failure


def run_stages(manifest: str | os.PathLike | list[Clip], params: Mapping, work: str | os.PathLike,
               stages: Iterable[str] = (), encoders: Iterable[str] = (), *,
               overrides: Mapping[str, Mapping] | None = None,
               folders: Mapping[str, str | os.PathLike] | None = None,
               given: Mapping[str, str | os.PathLike] | None = None,
               keep_going: bool = False) -> StageRun:
    """Run the media `stages`, embed@<name> for each of `encoders` and the media stages they read
    from, in topology order; return every output (the `given` ones included) and the failed clips.

    manifest: a manifest file, or clips to write to ``<work>/manifest.csv`` first.
    overrides: stage ("denoise", "embed@hubert") -> keys replacing those of its params section
      (nested mappings merge key by key).
    folders: stage -> the out folder its stage function gets (a media stage) or its store (embed@),
      instead of the pipeline's place in `work`.
    given: stage -> its output, made elsewhere: not run, and its upstream stages are not needed.
    keep_going: a stage that stops with a MerError fails every clip and the next stages still run
      (default: the error propagates). Clips in a stage's failures.json are in `failed` either way.
    """
    unknown = sorted(set(stages) - set(MEDIA_STAGES) - {"prepare"})
    if unknown:
        raise ValueError(f"unknown media stage(s) {unknown}; known: {sorted(MEDIA_STAGES)}")
    work, overrides, folders = Path(work), overrides or {}, folders or {}
    manifest, clip_ids = _manifest(manifest, work)
    run = StageRun({s: Path(p) for s, p in (given or {}).items()})
    embeds = {f"{EMBED}{n}": _config(f"{EMBED}{n}", params, overrides) for n in encoders}
    inputs = {s: topology.stage_of(c.input) for s, c in embeds.items()}
    media = topology.needed([s for s in (*stages, *inputs.values()) if s not in run.paths])
    for stage in (s for s in media if s not in run.paths):
        folder = Path(folders.get(stage, _in_work(work, topology.MEDIA[stage].output).parent))
        run.paths[stage] = folder / Path(topology.MEDIA[stage].output).name  # even if it fails
        _step(run, stage, folder / "failures.json", clip_ids, keep_going,
              lambda: MEDIA_STAGES[stage](manifest, _config(stage, params, overrides), run.paths, folder))
    for stage, cfg in embeds.items():
        name = stage[len(EMBED):]
        out = Path(folders.get(stage, _in_work(work, topology.embed(name, cfg.input).output)))
        src = run.paths[inputs[stage]] if inputs[stage] != "prepare" else cfg.input
        run.paths[stage] = out
        _step(run, stage, out.with_name(f"{out.name}.failures.json"), clip_ids, keep_going,
              lambda: embed_store(name, cfg, src, out))
    return run


def _in_work(work: Path, path: str) -> Path:
    """Where a pipeline path lies in the work folder (artifacts/x -> work/x)."""
    return work / path.split("/", 1)[1]


def _manifest(manifest: str | os.PathLike | list[Clip], work: Path) -> tuple[Path, Callable[[], list[str]]]:
    """The manifest file, and the ids of its clips (read only when a stage stops: keep_going)."""
    if isinstance(manifest, (str, os.PathLike)):
        return Path(manifest), lambda: [c.clip_id for c in read_manifest(manifest)]
    clips = list(manifest)
    write_manifest(work / MANIFEST, clips)
    return work / MANIFEST, lambda: [c.clip_id for c in clips]


def _config(stage: str, params: Mapping, overrides: Mapping[str, Mapping]) -> Any:
    """The stage's config dataclass from its params section, as stages/<stage>.py reads it."""
    if stage.startswith(EMBED):
        name = stage[len(EMBED):]
        cls, section, where = EncoderConfig, params["embed"]["encoders"][name], f"embed.encoders.{name}"
    else:
        cls, section, where = CONFIGS[stage], params[stage], stage
    return from_section(cls, _merged(section, overrides.get(stage, {})), where)


def _merged(base: Mapping | None, patch: Mapping) -> dict:
    out = dict(base or {})
    for key, value in patch.items():
        nested = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = _merged(out[key], value) if nested else value
    return out


def _step(run: StageRun, stage: str, report: Path, clip_ids: Callable[[], list[str]], keep_going: bool,
          call: Callable[[], Path]) -> None:
    """Run one stage; its per-clip failures (or, if it stopped and we keep going, every clip's) join
    `run.failed`."""
    try:
        run.paths[stage] = Path(call())
    except MerError as err:
        if not keep_going:
            raise
        for cid in clip_ids():
            run.failed.setdefault(cid, f"{stage}: {err}")
        return
    if report.is_file():
        for f in read_json(report)["failures"]:
            run.failed.setdefault(f["clip_id"], f"{stage}: {f['reason']}: {f['message']}")
