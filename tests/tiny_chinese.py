"""Tiny random text models whose tokenizers hold Chinese characters (issue 25), saved like users' folders.

Importable from any test as `tiny_chinese` (pytest puts tests/, the conftest's folder, on sys.path).
Both tokenizers cut Chinese into single characters, as Chinese BERTs do; a character outside the
vocabulary becomes the unknown token.
"""
from pathlib import Path

import torch

# One five-character sentence per class (MER2024's classes), and the characters of the tests' texts.
SENTENCES = {"neutral": "我在看电视", "angry": "你太过分了", "happy": "我好开心啊",
             "sad": "我很难过呢", "worried": "我很担心他", "surprise": "真没想到啊"}
CHARACTERS = sorted(set("".join(SENTENCES.values()) + "我今天很高兴"))


def chinese_bert(folder: Path, seed: int = 0) -> str:
    """A 2-layer BERT with a per-character Chinese vocabulary (BertTokenizer splits CJK characters)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CHARACTERS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # positional: transformers 4 calls it vocab_file, 5 calls it vocab (and ignores vocab_file=)
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return str(folder)


def chinese_llama(folder: Path, seed: int = 0) -> str:
    """A 2-layer Llama (the causal-LM path, like Qwen in params.mer2024.yaml) whose tokenizer
    splits on whitespace and then into single characters, each a vocabulary entry."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *CHARACTERS])}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=1, bos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)
