"""Tiny random encoders of the real architectures, saved like a user's model folders (shared by tests).

Importable from any test as `tiny_models` (pytest puts tests/, the conftest's folder, on sys.path).
"""
import torch
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizerFast,
    CLIPVisionConfig,
    CLIPVisionModel,
    HubertConfig,
    HubertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Wav2Vec2FeatureExtractor,
)

try:
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:
    from transformers import CLIPImageProcessor

WORDS = "i am so happy sad angry today you are not very good bad the a day".split()


def _hubert(folder, norm="layer", seed=0):
    torch.manual_seed(seed)
    layer = norm == "layer"
    config = HubertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16, 16),
        conv_kernel=(10, 3, 3),
        conv_stride=(5, 2, 2),
        feat_extract_norm=norm,
        do_stable_layer_norm=layer,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    HubertModel(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=layer).save_pretrained(folder)
    return str(folder)


def _clip_processor(folder, size=32):
    CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    ).save_pretrained(folder)


def _clip_vision(folder):
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        image_size=32,
        patch_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    CLIPVisionModel(config).save_pretrained(folder)
    _clip_processor(folder)
    return str(folder)


def _bert(folder, seed=0):
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)  # positional: transformers 5 ignores vocab_file=
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    return str(folder)


def _llama(folder):
    """Tiny Llama (SmolLM2's architecture) with a word-level tokenizer that has no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(
        folder
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=1,
        bos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)
