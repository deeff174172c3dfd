"""`mer asr score` (stages/asr_score.py, issue 25): the corpus error rate of the pipeline's
transcripts against a reference CSV, in characters for Chinese and words for English."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from features.errors import MerError
from features.reliability.reports import write_json_atomic
from stages.asr_score import main

ROOT = Path(__file__).resolve().parents[2]
MER_CSV = ("name,chinese,english\n"
           "c1,我今天很高兴,I am very happy today\n"
           "c2,你太过分了！,You went too far!\n"
           "c3,真没想到啊,I never expected it\n")


def _transcripts(path: Path, texts: dict[str, str], given: tuple[str, ...] = ()) -> Path:
    """The asr stage's output; clips in `given` came from asr.transcripts_csv (source "csv")."""
    entries = {c: {"text": t, "source": "csv" if c in given else "faster_whisper", "key": c}
               for c, t in texts.items()}
    write_json_atomic(path, {"asr": {}, "enhance": None, "transcripts": entries, "kept": {}})
    return path


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder: MER's reference CSV and the asr stage's output at its default path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "transcription.csv").write_text(MER_CSV, encoding="utf-8")
    # c1: 高兴 -> 开心 (2 of 6 characters); c2 right but for punctuation (0 of 5); c3's text is the
    # reference itself (asr.transcripts_csv gave it, not ASR: left out); c4 has no reference
    _transcripts(tmp_path / "artifacts/asr/transcripts.json",
                 {"c1": "我今天很开心", "c2": "你太过分了。", "c3": "真没想到啊", "c4": "多余的"}, given=("c3",))
    return tmp_path


def _json(capsys, *argv) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_chinese_transcripts_are_scored_in_characters(project, capsys):
    out = _json(capsys, "--reference", "transcription.csv", "--language", "zh")
    assert (out["unit"], out["clips"]) == ("cer", 2) and out["rate"] == pytest.approx(2 / 11)
    assert (out["missing_hypotheses"], out["missing_references"], out["given_by_csv"]) == (1, 1, 1)
    assert (out["substitutions"], out["reference_tokens"]) == (2, 11)
    assert _json(capsys, "--reference", "transcription.csv") == {**out, "language": "auto"}  # auto: zh


def test_the_plain_report_names_unit_rate_and_clips(project, capsys):
    assert main(["--reference", "transcription.csv"]) == 0
    text = capsys.readouterr().out
    assert "cer (character error rate)" in text and "0.1818" in text and "2 compared" in text
    assert "1 reference clips without a hypothesis, 1 hypothesis clips without a reference" in text
    assert "skipped  1 clips whose text came from asr.transcripts_csv" in text


def test_english_hypotheses_are_scored_in_words_against_the_english_column(project, capsys):
    hyps = project / "hyp.csv"
    # "very" deleted (1 of 5 words), "too" heard as "to" (1 of 4)
    hyps.write_text("name,text\nc1,I am happy today\nc2,you went to far\n", encoding="utf-8")
    out = _json(capsys, "--reference", "transcription.csv", "--hypotheses", str(hyps))
    assert (out["unit"], out["clips"], out["language"]) == ("wer", 2, "auto")
    assert out["rate"] == pytest.approx(2 / 9) and out["missing_hypotheses"] == 1
    assert _json(capsys, "--reference", "transcription.csv", "--hypotheses", str(hyps),
                 "--language", "en")["rate"] == pytest.approx(2 / 9)


def test_traditional_characters_on_request(project, capsys):
    pytest.importorskip("opencc")
    _transcripts(project / "trad.json", {"c1": "我今天很高興"})
    args = ["--reference", "transcription.csv", "--hypotheses", "trad.json"]
    assert _json(capsys, *args)["rate"] == pytest.approx(1 / 6)
    assert _json(capsys, *args, "--to-simplified")["rate"] == 0


def test_errors_name_the_file_and_the_fix(project, tmp_path):
    with pytest.raises(MerError, match=r"--reference: nope.csv does not exist.*name,chinese,english"):
        main(["--reference", "nope.csv"])
    with pytest.raises(MerError, match=r"--hypotheses: x.json does not exist.*dvc repro asr"):
        main(["--reference", "transcription.csv", "--hypotheses", "x.json"])
    (project / "other.csv").write_text("name,text\nclip_9,你好\n", encoding="utf-8")
    with pytest.raises(MerError, match=r"no clip is in both other.csv \(1 clips, e.g. 'clip_9'\) and "
                                       r".*transcripts.json \(3 ASR clips, e.g. 'c1'\)"):
        main(["--reference", "other.csv"])
    (project / "bad.json").write_text('{"rewrites": {}}', encoding="utf-8")
    with pytest.raises(MerError, match=r"bad.json is not the asr stage's transcripts.json"):
        main(["--reference", "transcription.csv", "--hypotheses", "bad.json"])
    (project / "cols.csv").write_text("name,sentence\nc1,你好\n", encoding="utf-8")
    with pytest.raises(MerError, match=r"--reference: cols.csv has columns"):
        main(["--reference", "cols.csv"])


def test_module_entry_prints_the_error_without_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "stages.asr_score", "--reference", str(tmp_path / "r.csv")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "--reference:" in done.stderr and "Traceback" not in done.stderr
