"""Error rates by script: characters for Chinese (and other CJK) text, words for the rest.

Both texts are normalised alike: NFKC (full-width letters and digits become ASCII), lower case,
optionally Traditional -> Simplified Chinese (OpenCC's t2s), punctuation dropped (full-width
included; apostrophes stay, as in "o'clock"). Tokens are then each CJK character on its own
and, between them, whitespace-delimited words whole: 我用iPhone拍照 is 我 用 iphone 拍 照.
jiwer aligns the token lists and counts substitutions, deletions and insertions.

Every result names its unit: `cer` for Chinese (`language: zh`, or `auto` when CJK characters
are most of the reference tokens), `wer` for space-delimited languages (`en`). On pure Chinese
text the number is the character error rate, on pure English the word error rate; on mixed
text each CJK character and each other word is one token (the usual score of code-switching
ASR), whichever unit the language names.
"""
from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import asdict, astuple, dataclass
from typing import Iterable, Mapping

import jiwer

from features.errors import ConfigError

LANGUAGES = ("zh", "en", "auto")
UNITS = {"zh": "cer", "en": "wer"}
UNIT_NAMES = {"cer": "character error rate", "wer": "word error rate"}

# Han ideographs (unified, extension A, compatibility, extensions B and later), the iteration
# and zero marks 々 〇, and Japanese kana: scripts written without spaces between words.
_CJK = "\u3005\u3007\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_PUNCT = re.compile(r"[^\w\s']")  # \w is Unicode-aware: CJK characters and digits stay
_TOKEN = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_IS_CJK = re.compile(rf"[{_CJK}]")


@dataclass(frozen=True)
class Edits:
    """Edit operations aligning a hypothesis to a reference of `length` tokens."""

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    length: int = 0

    @property
    def total(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    def __add__(self, other: Edits) -> Edits:
        return Edits(*(a + b for a, b in zip(astuple(self), astuple(other))))


@dataclass(frozen=True)
class ErrorRate:
    """A corpus error rate: total edits over total reference tokens, in `unit`."""

    unit: str  # "cer" | "wer"
    rate: float
    clips: int  # clips compared (those with both a reference and a hypothesis)
    edits: Edits

    def as_dict(self) -> dict:
        return {"unit": self.unit, "rate": self.rate, "clips": self.clips,
                "reference_tokens": self.edits.length, **{k: v for k, v in asdict(self.edits).items()
                                                         if k != "length"}}


def normalise(text: str, simplified: bool = False) -> str:
    """NFKC, lower case, optionally Traditional -> Simplified, punctuation replaced by spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    if simplified:
        text = _to_simplified(text)
    return _PUNCT.sub(" ", text)


def tokens(text: str, simplified: bool = False) -> list[str]:
    """Scoring tokens: each CJK character alone, other words whole, punctuation gone."""
    return _TOKEN.findall(normalise(text, simplified))


def edits(reference: str, hypothesis: str, simplified: bool = False) -> Edits:
    """The alignment counts of one hypothesis against its reference (jiwer's edit distance)."""
    ref, hyp = tokens(reference, simplified), tokens(hypothesis, simplified)
    if not ref or not hyp:  # nothing to align: all insertions or all deletions
        return Edits(deletions=len(ref), insertions=len(hyp), length=len(ref))
    out = jiwer.process_words(" ".join(ref), " ".join(hyp))  # tokens hold no spaces
    return Edits(out.substitutions, out.deletions, out.insertions, len(ref))


def unit_for(references: Iterable[str], language: str = "auto", simplified: bool = False) -> str:
    """`cer` or `wer`: by `language`, or for `auto` by whether CJK characters are most of the
    references' tokens."""
    check_language(language)
    if language != "auto":
        return UNITS[language]
    toks = [t for text in references for t in tokens(text, simplified)]
    cjk = sum(1 for t in toks if _IS_CJK.fullmatch(t))
    return "cer" if 2 * cjk > len(toks) else "wer"


def error_rate(references: Mapping[str, str], hypotheses: Mapping[str, str], language: str = "auto",
               simplified: bool = False) -> ErrorRate:
    """The corpus error rate over the clips in both mappings (clip -> text)."""
    common = sorted(set(references) & set(hypotheses))
    if not common:
        raise ValueError("no clip has both a reference and a hypothesis transcript")
    unit = unit_for((references[c] for c in common), language, simplified)
    total = sum((edits(references[c], hypotheses[c], simplified) for c in common), Edits())
    return ErrorRate(unit, total.total / max(total.length, 1), len(common), total)


def check_language(language: str) -> None:
    if language not in LANGUAGES:
        raise ConfigError(f"language {language!r}: scoring knows {list(LANGUAGES)} (zh: character "
                          "error rate, en: word error rate, auto: chosen by the references' script).")


@functools.lru_cache(maxsize=1)
def _converter():
    try:
        import opencc
    except ImportError as err:
        raise ConfigError("Traditional-to-Simplified scoring needs the opencc package: "
                          "pip install opencc (or score without it).") from err
    return opencc.OpenCC("t2s")


def _to_simplified(text: str) -> str:
    return _converter().convert(text)
