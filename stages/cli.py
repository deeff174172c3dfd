"""`mer`: the same stage functions as `dvc repro`, for use outside DVC.

    mer prepare --out artifacts/prepare          any stage dvc.yaml runs, with its arguments
                                                 (stages in features/topology.py; mer STAGE --help)
    mer store inspect artifacts/features/hubert
    mer store prune artifacts                    delete clips stores keep after they left the input
    mer store export STORE --format mertools|npz|parquet [--layers last4] [--level utterance] OUT
    mer store verify PATH... [--json]            check every shard's checksum (exit 1 if damaged)
    mer asr score --reference CSV [--hypotheses FILE] [--language zh|en|auto] [--json]
                                                 corpus CER (Chinese) or WER of the transcripts
    mer status [--json]                          clips per stage: done / failed / pending / blocked
    mer predict VIDEO [VIDEO...] [--head H] [--json] [--priors em|FILE]   emotion + class
                                                 probabilities per video
    mer submit --head H [--priors em|FILE] OUT.csv   MER2024 submission: name,discrete + class
                                                 probabilities of the unlabelled/test clips
    mer metrics [results/metrics.json]           one line per head: weighted F1, accuracy, macro F1
    mer report [--metric weighted_f1]            `dvc exp show` as a Markdown table (ablations)
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from features.errors import MerError
from features.media.manifest import CLASSES
from features.topology import ENSEMBLES, EVALUATE, HEADS, STAGES
from stages.common import guard

TOOLS = ("submit", "store", "status", "predict", "metrics", "report")


def _stage(name: str, argv: list[str]) -> None:
    """`mer <stage>`: the entry dvc.yaml runs for it, with the arguments dvc.yaml puts first."""
    entry = STAGES[name]
    importlib.import_module(entry.module).main([*entry.args, *argv])


def _inspect(argv: list[str]) -> None:
    from features.storage.store import StoreReader
    p = argparse.ArgumentParser(prog="mer store inspect", description="What a store holds.")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = p.parse_args(argv)
    with StoreReader(args.path) as store:
        info = store.summary()
    if args.json:
        print(json.dumps(info, indent=1))
        return
    print(f"{info['path']}: {info['kind']} store (code {info['code_version']}), {info['clips']} clips, "
          f"{info['bytes'] / 1e6:.1f} MB" + (f", {info['kept']} kept (`mer store prune`)"
                                            if info["kept"] else ""))
    if "pooled" in info:
        pooled = info["pooled"]
        print(f"  pooled: {pooled['layers']} layers x {pooled['dim']} dims, {pooled['dtype']}")
    if "per_clip" in info:
        print(f"  per clip: e.g. shape {info['per_clip']['example_shape']}, "
              f"{info['per_clip']['dtype']}")
    for key, value in info["meta"].items():
        print(f"  {key}: {json.dumps(value) if not isinstance(value, str) else value}")


def _prune(argv: list[str]) -> None:
    from pathlib import Path
    from features.audio.stages import TRANSCRIPTS_FILE
    from features.reliability.reports import read_json, write_json_atomic
    from features.storage.store import INDEX, prune
    p = argparse.ArgumentParser(prog="mer store prune", description="Delete the clips a store "
                                "(or transcripts.json) keeps although its stage's input no "
                                "longer has them.")
    p.add_argument("paths", nargs="+", help="stores, transcripts.json, or folders searched for both")
    args = p.parse_args(argv)
    for path in map(Path, args.paths):
        found = [path] if (path / INDEX).is_file() or path.is_file() else sorted(
            [i.parent for i in path.rglob(INDEX) if ".ranks" not in i.parts]
            + list(path.rglob(TRANSCRIPTS_FILE)))
        if not found:
            raise MerError(f"no store or {TRANSCRIPTS_FILE} at or under {path}.")
        for item in found:
            if item.is_file():  # transcripts: drop the kept entries
                data = read_json(item)
                n, data["kept"] = len(data.get("kept", {})), {}
                write_json_atomic(item, data)
            else:
                n = prune(item)
            print(f"{item}: {n} kept clip(s) deleted")


def _export(argv: list[str]) -> None:
    from features.storage.export import FORMATS, LEVELS, REDUCES, export_store
    p = argparse.ArgumentParser(prog="mer store export", description="An embedding store's "
                                "features as MERTools' per-clip .npy folder, one .npz or one .parquet.")
    p.add_argument("store", help="embedding store, e.g. artifacts/features/hubert")
    p.add_argument("out", help="folder (mertools) or file (npz, parquet)")
    p.add_argument("--format", choices=FORMATS, default="mertools")
    p.add_argument("--layers", default="last4", help="last4 (default), last<N>, all, or indices "
                   "such as 12,13 or 21-24, negative ones as --layers=-1 (hidden state 0 = the "
                   "embeddings output)")
    p.add_argument("--reduce", choices=REDUCES, default="sum",
                   help="how the chosen layers combine: sum (MERTools' last4, default) or mean")
    p.add_argument("--level", choices=LEVELS, default="utterance")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = p.parse_args(argv)
    info = export_store(args.store, args.out, args.format, args.layers, args.level, args.reduce,
                        args.force)
    print(f"exported {info['clips']} clips ({info['level']}, {info['reduce']} of hidden states "
          f"{info['layers']}) as {info['format']} to {info['out']}")


def _status(argv: list[str]) -> None:
    from features.status import format_status, pipeline_status
    from stages.common import load_params
    p = argparse.ArgumentParser(prog="mer status", description="Clips per stage, from the outputs.")
    p.add_argument("--root", default=".", help="project root (default: .)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--json", action="store_true", help="print JSON with the clip ids")
    args = p.parse_args(argv)
    encoders = load_params("embed.encoders", f"{args.root}/{args.params}")
    rows = pipeline_status(args.root, encoders)
    if args.json:
        print(json.dumps([{"stage": r.stage, "done": len(r.done), "failed": r.failed,
                           "pending": sorted(r.pending), "blocked": sorted(r.blocked)}
                          for r in rows], indent=1))
    else:
        print(format_status(rows))


def _predict(argv: list[str]) -> int:
    import yaml
    from dataclasses import asdict
    from stages.common import setup
    setup()  # the stages' offline mode and logging: the same features as training, no downloads
    from models.predict import predict_videos
    p = argparse.ArgumentParser(prog="mer predict", description="Emotion of new videos with a "
                                "trained head or ensemble (run `dvc repro` first).")
    p.add_argument("videos", nargs="+")
    p.add_argument("--head", default="", help="trained head or ensemble (default: evaluate.main_head)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--heads", default=HEADS, help="folder of trained heads")
    p.add_argument("--ensembles", default=ENSEMBLES, help="folder of ensembles")
    p.add_argument("--work", default="artifacts/predict", help="cache folder for the new clips")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--priors", default="", help="prior-shift correction: 'em' (priors estimated "
                   "on these videos; use many) or a JSON/CSV file of class priors")
    args = p.parse_args(argv)
    params = yaml.safe_load(open(args.params))
    head = args.head or params.get("evaluate", {}).get("main_head", "")
    preds = predict_videos(args.videos, params, args.heads, head, args.work, args.priors,
                           args.ensembles)
    if args.json:
        print(json.dumps([{k: v for k, v in asdict(r).items() if v != "" and v != {}}
                          for r in preds], indent=1))
    else:
        width = max(len(r.video) for r in preds)
        print(f"{'video':<{width}} {'emotion':<9} " + " ".join(f"{c[:7]:>7}" for c in CLASSES))
        for r in preds:
            if r.error:
                continue
            print(f"{r.video:<{width}} {r.emotion:<9} " +
                  " ".join(f"{r.probabilities[c]:>7.3f}" for c in CLASSES))
    for r in preds:
        if r.error:
            print(f"mer predict: {r.error}", file=sys.stderr)
    return 1 if all(r.error for r in preds) else 0


def _metrics(argv: list[str]) -> None:
    from models.training.stage import read_metrics
    p = argparse.ArgumentParser(prog="mer metrics", description="Out-of-fold metrics per head.")
    p.add_argument("path", nargs="?", default=EVALUATE.output)
    args = p.parse_args(argv)
    try:
        metrics = read_metrics(args.path)
    except FileNotFoundError:
        raise MerError(f"{args.path} does not exist; run `dvc repro` (or `mer evaluate`) first.")
    w = max([16, *(len(h) for h in metrics["heads"])])
    print(f"{'head':<{w}} {'type':<18} {'clips':>5} {'wF1':>6} {'acc':>6} {'macroF1':>7}")
    for head, m in sorted(metrics["heads"].items(), key=lambda kv: -kv[1]["weighted_f1"]):
        mark = "  <- main" if head == metrics.get("main_head") else ""
        print(f"{head:<{w}} {m.get('type', '?'):<18} {m['clips']:>5} {m['weighted_f1']:>6.3f} "
              f"{m['accuracy']:>6.3f} {m['macro_f1']:>7.3f}{mark}")


def _report(argv: list[str]) -> None:
    from models.evaluation.report import exp_show, markdown, rows
    p = argparse.ArgumentParser(prog="mer report", description="`dvc exp show` as a Markdown "
                                "table: the ablation table (see models/evaluation/report.py).")
    p.add_argument("--json", default="", help="a saved `dvc exp show --json` (default: run it)")
    p.add_argument("--param", action="append", default=[], help="param column (repeatable; "
                   "default: the params that differ between rows)")
    p.add_argument("--metric", action="append", default=[], help="metric columns whose path "
                   "contains this (repeatable; default: every metric)")
    args = p.parse_args(argv)
    data = json.load(open(args.json)) if args.json else exp_show()
    print(markdown(rows(data), args.param, args.metric))


def _verify(argv: list[str]) -> int:
    from features.storage.verify import main as verify
    return verify(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: mer {{{','.join([*STAGES, *TOOLS])}}} ..."
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\n" + usage)
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        return guard(lambda: _command(cmd, rest, usage), f"mer {cmd}")
    except BrokenPipeError:  # `mer metrics | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0


def _command(cmd: str, rest: list[str], usage: str) -> int | None:
    if cmd == "asr" and rest[:1] == ["score"]:  # a tool under the asr stage's name
        return importlib.import_module("stages.asr_score").main(rest[1:])
    if cmd in STAGES:
        return _stage(cmd, rest)
    tools = {"predict": _predict, "status": _status, "metrics": _metrics, "report": _report,
             "submit": lambda argv: importlib.import_module("stages.submit").main(argv)}
    if cmd in tools:
        return tools[cmd](rest)
    store = {"inspect": _inspect, "prune": _prune, "export": _export, "verify": _verify}
    if cmd == "store" and rest[:1] and rest[0] in store:
        return store[rest[0]](rest[1:])
    print(f"mer: unknown command {' '.join([cmd, *rest[:1]])!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
