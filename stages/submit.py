"""`mer submit --head NAME [--priors em|FILE] OUT.csv`: a challenge submission from a trained head
or ensemble.

One row per unlabelled clip of the manifest (the pool and the test clips: MER2024 scores a
hidden subset of its candidates, so every one is submitted), in the layout MER2024 participants
submit, the most probable class then the six class probabilities:

    name,discrete,neutral,angry,happy,sad,worried,surprise

Nothing is recomputed: the probabilities are those the head or ensemble already wrote for these
clips (`<heads|ensembles>/<name>/predictions.csv`, the mean over its fold models). With
`--priors em` they are corrected to the class priors EM estimates on these clips, after BCTS
calibration on the head's own out-of-fold rows; `--priors FILE` uses the priors you give
(models.unlabelled.priors.reweight, as `mer predict --priors`). With no unlabelled clips the file
holds the header only, and a line says so.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np

from features.errors import MerError
from features.media.manifest import CLASSES
from features.topology import HEADS, MANIFEST
from stages.common import run

ENSEMBLES = "artifacts/ensembles"
HEADER = ("name", "discrete", *CLASSES)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = _predictions(args.head, args.heads, args.ensembles)
    ids, probs = unlabelled_rows(path)
    if not ids:
        write_submission(args.out, ids, probs)
        print(f"mer submit: nothing to submit: {args.head} has no predictions of unlabelled or "
              f"test clips; wrote the header only to {args.out}.", file=sys.stderr)
        _say_missing(args.manifest, set(ids), args.head)
        return 0
    if args.priors:
        probs = _reweighted(probs, args.priors, path)
    write_submission(args.out, ids, probs)
    _say_missing(args.manifest, set(ids), args.head)
    print(f"mer submit: {len(ids)} clips of {args.head} written to {args.out}.", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mer submit", description="Predictions of a trained head or "
                                "ensemble for the manifest's unlabelled and test clips, as a "
                                "MER2024 submission CSV (name,discrete + class probabilities).")
    p.add_argument("out", help="the CSV to write")
    p.add_argument("--head", required=True, help="a trained head or ensemble")
    p.add_argument("--priors", default="", help="prior-shift correction: 'em' (priors estimated "
                   "on the submitted clips) or a JSON/CSV file of class priors")
    p.add_argument("--heads", default=HEADS, help="folder of trained heads")
    p.add_argument("--ensembles", default=ENSEMBLES, help="folder of ensembles")
    p.add_argument("--manifest", default=MANIFEST, help="to name unlabelled clips with no "
                   "prediction (their features failed)")
    return p


def _predictions(name: str, heads: str, ensembles: str) -> Path:
    """The predictions.csv of head or ensemble `name`, or an error listing what is trained."""
    from models.training.bundles import scored

    try:
        found = scored(heads, ensembles)
    except KeyError as err:  # one name is both a head and an ensemble
        raise MerError(str(err.args[0])) from None
    if name not in found:
        have = ", ".join(sorted(found)) or "none"
        raise MerError(f"{name!r} is not a trained head or ensemble (under {heads} and "
                       f"{ensembles}: {have}); run `dvc repro` first or pick one of them.")
    return found[name]


def unlabelled_rows(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """(clip ids, probabilities [N, C]) of the rows of a predictions.csv that are not labelled."""
    from models.training.bundles import read_predictions

    rows = [r for r in read_predictions(path) if r["split"] != "labelled"]
    probs = np.array([[float(r[c]) for c in CLASSES] for r in rows]).reshape(-1, len(CLASSES))
    return [r["clip_id"] for r in rows], probs


def _reweighted(probs: np.ndarray, spec: str, path: Path) -> np.ndarray:
    from models.unlabelled.priors import reweight

    fixed, info = reweight(probs, spec, path)
    print(f"mer submit: priors ({info['method']} over {len(probs)} clips): {info['priors']}",
          file=sys.stderr)
    return fixed


def write_submission(out: str | os.PathLike, ids: list[str], probs: np.ndarray) -> Path:
    """The CSV of the module docstring, written whole or not at all."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        for cid, p in zip(ids, probs):
            w.writerow([cid, CLASSES[int(np.argmax(p))], *(f"{v:.6f}" for v in p)])
    os.replace(tmp, out)
    return out


def _say_missing(manifest: str, have: set[str], name: str) -> None:
    """A line naming the manifest's unlabelled clips with no prediction (a partial submission)."""
    if not Path(manifest).is_file():
        return
    from features.media.manifest import read_manifest

    missing = [c.clip_id for c in read_manifest(manifest) if not c.label and c.clip_id not in have]
    if missing:
        print(f"mer submit: {len(missing)} unlabelled clip(s) of {manifest} have no prediction "
              f"from {name} (e.g. {missing[:3]}): their features failed (`mer status`); they are "
              f"not in the file.", file=sys.stderr)


if __name__ == "__main__":
    run(main)
