"""Tiny random BERT folders laid out as sentence-transformers saves them (modules.json,
1_Pooling/config.json, a Normalize module), with a small WordPiece vocabulary written here."""

from __future__ import annotations

import json
import os

import pytest

WORDS = ("the a cat dog sat on mat paris is capital of france what where who berlin germany city river "
         "sun moon blue green house tree").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz",
         *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz")]

ST_POOLING_FLAGS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}


def write_sentence_transformers(folder: str, pooling: str) -> None:
    """modules.json -> Transformer, Pooling (mean or cls), Normalize, as sentence-transformers writes."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    with open(os.path.join(folder, "modules.json"), "w") as f:
        json.dump(modules, f)
    os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
    with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 64, ST_POOLING_FLAGS[pooling]: True}, f)


@pytest.fixture(scope="session")
def bert_tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("bert-vocab")
    (folder / "vocab.txt").write_text("\n".join(VOCAB))
    return BertTokenizerFast(str(folder / "vocab.txt"))


def _bert_config(**extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=len(VOCAB), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=64, initializer_range=0.2, **extra)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory, bert_tokenizer):
    """Factory: pooling ("mean" or "cls") -> a BertModel embedder folder."""
    import torch
    import transformers

    folders: dict[str, str] = {}

    def build(pooling: str) -> str:
        if pooling not in folders:
            folder = str(tmp_path_factory.mktemp(f"bert-{pooling}"))
            torch.manual_seed(0)
            transformers.BertModel(_bert_config()).save_pretrained(folder)
            bert_tokenizer.save_pretrained(folder)
            write_sentence_transformers(folder, pooling)
            folders[pooling] = folder
        return folders[pooling]

    return build


@pytest.fixture(scope="session")
def cross_encoder_dir(tmp_path_factory, bert_tokenizer) -> str:
    """A BertForSequenceClassification with one label (a reranker); its folder also declares
    mean pooling + Normalize, so /v1/embeddings on it has a reference too."""
    import torch
    import transformers

    folder = str(tmp_path_factory.mktemp("cross-encoder"))
    torch.manual_seed(1)
    transformers.BertForSequenceClassification(_bert_config(num_labels=1)).save_pretrained(folder)
    bert_tokenizer.save_pretrained(folder)
    write_sentence_transformers(folder, "mean")
    return folder


@pytest.fixture(scope="session")
def xlm_roberta_dir(tmp_path_factory, bert_tokenizer) -> str:
    """An XLMRobertaForSequenceClassification reranker (positions after the padding index, one token type)."""
    import torch
    import transformers

    folder = str(tmp_path_factory.mktemp("xlm-roberta"))
    config = transformers.XLMRobertaConfig(vocab_size=len(VOCAB), hidden_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=128, max_position_embeddings=66,
                                           pad_token_id=0, initializer_range=0.2, num_labels=1)
    torch.manual_seed(2)
    transformers.XLMRobertaForSequenceClassification(config).save_pretrained(folder)
    bert_tokenizer.save_pretrained(folder)
    return folder


# arch -> num_labels: a 3-way classifier, and a reward model's single score
DECODER_CLASSIFIERS = {"llama": 3, "qwen2": 1}


@pytest.fixture(scope="session")
def decoder_classifier_dir(tmp_path_factory):
    """Factory: arch -> a tiny random transformers *ForSequenceClassification decoder (the score
    head on the last token) with the SmolLM2 tokenizer."""
    import torch
    import transformers

    from tests.utils import model_folder_factory, tiny_config

    def make(arch: str):
        config = tiny_config(arch)
        config.num_labels = DECODER_CLASSIFIERS[arch]
        torch.manual_seed(3)
        return transformers.AutoModelForSequenceClassification.from_config(config, dtype=torch.float32).eval()

    return model_folder_factory(tmp_path_factory, make, "seq-cls")
