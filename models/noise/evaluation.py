"""Evaluation under noise: one condition's copies through the media stages and the trained heads.

For a condition (`noise@<name>`): make the noisy copies, run audio, faces, every denoise backend of
`noise.denoise`, ASR on each denoised store (with the decoder's confidence), ASR enhancement (per
clip, the most confident of the raw-audio and the denoised hypothesis; `features.audio.asr.select_hypothesis`),
the encoders the scored heads read, then score each head per variant. Variants: a denoise backend
(`none`, `deepfilternet`, `mossformer2`), and `<backend>+enh` where the text encoders read the
enhanced transcripts. Every store under the condition's folder is a per-clip cache. Audio, denoise,
faces and the encoders run through `features.runner` (the DVC stages' code, each variant in its
own folder); ASR is this module's own: scored hypotheses, so the enhancement can select per clip.

Heads are the ones trained on clean clips, and the copies are noisy versions of their labelled
training clips, so a copy is scored out-of-fold: only by the fold model that held its source clip
out (`lineage.csv` source, the head's predictions.csv `fold`), never by the fold mean, whose other
fold models trained on the clean version of that clip. Copies whose source no fold held out
(unlabelled, or not in the head's training) are not scored.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Mapping

import numpy as np

from features.audio.error_rate import UNIT_NAMES, UNITS, unit_for
from features.audio.asr import (AsrConfig, Hypothesis, load_backend, load_transcripts_csv, select_hypothesis,
                          transcribe_scored, wer)
from features.audio.asr_enhance import rewrite_all
from features.reliability.clips import for_each_clip
from features.params import as_dict, from_section
from features.runner import run_stages
from features.storage.dataset import FeatureSet
from features.audio.denoise import DenoiseConfig
from features.errors import MerError
from features.audio.stages import asr_fingerprint
from features.media.manifest import read_manifest
from features.noise.mixing import ConditionConfig
from features.noise.copies import NoiseConfig, condition_config, make_copies, read_lineage
from features.reliability.reports import FailureReport, read_json, write_json_atomic
from features.storage.store import StoreReader, clip_key
from models.evaluation.metrics import compute_metrics

SCORES = "scores.json"
ENHANCED = "+enh"
REWRITTEN = "+enh+llm"  # the enhanced transcripts rewritten by asr.enhance.rewrite


def run_condition(name: str, cfg: NoiseConfig, params: Mapping, manifest: str | os.PathLike,
                  heads_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Everything for one condition; writes `<out>/scores.json` and returns it."""
    cond = condition_config(cfg, name)
    out, work = Path(out_dir), Path(out_dir) / "work"
    copies = make_copies(manifest, name, cfg, work / "copies")
    clips = read_manifest(copies)
    heads = {h: _load_head(Path(heads_dir) / h) for h in cfg.heads}
    encoders = sorted({n for p in heads.values() for n in p.cfg.features})
    audio = run_stages(copies, params, work, ["audio"]).paths["audio"]
    backends = _denoise(copies, audio, cfg, params, work)
    texts = _transcripts(backends, cfg, params, work) if _needs_text(encoders, params) else {}
    faces = run_stages(copies, params, work, ["faces"]).paths["faces"] \
        if _needs(encoders, params, "faces") else None
    variants = {b: b for b in backends} | {v: _backend_of(v) for v in texts if v not in backends}
    views = {v: _embed_variant(copies, v, b, encoders, params, {"audio": audio, "faces": faces},
                               backends, texts, work) for v, b in variants.items()}
    language = params.get("asr", {}).get("language", "en")
    refs = load_transcripts_csv(cfg.reference, language, key="noise.reference") if cfg.reference else {}
    lineage = read_lineage(work / "copies/lineage.csv")
    result = {"condition": name, "snr_db": cond.nominal_snr() if cond.noise != "none" else None,
              "noise": cond.noise, "clips": len(clips), "recipe": as_dict(cond),
              "wf1": _score(heads, views, clips, Path(heads_dir), lineage),
              "wer": _wers(texts, refs, lineage),
              # cer on Chinese references, wer on space-delimited ones: the unit of "wer" values
              "wer_unit": unit_for(refs.values(), language if language in UNITS else "auto") if refs else None}
    write_json_atomic(out / SCORES, result)
    return result


def _backend_of(variant: str) -> str:
    return variant.split("+", 1)[0]


def _load_head(path: Path):
    from models.predict import load_head

    return load_head(path)


def _input_stage(enc: Mapping) -> str:
    """Which media stage feeds an encoder: audio, denoise, asr or faces (by its `input` path)."""
    from features.topology import MEDIA, stage_of

    stage = stage_of(str(enc.get("input", "")))
    if stage != "prepare":
        return stage
    raise MerError(f"an encoder reads {enc.get('input')!r}, which no media stage writes; noise "
                   f"evaluation needs encoders fed by "
                   f"{[s.output for s in MEDIA.values() if s.name != 'prepare']}.")


def _needs(encoders: list[str], params: Mapping, stage: str) -> bool:
    return any(_input_stage(params["embed"]["encoders"][n]) == stage for n in encoders)


def _needs_text(encoders: list[str], params: Mapping) -> bool:
    return _needs(encoders, params, "asr")


def _denoise(copies: Path, audio: Path, cfg: NoiseConfig, params: Mapping, work: Path) -> dict[str, Path]:
    """backend -> denoised store (params.yaml `denoise` with that backend; the model only for the
    configured backend). mossformer2 without its weights is skipped with a message."""
    base = from_section(DenoiseConfig, params["denoise"], "denoise")
    out = {}
    for backend in cfg.denoise:
        model = base.model if backend == base.backend else ""
        try:
            out[backend] = run_stages(copies, params, work, ["denoise"], given={"audio": audio},
                                      overrides={"denoise": {"backend": backend, "model": model}},
                                      folders={"denoise": work / f"denoise_{backend}"}).paths["denoise"]
        except MerError as err:
            if backend != "mossformer2":
                raise
            print(f"[noise] denoise backend mossformer2 skipped: {err}")
    return out


def _transcripts(backends: dict[str, Path], cfg: NoiseConfig, params: Mapping, work: Path) -> dict[str, Path]:
    """variant -> transcripts.json (the asr stage's format): one per backend, plus `+enh`."""
    asr = from_section(AsrConfig, params["asr"], "asr")
    asr = replace(asr, transcripts_csv="")  # copies are never in the user CSV
    hyps = {b: scored_transcripts(store, asr, work / f"asr_{b}") for b, store in backends.items()}
    out = {b: _write_texts(work / f"asr_{b}" / "transcripts.json", {c: h for c, h in hs.items()}, b)
           for b, hs in hyps.items()}
    if cfg.enhance and "none" in hyps:
        for b in (b for b in hyps if b != "none"):
            chosen = {c: select_hypothesis([hyps["none"][c], hyps[b][c]])
                      for c in hyps[b] if c in hyps["none"]}
            out[f"{b}{ENHANCED}"] = _write_texts(work / f"asr_{b}{ENHANCED}" / "transcripts.json", chosen,
                                                 f"{b}{ENHANCED}")
            if asr.enhance.rewrite.on:  # the optional LLM step after the selection: its own variant
                cases = {c: (list(dict.fromkeys([hyps["none"][c].text, hyps[b][c].text])), h.text)
                         for c, h in chosen.items()}
                done = rewrite_all(cases, asr.enhance.rewrite, work / f"asr_{b}{REWRITTEN}" / "rewrites.json")
                llm = {c: replace(h, text=done[c]["text"]) for c, h in chosen.items()}
                out[f"{b}{REWRITTEN}"] = _write_texts(work / f"asr_{b}{REWRITTEN}" / "transcripts.json", llm,
                                                      f"{b}{REWRITTEN}")
    return out


def scored_transcripts(store: Path, cfg: AsrConfig, out: Path) -> dict[str, Hypothesis]:
    """ASR with confidence for every clip of an audio store, cached by (audio key, ASR fingerprint)."""
    path = out / "scored.json"
    old = read_json(path)["hypotheses"] if path.is_file() else {}
    fp, failures, hyps = asr_fingerprint(cfg), FailureReport(f"asr[{out.name}]"), {}
    with StoreReader(store, kind="audio") as src:
        keys = {cid: clip_key("asr-scored", src.keys[cid], fp) for cid in src.ids}
        hyps = {cid: old[cid] for cid, k in keys.items() if old.get(cid, {}).get("key") == k}
        todo = [cid for cid in src.ids if cid not in hyps]
        backend = load_backend(cfg) if todo else None

        def work(cid, _):
            hyps[cid] = {**asdict(transcribe_scored(backend, src.get(cid), cid, out.name)), "key": keys[cid]}
        save = lambda: write_json_atomic(path, {"hypotheses": hyps})  # noqa: E731
        for_each_clip(((c, None) for c in todo), work, failures, f"asr[{out.name}]", total=len(todo),
                      checkpoint=save, reused=len(hyps))
    save()
    failures.write(out / "failures.json")
    return {cid: Hypothesis(h["text"], h["avg_logprob"], h["source"]) for cid, h in hyps.items()}


def _write_texts(path: Path, hyps: dict[str, Hypothesis], variant: str) -> Path:
    texts = {c: {"text": h.text, "source": h.source, "avg_logprob": h.avg_logprob,
                 "key": clip_key("noise-asr", variant, h.text)} for c, h in hyps.items()}
    return write_json_atomic(path, {"asr": {"variant": variant}, "transcripts": texts})


def _embed_variant(copies: Path, variant: str, backend: str, encoders: list[str], params: Mapping,
                   media: dict[str, Path | None], denoised: dict[str, Path], texts: dict[str, Path],
                   work: Path) -> dict[str, Path]:
    """encoder -> store for one variant, at features/<its input's tag>/<encoder>: stores are shared
    between variants with the same input. `media`: the audio and faces stores (None: not made)."""
    given = {**media, "denoise": denoised[backend], "asr": texts.get(variant)}
    tags = {"audio": "audio", "denoise": f"denoise_{backend}", "asr": f"asr_{variant}", "faces": "faces"}
    folders = {f"embed@{n}": work / "features" / tags[_input_stage(params["embed"]["encoders"][n])] / n
               for n in encoders}
    run = run_stages(copies, params, work, encoders=encoders, folders=folders,
                     given={s: p for s, p in given.items() if p is not None})
    return {n: run.paths[f"embed@{n}"] for n in encoders}


def _score(heads: dict, views: dict[str, dict[str, Path]], clips, heads_dir: Path,
           copy_lineage: list[dict]) -> dict[str, dict[str, dict]]:
    """head -> variant -> {wf1, n}: weighted F1 of the head's out-of-fold predictions on the
    copies (`out_of_fold`). The copies' stores must be computed as the head's training features
    were (lineage check)."""
    from features.cache import lineage
    from models.training.bundles import read_meta
    from models.training.train_config import CLASSES

    source = {r["clip_id"]: r["source_id"] for r in copy_lineage}
    label = {c.clip_id: c.label for c in clips}
    out: dict[str, dict[str, dict]] = {}
    for head, predictor in heads.items():
        held = held_out_by(heads_dir / head)
        for variant, view in views.items():
            with tempfile.TemporaryDirectory() as td:  # the folder layout HeadPredictor reads
                for name, store in view.items():
                    os.symlink(store.resolve(), Path(td) / name)
                lineage.check(read_meta(heads_dir / head).get("lineage"), td, predictor.cfg.features,
                              f"head {head!r}")
                with FeatureSet(td) as features:
                    ids = features.common_ids(predictor.cfg.features, [c.clip_id for c in clips])
                    scored, probs = out_of_fold(predictor, features, ids, source, held)
            if not scored:
                continue
            y = np.array([CLASSES.index(label[c]) for c in scored])
            out.setdefault(head, {})[variant] = {"wf1": compute_metrics(y, probs)["weighted_f1"],
                                                 "n": len(scored)}
    return out


def held_out_by(head_dir: str | os.PathLike) -> dict[str, int]:
    """clip -> the fold model that held it out in training (predictions.csv `fold`, labelled rows)."""
    from models.training.bundles import PREDICTIONS, read_predictions

    return {r["clip_id"]: int(r["fold"]) for r in read_predictions(Path(head_dir) / PREDICTIONS)
            if r["split"] == "labelled"}


def out_of_fold(predictor, features: FeatureSet, ids: list[str], source: Mapping[str, str],
                held: Mapping[str, int]) -> tuple[list[str], np.ndarray]:
    """(scored ids, [N, C]): each copy in `ids` whose source clip (`source[copy]`) a fold held out,
    with the probabilities of that fold's model alone, which never trained on the source clip
    (`held`: `held_out_by`). A model that trained on a clip's label never scores its copies."""
    from models.training.train_config import CLASSES

    scored = [c for c in ids if source.get(c) in held]
    if not scored:
        return [], np.zeros((0, len(CLASSES)))
    per_fold = predictor.predict_folds(features, scored)  # [F, N, C]
    fold = np.array([held[source[c]] for c in scored])
    if fold.max() >= len(per_fold):
        raise MerError(f"predictions.csv names fold {int(fold.max())}, the head has {len(per_fold)} "
                       f"fold models; retrain the head (`dvc repro train`).")
    return scored, per_fold[fold, np.arange(len(scored))]


def _wers(texts: dict[str, Path], refs: dict[str, str], lineage: list[dict]) -> dict[str, float]:
    """variant -> corpus WER of its transcripts against the reference of each copy's source clip."""
    if not refs:
        return {}
    source = {r["clip_id"]: r["source_id"] for r in lineage}
    out = {}
    for variant, path in texts.items():
        hyps = {source[c]: t["text"] for c, t in read_json(path)["transcripts"].items() if c in source}
        if set(hyps) & set(refs):
            out[variant] = round(wer(refs, hyps), 4)
    return out


__all__ = ["run_condition", "scored_transcripts", "held_out_by", "out_of_fold", "ConditionConfig"]


# ---------------------------------------------------------------- report over conditions

CLEAN_PLOT_DB = 40.0  # where the clean condition sits on the SNR axis of the plots


def report(scores_dir: str | os.PathLike, conditions: list[str], out_dir: str | os.PathLike) -> dict:
    """metrics.json ({condition: {snr_db, wf1: {head: {variant: v}}, wer: {variant: v}}}), long-format
    rows for DVC plots (wf1.json, wer.json) and PNG line charts against SNR."""
    out = Path(out_dir)
    scores = {c: read_json(Path(scores_dir) / c / SCORES) for c in conditions}
    metrics = {c: {"snr_db": s["snr_db"], "noise": s["noise"], "clips": s["clips"],
                   "wf1": {h: {v: r["wf1"] for v, r in vs.items()} for h, vs in s["wf1"].items()},
                   "wer": s["wer"], "wer_unit": s.get("wer_unit") or "wer"} for c, s in scores.items()}
    x = {c: CLEAN_PLOT_DB if m["snr_db"] is None else m["snr_db"] for c, m in metrics.items()}
    f1_rows = [{"snr_db": x[c], "condition": c, "series": f"{h}/{v}", "wf1": f}
               for c, m in metrics.items() for h, vs in m["wf1"].items() for v, f in vs.items()]
    wer_rows = [{"snr_db": x[c], "condition": c, "series": v, "wer": w, "unit": m["wer_unit"]}
                for c, m in metrics.items() for v, w in m["wer"].items()]
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(out / "wf1.json", sorted(f1_rows, key=lambda r: (r["series"], r["snr_db"])))
    write_json_atomic(out / "wer.json", sorted(wer_rows, key=lambda r: (r["series"], r["snr_db"])))
    _plot(f1_rows, "wf1", "weighted F1", out / "wf1_vs_snr.png")
    units = sorted({m["wer_unit"] for m in metrics.values()}) or ["wer"]
    _plot(wer_rows, "wer", " / ".join(UNIT_NAMES[u] for u in units), out / "wer_vs_snr.png")
    return metrics


def _plot(rows: list[dict], key: str, label: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for series in sorted({r["series"] for r in rows}):
        pts = sorted((r["snr_db"], r[key]) for r in rows if r["series"] == series)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=series)
    ax.set_xlabel(f"SNR (dB); clean plotted at {CLEAN_PLOT_DB:g}")
    ax.set_ylabel(label)
    if rows:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
