"""`mer asr score`: the corpus error rate of the pipeline's transcripts against reference transcripts.

    mer asr score --reference CSV [--hypotheses FILE] [--language zh|en|auto] [--to-simplified] [--json]

The reference is a CSV `name,text`, or MER's `name,chinese,english` (the column of `--language`;
with `auto`, the column of the script most hypotheses are written in). The hypotheses are the
asr stage's transcripts.json (default; clips whose text came from `asr.transcripts_csv` are left
out: they are not ASR output) or a CSV `name,text`. Chinese is scored in characters
(unit `cer`), space-delimited languages in words (`wer`); features/audio/error_rate.py says how.
MER2024: `mer asr score --reference /data/mer2024/transcription.csv --language zh`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from features.audio.asr import load_transcripts_csv
from features.audio.error_rate import LANGUAGES, UNIT_NAMES, error_rate, unit_for
from features.audio.stages import read_transcripts
from features.errors import MerError
from stages.common import run

DEFAULT_HYPOTHESES = "artifacts/asr/transcripts.json"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    check_reference(Path(args.reference))  # the required file first
    hyps, given = read_hypotheses(Path(args.hypotheses), args.language)
    column = args.language if args.language != "auto" else script_of(hyps.values())
    refs = load_transcripts_csv(args.reference, column, key="--reference")
    result = score(refs, hyps, args.language, args.to_simplified, args.reference, args.hypotheses)
    result["given_by_csv"] = given
    print(json.dumps(result) if args.json else describe(result))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mer asr score", description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", required=True, help="CSV name,text or MER's name,chinese,english")
    p.add_argument("--hypotheses", default=DEFAULT_HYPOTHESES,
                   help=f"the asr stage's transcripts.json or a CSV name,text (default {DEFAULT_HYPOTHESES})")
    p.add_argument("--language", choices=LANGUAGES, default="auto",
                   help="zh: character error rate and the `chinese` column; en: word error rate and "
                        "the `english` column; auto (default): both chosen by the texts' script")
    p.add_argument("--to-simplified", action="store_true",
                   help="map Traditional to Simplified Chinese in both texts first (needs opencc)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def read_hypotheses(path: Path, language: str) -> tuple[dict[str, str], int]:
    """(clip -> ASR text, clips left out because asr.transcripts_csv gave their text) from
    transcripts.json (an empty text counts: all deletions) or a CSV."""
    if not path.is_file():
        raise MerError(f"--hypotheses: {path} does not exist. Run the asr stage first (`dvc repro asr`), "
                       "or pass --hypotheses with a CSV name,text of your ASR's output.")
    if path.suffix.lower() != ".json":
        return load_transcripts_csv(path, language, key="--hypotheses"), 0
    try:
        entries = read_transcripts(path)
        asr = {clip: e["text"] for clip, e in entries.items() if e.get("source") != "csv"}
        return asr, len(entries) - len(asr)
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise MerError(f"--hypotheses: {path} is not the asr stage's transcripts.json ({type(err).__name__}: "
                       f"{err}). Give that file, or a CSV name,text.") from err


def check_reference(path: Path) -> None:
    if not path.is_file():
        raise MerError(f"--reference: {path} does not exist. Give the CSV of what each clip says "
                       "(name,text, or MER's name,chinese,english such as MER2024's transcription.csv).")


def script_of(texts) -> str:
    """zh when CJK characters are most of the texts' tokens, else en (picks MER's CSV column)."""
    return "zh" if unit_for(texts, "auto") == "cer" else "en"


def score(refs: dict[str, str], hyps: dict[str, str], language: str, simplified: bool,
          ref_path: str, hyp_path: str) -> dict:
    """The result as one JSON-able dict: unit, rate, clips, the missing clips on either side."""
    try:
        result = error_rate(refs, hyps, language, simplified)
    except ValueError:
        raise MerError(f"no clip is in both {ref_path} ({len(refs)} clips, e.g. {_first(refs)}) and "
                       f"{hyp_path} ({len(hyps)} ASR clips, e.g. {_first(hyps)}). The reference's `name` "
                       "column must hold the clip ids (video file names without extension); clips "
                       "transcribed from asr.transcripts_csv are not ASR output: run asr without it "
                       "to score the ASR on them.") from None
    return {**result.as_dict(), "language": language,
            "missing_hypotheses": len(set(refs) - set(hyps)),  # reference clips ASR has no text for
            "missing_references": len(set(hyps) - set(refs)),  # transcribed clips without a reference
            "reference": str(ref_path), "hypotheses": str(hyp_path)}


def describe(r: dict) -> str:
    return "\n".join([
        f"unit     {r['unit']} ({UNIT_NAMES[r['unit']]})",
        f"rate     {r['rate']:.4f}",
        f"clips    {r['clips']} compared",
        f"missing  {r['missing_hypotheses']} reference clips without a hypothesis, "
        f"{r['missing_references']} hypothesis clips without a reference",
        f"skipped  {r['given_by_csv']} clips whose text came from asr.transcripts_csv, not ASR",
        f"edits    {r['substitutions']} substitutions, {r['deletions']} deletions, {r['insertions']} "
        f"insertions over {r['reference_tokens']} reference tokens"])


def _first(texts: dict[str, str]) -> str:
    return repr(min(texts)) if texts else "none"


if __name__ == "__main__":
    run(main)
