"""Error rates by script (issue 25): hand-counted cases in Chinese, English and mixed text."""
import csv
import re
import sys
from pathlib import Path

import pytest

from features.audio import error_rate as er
from features.audio.asr import wer, word_errors
from features.audio.error_rate import Edits, edits, error_rate, tokens, unit_for
from features.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]


def rate(ref: str, hyp: str, **kw) -> tuple[str, float]:
    r = error_rate({"c": ref}, {"c": hyp}, **kw)
    return r.unit, r.rate


# ---------------------------------------------------------------- Chinese: characters

def test_one_changed_word_of_six_characters_is_two_character_errors():
    # 高兴 -> 开心: two substituted characters out of six (whitespace words would say 1 of 1)
    assert edits("我今天很高兴", "我今天很开心") == Edits(substitutions=2, length=6)
    assert rate("我今天很高兴", "我今天很开心") == ("cer", pytest.approx(2 / 6))
    assert word_errors("我今天很高兴", "我今天很开心") == (2, 6)


def test_two_clauses_with_one_changed_word():
    # 公园 -> 商店 in a 12-character reference; the old whitespace split counted 1 of 2 "words"
    ref, hyp = "今天天气很好，我们去公园吧。", "今天天气很好,我们去商店吧"
    assert wer({"c": ref}, {"c": hyp}) == pytest.approx(2 / 12)


def test_deletion_and_insertion_are_counted_per_character():
    # 今天天气很好 -> 今天气很好啊: one 天 deleted, 啊 inserted
    assert edits("今天天气很好", "今天气很好啊") == Edits(deletions=1, insertions=1, length=6)


def test_punctuation_and_full_width_forms_do_not_count():
    assert tokens("“我今天，很高兴！”……") == list("我今天很高兴")
    assert rate("我今天很高兴！", "我今天，很高兴。") == ("cer", 0.0)
    # full-width letters and digits are the ASCII ones (NFKC), case folded
    assert tokens("ＭＥＲ２０２４比赛") == ["mer2024", "比", "赛"]
    assert rate("MER2024比赛", "ｍｅｒ２０２４比赛") == ("cer", 0.0)


def test_traditional_to_simplified_on_request():
    pytest.importorskip("opencc")
    ref, hyp = "我今天很高兴", "我今天很高興"  # 興 is 兴 in Traditional script
    assert rate(ref, hyp) == ("cer", pytest.approx(1 / 6))
    assert rate(ref, hyp, simplified=True) == ("cer", 0.0)
    assert tokens("這個東西", simplified=True) == list("这个东西")


def test_without_opencc_the_option_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "opencc", None)  # import opencc now raises ImportError
    er._converter.cache_clear()
    try:
        with pytest.raises(ConfigError, match="pip install opencc"):
            tokens("高興", simplified=True)
        assert tokens("高興") == ["高", "興"]  # scoring without the option needs nothing
    finally:
        er._converter.cache_clear()


# ---------------------------------------------------------------- English: words

def test_english_words_hand_counted():
    assert edits("Call me when you get this.", "call me, when you got this") == \
        Edits(substitutions=1, length=6)
    # changed -> change, "again" deleted
    assert edits("They changed the plan again.", "they change the plan") == \
        Edits(substitutions=1, deletions=1, length=5)
    assert rate("It is already ten o'clock.", "it's already ten o'clock") == ("wer", pytest.approx(2 / 5))
    assert word_errors("", "") == (0, 0) and word_errors("a b", "") == (2, 2)
    assert word_errors("", "a") == (1, 0)


def test_english_corpus_rate_sums_over_clips():
    refs = {"c1": "one two three four", "c2": "five six", "c3": "not transcribed"}
    result = error_rate(refs, {"c1": "one two tree four", "c2": "five six seven", "x": "no ref"})
    assert (result.unit, result.clips) == ("wer", 2) and result.rate == pytest.approx(2 / 6)
    assert result.as_dict() == {"unit": "wer", "rate": pytest.approx(2 / 6), "clips": 2,
                                "reference_tokens": 6, "substitutions": 1, "deletions": 0, "insertions": 1}
    with pytest.raises(ValueError, match="no clip has both"):
        error_rate(refs, {"x": "y"})


def test_english_tokens_are_the_old_whitespace_words():
    """The demo is English: its scores must not move. The pre-issue-25 rule (lower case, drop
    everything but word characters, spaces and apostrophes, split on whitespace) gives the same
    tokens on every demo reference and on typical ASR output."""
    def old(text):
        return re.sub(r"[^\w\s']", " ", text.lower()).split()

    with open(ROOT / "data/demo/reference_transcripts.csv", newline="") as fh:
        texts = [row["text"] for row in csv.DictReader(fh)]
    texts += ["Well-known, 3.5 km away -- isn't it?", " I'M   fine_thanks ", "Café résumé naïve"]
    assert len(texts) > 50
    for text in texts:
        assert tokens(text) == old(text), text


# ---------------------------------------------------------------- mixed text

def test_mixed_text_cjk_characters_alone_latin_words_whole():
    assert tokens("我用iPhone拍照") == ["我", "用", "iphone", "拍", "照"]
    assert tokens("这个app很好用，OK!") == ["这", "个", "app", "很", "好", "用", "ok"]
    # one inserted character among five tokens
    assert rate("我用iPhone拍照", "我用iphone拍了照") == ("cer", pytest.approx(1 / 5))
    # "iPhone" heard as "I phone": one substitution and one insertion
    assert edits("我用iPhone拍照", "我用I phone拍照") == Edits(substitutions=1, insertions=1, length=5)


def test_unit_follows_the_language_or_the_references_script():
    assert unit_for(["我今天很高兴"]) == "cer" and unit_for(["call me"]) == "wer"
    assert unit_for(["我用iPhone拍照"]) == "cer"  # four characters, one word
    assert unit_for(["I love 北京"]) == "wer"  # two and two: CJK does not dominate
    assert unit_for([]) == "wer"
    assert unit_for(["call me"], "zh") == "cer" and unit_for(["我今天很高兴"], "en") == "wer"
    assert error_rate({"c": "call me"}, {"c": "call me"}, language="zh").unit == "cer"
    with pytest.raises(ConfigError, match="zh.*en.*auto"):
        unit_for(["x"], "fr")
