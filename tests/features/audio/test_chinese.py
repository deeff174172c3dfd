"""Chinese in the ASR rewrite (issue 25): the guard counts characters, asr.language picks the prompt."""
import pytest

from features.audio.asr import AsrConfig, EnhanceConfig, RewriteConfig
from features.audio.asr_enhance import (INSTRUCTION, INSTRUCTION_ZH, Rewriter, accepts, change_ratio,
                                        first_sentence, fingerprint, instruction_for, prompt_text)
from features.params import from_section

ASR_TEXT = "我今天很高心"  # the ASR misheard 兴 as 心


def rewrite_cfg(language: str = "zh", **kw) -> RewriteConfig:
    """The rewrite settings as the asr section gives them: the language comes from asr.language."""
    section = {"language": language, "enhance": {"rewrite": {"model": "lm", **kw}}}
    return from_section(AsrConfig, section, "asr").enhance.rewrite


def stub_rewriter(cfg: RewriteConfig, reply: str) -> Rewriter:
    """A Rewriter whose LM always replies `reply` (the guard is what is tested, not the LM)."""
    rewriter = Rewriter.__new__(Rewriter)
    rewriter.cfg, rewriter.generate = cfg, lambda candidates: reply
    return rewriter


# ---------------------------------------------------------------- the guard

def test_one_character_correction_passes_the_guard():
    cfg = rewrite_cfg()
    assert change_ratio(ASR_TEXT, "我今天很高兴") == pytest.approx(1 / 6)  # was 1 of 1 "word"
    assert accepts(cfg, ASR_TEXT, "我今天很高兴。")
    assert stub_rewriter(cfg, "我今天很高兴").rewrite([ASR_TEXT], ASR_TEXT) == ("我今天很高兴", True)


def test_a_rewrite_that_replaces_the_sentence_is_refused():
    cfg = rewrite_cfg()
    other = "他们明天要去北京开会"
    assert change_ratio(ASR_TEXT, other) > cfg.max_change
    assert not accepts(cfg, ASR_TEXT, other)
    assert stub_rewriter(cfg, other).rewrite([ASR_TEXT], ASR_TEXT) == (ASR_TEXT, False)
    assert stub_rewriter(cfg, "").rewrite([ASR_TEXT], ASR_TEXT) == (ASR_TEXT, False)


def test_guard_threshold_in_characters():
    # two of six characters changed: 0.33 > 0.3 refused, accepted under max_change 0.4
    assert not accepts(rewrite_cfg(), "我今天很高兴", "我今天很开心")
    assert accepts(rewrite_cfg(max_change=0.4), "我今天很高兴", "我今天很开心")


# ---------------------------------------------------------------- asr.language picks the prompt

def test_asr_language_chooses_the_built_in_instruction():
    assert rewrite_cfg("zh").language == "zh" and instruction_for(rewrite_cfg("zh")) == INSTRUCTION_ZH
    assert instruction_for(rewrite_cfg("en")) == INSTRUCTION
    assert instruction_for(rewrite_cfg("")) == INSTRUCTION  # detected language: the English default
    own = "请纠正下面的转写。"
    assert instruction_for(rewrite_cfg("zh", instruction=own)) == own  # the user's instruction wins
    assert instruction_for(rewrite_cfg("en", instruction=own)) == own


def test_the_rewrite_follows_asr_language_through_replace():
    from dataclasses import replace

    cfg = AsrConfig(language="zh", enhance=EnhanceConfig(rewrite=RewriteConfig(model="lm")))
    assert cfg.enhance.rewrite.language == "zh"
    assert replace(cfg, language="en").enhance.rewrite.language == "en"
    assert replace(cfg, transcripts_csv="").enhance.rewrite.language == "zh"


def test_chinese_prompt_and_reply_parsing():
    text = prompt_text(["我今天很高心", ""], language="zh")
    assert text.startswith(INSTRUCTION_ZH) and text.endswith("候选1：我今天很高心\n候选2：（没有听到）")
    assert prompt_text(["a b"]).endswith("Candidate 1: a b")  # English unchanged
    assert first_sentence("句子：“我今天很高兴。”\n候选2：x") == "我今天很高兴。"
    assert first_sentence("最可能的句子是：「我今天很高兴」") == "我今天很高兴"
    assert first_sentence("我今天很高兴。") == "我今天很高兴。"


def test_language_and_prompt_are_part_of_the_cache_key(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    zh, en = (fingerprint(rewrite_cfg(lang, model=str(tmp_path))) for lang in ("zh", "en"))
    assert zh["prompt"] == INSTRUCTION_ZH and en["prompt"] == INSTRUCTION
    assert zh["language"] == "zh" and zh != en
    own = fingerprint(rewrite_cfg("zh", model=str(tmp_path), instruction="纠正。"))
    assert own["prompt"] == "纠正。" and own != zh


# ---------------------------------------------------------------- the noise evaluation's error rate

def test_the_noise_evaluation_scores_chinese_copies_in_characters(tmp_path):
    from features.reliability.reports import write_json_atomic
    from models.noise.evaluation import _wers

    write_json_atomic(tmp_path / "t.json", {"transcripts": {"a__n": {"text": "我今天很开心"}}})
    lineage = [{"clip_id": "a__n", "source_id": "a"}]
    assert _wers({"none": tmp_path / "t.json"}, {"a": "我今天很高兴。"}, lineage) == {"none": round(2 / 6, 4)}
