"""Text encoders and the LLM read Chinese transcripts (issue 25): a transcript becomes the tokens
the model's own tokenizer gives, none unknown, and its vectors are not those of unknown tokens."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from features.encoders import EncoderConfig, load_encoder  # noqa: E402
from tiny_chinese import chinese_bert, chinese_llama  # noqa: E402

TEXT = "我今天很高兴"  # every character is in the tiny vocabularies
UNKNOWN = "鬼魅魍魉魑魃"  # six characters none of them has


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("chinese")
    return {"bert": chinese_bert(d / "bert"), "llama": chinese_llama(d / "llama")}


@pytest.mark.parametrize("name, pooling, extra", [("bert", "mean", 2), ("llama", "last", 0)])
def test_a_chinese_transcript_is_the_tokenizers_tokens_not_unknowns(models, name, pooling, extra):
    """`extra`: BERT adds [CLS] and [SEP]; the Llama tokenizer adds nothing."""
    tokenizer = AutoTokenizer.from_pretrained(models[name])
    expected = tokenizer(TEXT)["input_ids"]
    assert len(expected) == len(TEXT) + extra and tokenizer.unk_token_id not in expected
    assert tokenizer(UNKNOWN)["input_ids"].count(tokenizer.unk_token_id) == len(UNKNOWN)  # the premise

    enc = load_encoder(EncoderConfig(family="text", model=models[name], pooling=pooling,
                                     layers_frames=[0, -1]))
    assert enc.prepare(TEXT)[0].data.tolist() == expected
    known, unknown = enc.encode([TEXT, UNKNOWN])
    assert known.frames.shape[1] == len(expected)  # one frame per token
    for layer in range(enc.num_layers):  # every layer, the embeddings included
        assert not np.allclose(known.pooled[layer], unknown.pooled[layer], atol=1e-3), layer


def test_different_chinese_sentences_get_different_vectors(models):
    """Two sentences of the same length: only their characters tell them apart."""
    enc = load_encoder(EncoderConfig(family="text", model=models["llama"], pooling="mean"))
    a, b = enc.encode(["我好开心啊", "我很难过呢"])
    assert not np.allclose(a.pooled[-1], b.pooled[-1], atol=1e-3)
